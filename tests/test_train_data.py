"""Training data: the MMEB-train layout reader, mixtures, per-sub-dataset pools, stage-1 kinds.

Files are written here exactly as VLM2Vec's MMEB-train ships them (columns ``qry``,
``qry_image_path``, ``pos_text``, ``pos_image_path``, optionally ``neg_text`` and
``neg_image_path``; "" where a part is absent), as parquet and as JSONL.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from magic_mm.data.train_layout import (
    MixtureSampler,
    SubDataset,
    TrainDataError,
    open_subdataset,
    write_rows,
)
from magic_mm.train.config import ConfigError, TrainConfig, from_dict, load_config

REPO = Path(__file__).resolve().parent.parent
MAGIC_MM = REPO / ".venv" / "bin" / "magic-mm"


def write_mmeb(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    """Write rows in the MMEB-train layout: parquet (string columns) or JSONL (one object a line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        columns = list(rows[0])
        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
        pq.write_table(table, path, row_group_size=row_group_size)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name)


def vqa_rows(negatives: bool) -> list[dict]:
    rows = []
    for i in range(5):
        row = {"qry": f"<|image_1|>\nRepresent the given image with the following question: what is {i}?",
               "qry_image_path": f"imgs/q{i}.png", "pos_text": f"answer {i}", "pos_image_path": ""}
        if negatives:
            row.update({"neg_text": f"wrong {i}" if i % 2 == 0 else "", "neg_image_path": ""})
        rows.append(row)
    return rows


# -- the reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize("negatives", [False, True])
def test_reader_reads_the_mmeb_train_layout(tmp_path, suffix, negatives):
    write_images(tmp_path / "root" / "imgs", [f"q{i}.png" for i in range(5)])
    path = write_mmeb(tmp_path / f"VQA{suffix}", vqa_rows(negatives))
    reader = open_subdataset(SubDataset(str(path), image_root=str(tmp_path / "root")), block_rows=2)
    assert reader.name == "VQA" and len(reader) == 5 and reader.blocks == [2, 2, 1]
    rows = list(reader)
    assert [r.index for r in rows] == list(range(5))
    first = rows[0]
    # the placeholder is gone (the prompt places the image); paths resolve against image_root
    assert first.query.text == "Represent the given image with the following question: what is 0?"
    assert first.query.image == tmp_path / "root" / "imgs" / "q0.png"
    assert (first.positive.text, first.positive.image) == ("answer 0", None)  # "" means absent
    if negatives:
        assert [n.text for n in first.negatives] == ["wrong 0"] and rows[1].negatives == ()
    else:
        assert all(r.negatives == () for r in rows)
    # random access equals the streamed rows, in the order asked
    assert reader.rows([4, 0, 3, 3]) == [rows[4], rows[0], rows[3], rows[3]]


def test_reader_streams_blocks_and_keeps_at_most_two(tmp_path):
    rows = [{"qry": f"q{i}", "qry_image_path": "", "pos_text": f"p{i}", "pos_image_path": ""} for i in range(50)]
    path = write_mmeb(tmp_path / "t.parquet", rows, row_group_size=8)
    reader = open_subdataset(SubDataset(str(path)), block_rows=3)
    # row groups of 8 are cut into blocks of 3: 3, 3, 2 per group (the last group has 2 rows)
    assert reader.blocks[:3] == [3, 3, 2] and sum(reader.blocks) == 50
    rng = np.random.default_rng(0)
    for _ in range(20):
        picks = rng.integers(0, 50, 5).tolist()
        assert [r.query.text for r in reader.rows(picks)] == [f"q{i}" for i in picks]
        assert len(reader._cache) <= 2  # only the two most recent blocks stay decoded
    limited = open_subdataset(SubDataset(str(path), limit=10), block_rows=3)
    assert len(limited) == 10 and [r.index for r in limited] == list(range(10))
    with pytest.raises(IndexError):
        limited.rows([10])


def test_missing_images_name_the_row_the_file_and_the_fix(tmp_path):
    write_images(tmp_path / "imgs", ["q0.png", "q1.png", "q3.png", "q4.png"])  # q2.png is missing
    rows = vqa_rows(False)
    for suffix, where in ((".parquet", "row 2"), (".jsonl", "row 2 (line 3)")):
        path = write_mmeb(tmp_path / f"VQA{suffix}", rows)
        reader = open_subdataset(SubDataset(str(path)), block_rows=2)  # image_root: the file's folder
        with pytest.raises(TrainDataError) as err:
            reader.rows([2])
        message = str(err.value)
        assert f"{path}, {where}" in message and "q2.png" in message and "image_root" in message
        assert reader.rows([0, 1])[1].query.image == tmp_path / "imgs" / "q1.png"  # other blocks still read
        assert reader.rows([4])[0].index == 4
        # the block holding the bad row fails whichever of its rows is asked for, naming the bad one
        with pytest.raises(TrainDataError, match="row 2"):
            reader.rows([3])


@pytest.mark.parametrize(("content", "match"), [
    ('{"qry": "a", "pos_text": "b"}\n', "missing column.*qry_image_path"),
    ('{"qry": "a", "qry_image_path": "", "pos_text": "b", "pos_image_path": ""}\nnot json\n', r"row 1 \(line 2\).*not valid JSON"),
    ('{"qry": "a", "qry_image_path": "", "pos_text": "", "pos_image_path": ""}\n', r"row 0 \(line 1\).*positive.*neither"),
    ('{"qry": "<|image_1|>", "qry_image_path": "", "pos_text": "b", "pos_image_path": ""}\n', "query.*neither"),
])
def test_bad_rows_and_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TrainDataError, match=match):
        list(open_subdataset(SubDataset(str(path))))


def test_missing_file_unknown_type_and_empty_file(tmp_path):
    with pytest.raises(TrainDataError, match="no such file.*'file' entry"):
        open_subdataset(SubDataset(str(tmp_path / "nope.parquet")))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(TrainDataError, match="unknown sub-dataset type"):
        open_subdataset(SubDataset(str(tmp_path / "x.txt")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainDataError, match="no rows"):
        open_subdataset(SubDataset(str(tmp_path / "empty.jsonl")))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TrainDataError, match="not a readable parquet"):
        open_subdataset(SubDataset(str(tmp_path / "junk.parquet")))


def test_caption_folder_label_csv_and_written_rows_are_sub_datasets(tmp_path):
    write_images(tmp_path / "caps" / "images", ["a.png", "b.png"])
    (tmp_path / "caps" / "captions.csv").write_text("image,caption\na.png,one\na.png,two\nb.png,three\n")
    captions = open_subdataset(SubDataset(str(tmp_path / "caps")))
    assert captions.format == "captions" and captions.name == "caps"
    assert [(r.query.text, r.positive.image.name) for r in captions] == [("one", "a.png"), ("two", "a.png"),
                                                                        ("three", "b.png")]
    write_images(tmp_path / "lab", ["x.png", "y.png"])
    with (tmp_path / "lab" / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["image", "label"], ["x.png", "cat"], ["y.png", "dog"]])
    labels = open_subdataset(SubDataset(str(tmp_path / "lab" / "labels.csv")))
    assert [(r.query.image.name, r.query.text, r.positive.text) for r in labels] == [("x.png", None, "cat"),
                                                                                  ("y.png", None, "dog")]
    # write_rows (what converters use) round-trips through the reader in both formats
    records = [{"qry": "q", "pos_text": "p", "neg_text": "n"}, {"qry": "r", "pos_text": "s"}]
    for suffix in (".parquet", ".jsonl"):
        reader = open_subdataset(SubDataset(str(write_rows(records, tmp_path / f"w{suffix}", row_group_rows=1))))
        assert [(r.query.text, r.positive.text, [n.text for n in r.negatives]) for r in reader] == [
            ("q", "p", ["n"]), ("r", "s", [])]
    with pytest.raises(TrainDataError, match="unknown column"):
        write_rows([{"query": "x"}], tmp_path / "bad.jsonl")


# -- the sampler --------------------------------------------------------------------------
def test_mixture_sampler_proportions_determinism_and_epochs():
    blocks = [[4, 4, 2], [7], [3, 3]]  # 10, 7 and 6 rows
    sampler = MixtureSampler(blocks, [1.0, 2.0, 5.0], batch_size=5, seed=3)
    batches = [sampler.batch(s) for s in range(8000)]
    counts = Counter(d for d, _ in batches)
    for d, share in enumerate([1 / 8, 2 / 8, 5 / 8]):
        assert abs(counts[d] / 8000 - share) < 0.02, counts
    sizes = [10, 7, 6]
    assert all(0 <= p < sizes[d] for d, positions in batches for p in positions)
    # a fresh sampler, asked for any step first, gives the same batch (a pure function of seed and step)
    for step in (0, 1, 4095, 4096, 7999, 123):
        assert MixtureSampler(blocks, [1.0, 2.0, 5.0], 5, seed=3).batch(step) == batches[step]
    other = [MixtureSampler(blocks, [1.0, 2.0, 5.0], 5, seed=4).batch(s) for s in range(50)]
    assert other != batches[:50]
    # each sub-dataset's own stream visits every row once per epoch
    stream: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for d, positions in batches:
        stream[d] += positions
    for d, n in enumerate(sizes):
        epochs = [sorted(stream[d][e * n:(e + 1) * n]) for e in range(len(stream[d]) // n)]
        assert epochs and all(e == list(range(n)) for e in epochs)
        assert stream[d][:n] != stream[d][n:2 * n]  # each epoch is its own permutation


def test_mixture_sampler_rejects_bad_weights_and_skips_empty_sub_datasets():
    with pytest.raises(TrainDataError, match="weights"):
        MixtureSampler([[3]], [0.0], 2)
    sampler = MixtureSampler([[3], []], [1.0, 5.0], 2)  # no rows: never drawn, whatever its weight
    assert {sampler.batch(s)[0] for s in range(100)} == {0}


# -- configs --------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "match"), [
    ("datasets: [{file: a.jsonl, colour: red}]", "colour"),
    ("datasets: [{file: a.jsonl, kind: video}]", "kind"),
    ("datasets: [{file: a.jsonl, weight: -1}]", "weight"),
    ("datasets: [{file: a.jsonl, weight: 0}]", "every weight is 0"),
    ("datasets: [{file: a.jsonl}, {file: b/a.jsonl}]", "names .* repeat"),
    ("datasets: [{file: a.jsonl}]\ndata: {folder: elsewhere}", "either data.folder .*or datasets"),
    ("datasets: [{name: x}]", "file"),
    ("datasets: {file: a.jsonl}", "list of mappings"),
])
def test_mixture_config_errors(tmp_path, body, match):
    path = tmp_path / "c.yaml"
    path.write_text(f"stage: stage2\noutput: out\n{body}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


# -- trainers on mixtures -----------------------------------------------------------------
TASKS = ("t2i", "i2t", "t2t")
INSTRUCTIONS = {name: (f"Query of {name}.", f"Candidate of {name}.") for name in TASKS}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """Three sub-datasets in the MMEB-train layout and distinct cached vision grids for their images:
    t2i (parquet: caption → image), i2t (JSONL: image → caption) and t2t (JSONL: text → text with
    the file's own negatives).  Every text names its sub-dataset, so a pool crossing shows."""
    root = tmp_path_factory.mktemp("mixture")
    names = [f"p{i}.png" for i in range(6)]
    write_images(root / "images", names)
    write_mmeb(root / "t2i.parquet", [{"qry": f"t2i caption {i % 6}", "qry_image_path": "", "pos_text": "",
                                       "pos_image_path": f"p{i % 6}.png"} for i in range(12)], row_group_size=5)
    write_mmeb(root / "i2t.jsonl", [{"qry": "<|image_1|>", "qry_image_path": f"p{i}.png",
                                     "pos_text": f"i2t caption {i}", "pos_image_path": ""} for i in range(6)])
    write_mmeb(root / "t2t.jsonl", [{"qry": f"t2t question {i}", "qry_image_path": "", "pos_text": f"t2t answer {i}",
                                     "pos_image_path": "", "neg_text": f"t2t answer {(i + 3) % 8}",
                                     "neg_image_path": ""} for i in range(8)])
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    save_file({str(root / "images" / n): torch.randn(1, 4, 4, 1280, generator=generator) for n in names},
              root / "grids.safetensors")
    return root


def mixture_raw(root: Path, out: Path, stage: str = "stage2", **extra) -> dict:
    files = {"t2i": "t2i.parquet", "i2t": "i2t.jsonl", "t2t": "t2t.jsonl"}
    datasets = [{"name": n, "file": str(root / files[n]), "image_root": str(root / "images"),
                 "weight": w, "query_instruction": INSTRUCTIONS[n][0], "candidate_instruction": INSTRUCTIONS[n][1],
                 "judge_question": f"[{n}] Is {{candidate}} right for {{query}}?"}
                for n, w in zip(TASKS, (1.0, 1.0, 2.0))]
    return {"stage": stage, "output": str(out), "model": "tiny-random-composed", "datasets": datasets,
            "vision_cache_file": str(root / "grids.safetensors"), "steps": 6, "batch_size": 4,
            "temperature": 0.1, "checkpoint_every": 3, "show_progress": False, "data": {"block_rows": 4},
            "optim": {"lr": 1e-3, "connector_lr": 1e-3}, **extra}


def make_trainer(raw: dict):  # noqa: ANN201
    from magic_mm.train.registry import TRAINERS

    config = from_dict(TrainConfig, raw, "test")
    config.validate()
    return TRAINERS[config.stage](config)


def owner_of(item) -> str:  # noqa: ANN001
    """The sub-dataset a query or candidate belongs to (every text names it; t2i's images are its own)."""
    return item.text.split()[0] if item.text else "t2i"


def test_mining_ranks_each_query_only_against_its_own_pool_with_its_instructions(mixture, tmp_path):
    t = make_trainer(mixture_raw(mixture, tmp_path / "mine", hard_negatives={"steps": 1, "window": [0, 4], "count": 2}))
    t.prepare_run()
    calls = []
    forward = t.model_forward

    def spy(items, role, instruction):  # noqa: ANN001, ANN202
        calls.append((role, instruction, [i.text or i.name for i in items]))
        return forward(items, role, instruction)

    t.model_forward = spy
    mined = t.mine()
    assert sorted(mined) == sorted(TASKS)
    for name, rows in mined.items():
        pool = t.data.pool(t.data.names.index(name))
        assert sorted(rows) == sorted(pool.rows)
        for row, negatives in rows.items():
            positive = pool.candidates[pool.owner[pool.rows.index(row)]]
            assert len(negatives) == 2 and positive not in negatives
            assert all(n in pool.index for n in negatives)  # from this sub-dataset's pool only
    # every embedding call carries one sub-dataset's items, with that sub-dataset's instruction
    assert calls
    for role, instruction, texts in calls:
        owners = {instruction.split()[-1].rstrip(".")}
        assert all(text.split()[0] in owners or "images" in text for text in texts), (instruction, texts)
        assert instruction == INSTRUCTIONS[owners.pop()][0 if role == "query" else 1]


def test_judging_asks_per_task_questions_about_own_pool_candidates(mixture, tmp_path, monkeypatch):
    from magic_mm.train import stage3
    from magic_mm.train.judge import Judge

    asked: list[tuple[str, str | None]] = []

    class Recorder(Judge):
        name = "recorder"

        def logits(self, question, image):  # noqa: ANN001, ANN202
            asked.append((question, None if image is None else str(image)))
            return (1.0, 0.0) if len(asked) % 3 == 0 else (0.0, 1.0)  # every third one is "relevant"

    monkeypatch.setattr(stage3, "make_judge", lambda config: Recorder())
    raw = mixture_raw(mixture, tmp_path / "judge", stage="stage3", steps=2,
                      stage3={"retrieve_top": 3, "hard_negatives": 2})
    t = make_trainer(raw)
    t.run()
    judged = json.loads((tmp_path / "judge" / "judgements.json").read_text())
    assert sorted(judged) == sorted(TASKS)
    pools = {name: t.data.pool(d) for d, name in enumerate(t.data.names)}
    for name, rows in judged.items():
        pool_items = {(c.text, None if c.image is None else str(c.image)) for c in pools[name].candidates}
        for row, j in rows.items():
            picked = j["judged_relevant"] + j["negatives"]
            assert all((c["text"], c["image"]) in pool_items for c in picked)  # never another pool's
            assert j["positive"][0] not in picked and len(j["negatives"]) <= 2
    questions = Counter(q.split("]")[0][1:] for q, _ in asked)
    assert set(questions) == set(TASKS)  # each task's own question
    for question, image in asked:
        task = question.split("]")[0][1:]
        named = [w for w in question.replace("?", " ").split() if w in TASKS]
        assert set(named) <= {task}, question  # query and candidate texts of that task only
        if task == "i2t":
            assert image is not None  # a text candidate: the judge sees the query's image
    log = [json.loads(line) for line in (tmp_path / "judge" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["dataset"] in TASKS for r in log)


def test_stage2_cli_over_a_three_sub_dataset_mixture_resumes_exactly(mixture, tmp_path):
    """The installed `magic-mm train stage2` script: stopped after step 3, then resumed."""
    out = tmp_path / "run"
    config = tmp_path / "stage2.yaml"
    raw = mixture_raw(mixture, out, hard_negatives={"steps": 3, "window": [0, 4], "count": 1})
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MAGIC_MM_DTYPE": "float32", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(MAGIC_MM), "train", "stage2", "--config", str(config), "--quiet"]
    first = subprocess.run([*command, "--stop-after", "3"], capture_output=True, text=True, cwd=REPO, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after step 3 of 9" in first.stdout
    second = subprocess.run([*command, "--json"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["finished"] and summary["steps"] == 9
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 10))
    # every line names its batch's sub-dataset: exactly the sampler's pure-function order
    t = make_trainer(raw)
    t.negatives = {name: {int(r): [] for r in rows} for name, rows in
                   json.loads((out / "hard_negatives.json").read_text()).items()}
    expected = [t.data.names[t.step_batch(s)[0]] for s in range(9)]
    assert [r["dataset"] for r in log] == expected and set(expected) == set(TASKS)
    assert [r["hard_negative_phase"] for r in log] == [0.0] * 6 + [1.0] * 3
    # the t2t file's own negatives join its batches: more candidates than queries
    assert all(r["candidates"] > 4 for r in log if r["dataset"] == "t2t")
    # mined per sub-dataset, never across: each negative belongs to its own sub-dataset
    mined = json.loads((out / "hard_negatives.json").read_text())
    assert sorted(mined) == sorted(TASKS)
    for name, rows in mined.items():
        for negatives in rows.values():
            for n in negatives:
                assert (n["text"] or "t2i").split()[0] == name
    assert (out / "model" / "weights.safetensors").is_file()


def test_stage1_trains_on_caption_instruction_and_text_kinds(tmp_path):
    write_images(tmp_path / "images", ["a.png", "b.png"])
    write_mmeb(tmp_path / "captions.parquet", [{"qry": "", "qry_image_path": f"{n}.png", "pos_text": f"photo {n}",
                                                "pos_image_path": ""} for n in "ab"])
    write_mmeb(tmp_path / "vqa.jsonl", [{"qry": f"<|image_1|> what letter is {n}?", "qry_image_path": f"{n}.png",
                                         "pos_text": n, "pos_image_path": ""} for n in "ab"])
    write_mmeb(tmp_path / "text.jsonl", [{"qry": "one two", "qry_image_path": "", "pos_text": "three",
                                          "pos_image_path": ""}])
    datasets = [
        {"file": str(tmp_path / "captions.parquet"), "image_root": str(tmp_path / "images"), "weight": 1},
        {"file": str(tmp_path / "vqa.jsonl"), "image_root": str(tmp_path / "images"), "weight": 1,
         "prompt": "Question: {text}"},
        {"file": str(tmp_path / "text.jsonl"), "kind": "text", "weight": 2, "prompt": "Continue: {text}"},
    ]
    raw = {"stage": "stage1", "output": str(tmp_path / "s1"), "model": "tiny-random-composed", "datasets": datasets,
           "steps": 8, "batch_size": 2, "checkpoint_every": 4, "show_progress": False, "cache_vision": False,
           "optim": {"lr": 1e-2, "connector_lr": 1e-2}, "stage1": {"caption_prompt": "Caption it."}}
    t = make_trainer(raw)
    assert t.kinds == ["caption", "instruction", "text"]  # the first two guessed from their rows
    rows = [reader.rows([0])[0] for reader in t.data.readers]
    images = tmp_path / "images"
    assert t.parts(0, rows[0]) == (images / "a.png", "Caption it.", "photo a")
    assert t.parts(1, rows[1]) == (images / "a.png", "Question: what letter is a?", "a")
    assert t.parts(2, rows[2]) == (None, "Continue: one two", "three")
    before = {k: v.clone() for k, v in t.embedder.trained_state_dict().items()}
    t.run()
    log = [json.loads(line) for line in (tmp_path / "s1" / "train_log.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in log} == {"captions", "vqa", "text"}
    assert all(np.isfinite(r["loss"]) for r in log)
    after = t.embedder.trained_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # a row that does not fit its kind is a clear error
    bad = make_trainer({**raw, "output": str(tmp_path / "bad"),
                        "datasets": [{**datasets[2], "kind": "instruction"}]})
    with pytest.raises(TrainDataError, match="text.jsonl, row 0.*kind instruction.*query image"):
        bad.parts(0, bad.data.readers[0].rows([0])[0])
