"""Evaluation layer: metrics on hand-made rankings, the MMEB layout reader, local/global
modes, converters, the embedding cache and the ``eval`` / ``convert`` commands."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from magic_mm.data.convert import caption_task, label_task
from magic_mm.data.mmeb import Item, TaskFileError, TaskRow, parse_records, read_task, write_task
from magic_mm.errors import UserError
from magic_mm.eval.cache import CachedEncoder, EmbeddingCache
from magic_mm.eval.harness import EvalSettings, evaluate, evaluate_rows
from magic_mm.eval.metrics import first_relevant_rank, query_metrics, rank_order
from magic_mm.eval.tasks import MMEB_TASKS, TasksFileError, load_tasks
from magic_mm.model.compression import Compression


# -- metrics -------------------------------------------------------------------------
def test_metrics_single_positive_at_rank_three():
    scores = np.array([0.5, 0.9, 0.7, 0.1])  # positive (index 0) is third
    m = query_metrics(scores, [1, 0, 0, 0], ks=(1, 3))
    assert m["hit@1"] == 0 and m["hit@3"] == 1
    assert m["recall@1"] == 0 and m["recall@3"] == 1
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(4))


def test_metrics_several_positives_recall_differs_from_hit():
    scores = np.array([0.9, 0.1, 0.8, 0.7])
    m = query_metrics(scores, [1, 1, 0, 0], ks=(1, 2))
    assert m["hit@1"] == 1 and m["recall@1"] == 0.5
    assert m["recall@2"] == 0.5  # second positive is last
    assert m["mrr"] == 1.0


def test_graded_ndcg_by_hand():
    # ranking by score: c2 (grade 1), c0 (grade 3), c3 (0), c1 (2)
    scores = np.array([0.8, 0.1, 0.9, 0.5])
    grades = np.array([3, 2, 1, 0])
    dcg = 1 / math.log2(2) + 3 / math.log2(3) + 0 + 2 / math.log2(5)
    ideal = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert query_metrics(scores, grades)["ndcg@5"] == pytest.approx(dcg / ideal)
    assert query_metrics(scores[[0, 1, 2]], grades[[0, 1, 2]], ndcg_k=1)["ndcg@1"] == pytest.approx(1 / 3)


def test_ties_are_pessimistic_by_default():
    scores = np.zeros(4)  # a degenerate model: all candidates tie
    grades = [1, 0, 0, 0]
    assert query_metrics(scores, grades)["hit@1"] == 0.0
    assert first_relevant_rank(scores, grades) == 4
    assert query_metrics(scores, grades, ties="optimistic")["hit@1"] == 1.0
    assert query_metrics(scores, grades, ties="index")["hit@1"] == 1.0  # MMEB's argmax favours index 0
    assert list(rank_order(np.array([0.5, 0.7, 0.5]), np.array([1, 0, 0]))) == [1, 2, 0]


def test_partial_tie_only_affects_tied_items():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    m = query_metrics(scores, [1, 0, 0, 0], ks=(2, 3))
    assert m["hit@2"] == 0 and m["hit@3"] == 1 and m["mrr"] == pytest.approx(1 / 3)


def test_no_relevant_candidate_scores_zero():
    m = query_metrics(np.array([0.3, 0.2]), [0, 0], ks=(1,))
    assert m == {"hit@1": 0.0, "recall@1": 0.0, "mrr": 0.0, "ndcg@5": 0.0}


# -- layout reader -------------------------------------------------------------------
RECORDS = [
    {"qry_text": "<|image_1|>\nWhat is this?", "qry_img_path": "i0.png",
     "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]},
    {"qry_inst": "Find the image.", "qry_text": "a dog", "qry_img_path": "",
     "tgt_inst": "", "tgt_text": ["", ""], "tgt_img_path": ["i1.png", "i2.png"], "tgt_relevance": [2, 1]},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_reader_round_trip(tmp_path, image_dir, suffix):
    path = write_task(RECORDS, tmp_path / f"task{suffix}")
    rows = read_task(path, image_dir)
    assert rows[0].query == Item(None, "What is this?", image_dir / "i0.png")  # placeholder stripped
    assert [c.text for c in rows[0].candidates] == ["cat", "dog"]
    assert rows[0].grades == [1.0, 0.0]  # positive at index 0
    assert rows[1].query.instruction == "Find the image." and rows[1].candidates[0].instruction == ""
    assert [c.image for c in rows[1].candidates] == [image_dir / "i1.png", image_dir / "i2.png"]
    assert rows[1].grades == [2.0, 1.0]


def test_reader_image_root_defaults_to_file_folder(image_dir):
    path = write_task(RECORDS, image_dir / "task.jsonl")
    assert read_task(path)[1].candidates[1].image == image_dir / "i2.png"


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("tgt_img_path"), "missing column"),
    (lambda r: r.update(tgt_img_path=["i1.png"]), "tgt_text has 2 entries but tgt_img_path has 1"),
    (lambda r: r.update(tgt_relevance=[1]), "tgt_relevance has 1 grades for 2 candidates"),
    (lambda r: r.update(tgt_text="cat"), "must be lists"),
    (lambda r: r.update(qry_text="", qry_img_path=""), "query has neither a text nor an image"),
    (lambda r: r.update(tgt_text=[], tgt_img_path=[]), "no candidates"),
])
def test_reader_rejects_bad_rows(tmp_path, image_dir, change, message):
    record = dict(RECORDS[0])
    change(record)
    path = write_task([record], tmp_path / "bad.jsonl")
    with pytest.raises(TaskFileError, match=message):
        read_task(path, image_dir)


def test_reader_names_missing_images_and_root(tmp_path, image_dir):
    path = write_task(RECORDS, tmp_path / "task.jsonl")
    with pytest.raises(TaskFileError, match=r"image\(s\) not found under the image root .*image_root"):
        read_task(path, tmp_path)


def test_reader_bad_files(tmp_path):
    with pytest.raises(TaskFileError, match="not found"):
        read_task(tmp_path / "none.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"qry_text": 1}\n{oops\n')
    with pytest.raises(TaskFileError, match="line 2: not valid JSON"):
        read_task(tmp_path / "broken.jsonl")
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(TaskFileError, match="use .parquet or .jsonl"):
        read_task(tmp_path / "t.csv")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TaskFileError, match="no rows"):
        read_task(tmp_path / "empty.jsonl")


# -- local / global modes and the cache, with hand-made vectors ----------------------
class LookupModel:
    """Stands in for MagicEmbedder: a fixed vector per text, counting the calls."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.embedded: list[str] = []

    def encode(self, inputs, instruction, role, batch_size):
        self.embedded += [i.text for i in inputs]
        v = np.array([self.table[i.text] for i in inputs], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def t(text: str) -> Item:
    return Item(None, text, None)


VECTORS = {"qa": [1, 0, 0], "qb": [0, 1, 0], "a+": [0.9, 0.1, 0], "b-": [0, 0, 1],
           "c+": [0.1, 0.9, 0.2], "d-": [0.95, 0.05, 0]}
ROWS = [TaskRow(t("qa"), [t("a+"), t("b-")], [1, 0]), TaskRow(t("qb"), [t("c+"), t("d-")], [1, 0])]


def encoder(model, cache=None):
    return CachedEncoder(lambda: model, cache or EmbeddingCache(None), Compression(), {})


def test_local_and_global_modes_differ():
    model = LookupModel(VECTORS)
    local, preds, counts = evaluate_rows(ROWS, encoder(model), "local", ks=(1,))
    assert local["hit@1"] == 1.0 and counts["candidates_per_query"] == 2
    # Globally, qa meets d- (row 2's negative), which beats its own a+.
    glob, preds, counts = evaluate_rows(ROWS, encoder(model), "global", ks=(1,))
    assert glob["hit@1"] == 0.5
    assert preds[0]["top"][0]["candidate"] == "'d-'" and preds[0]["first_relevant_rank"] == 2
    assert counts["unique_candidates"] == 4


def test_each_unique_item_is_embedded_once():
    rows = ROWS + [TaskRow(t("qa"), [t("a+"), t("d-")], [1, 0])]
    model = LookupModel(VECTORS)
    evaluate_rows(rows, encoder(model), "local")
    assert sorted(model.embedded) == sorted(VECTORS)


def test_cache_makes_second_run_free(tmp_path):
    first = LookupModel(VECTORS)
    enc = encoder(first, EmbeddingCache(tmp_path / "c"))
    m1, _, _ = evaluate_rows(ROWS, enc, "global")
    assert enc.computed == 6

    def no_model():
        raise AssertionError("the model must not be loaded on a cached run")

    enc2 = CachedEncoder(no_model, EmbeddingCache(tmp_path / "c"), Compression(), {})
    m2, _, _ = evaluate_rows(ROWS, enc2, "global")
    assert enc2.computed == 0 and m1 == m2


def test_cache_key_tracks_compression_only_for_images(tmp_path, image_dir):
    items = [Item(None, "a caption", None), Item(None, None, image_dir / "i0.png")]
    table = {"a caption": [1.0, 0.0]}

    class Model(LookupModel):
        def encode(self, inputs, **kw):
            self.embedded += [i.text or "img" for i in inputs]
            return np.array([[0.0, 1.0] if i.text is None else table[i.text] for i in inputs], np.float32)

    model = Model(table)
    for comp in ("bilinear:2", "avgpool:2"):
        CachedEncoder(lambda: model, EmbeddingCache(tmp_path), Compression.parse(comp), {}).encode(items, "candidate")
    assert model.embedded == ["a caption", "img", "img"]  # the text was reused across compressions


# -- converters ----------------------------------------------------------------------
@pytest.fixture
def caption_dir(tmp_path) -> Path:
    root = tmp_path / "caps"
    (root / "images").mkdir(parents=True)
    with (root / "captions.csv").open("w", newline="") as fh, (root / "splits.csv").open("w", newline="") as sp:
        caps, splits = csv.writer(fh), csv.writer(sp)
        caps.writerow(["image", "caption"])
        splits.writerow(["image", "split"])
        for i in range(5):
            name = f"p{i}.png"
            make_image(32, 32, seed=i).save(root / "images" / name)
            for j in range(3):
                caps.writerow([name, f"photo {i} caption {j}"])
            splits.writerow([name, "test" if i < 4 else "train"])
    return root


def test_caption_t2i_whole_split(caption_dir):
    task = caption_task(caption_dir, "test", "t2i")
    assert len(task.records) == 12  # 4 test images × 3 captions
    for rec in task.records:
        image_no = rec["qry_text"].split()[1]
        assert rec["tgt_img_path"][0] == f"p{image_no}.png"  # positive first
        assert sorted(rec["tgt_img_path"]) == [f"p{i}.png" for i in range(4)]
    rows = parse_records(task.records, caption_dir, task.image_root)
    assert rows[0].candidates[0].image == caption_dir / "images" / "p0.png"


def test_caption_i2t_never_uses_own_captions_as_negatives(caption_dir):
    task = caption_task(caption_dir, "test", "i2t", candidates=6, seed=1)
    assert len(task.records) == 4
    for rec in task.records:
        own = rec["qry_img_path"][1]
        texts, grades = rec["tgt_text"], rec["tgt_relevance"]
        assert len(texts) == 6 and grades == [1, 1, 1, 0, 0, 0]
        assert all(t.split()[1] == own for t in texts[:3])
        assert all(t.split()[1] != own for t in texts[3:])
    assert caption_task(caption_dir, "test", "i2t", candidates=6, seed=1).records == task.records


def test_caption_candidate_count_and_errors(caption_dir):
    task = caption_task(caption_dir, "test", "t2i", candidates=2)
    assert all(len(r["tgt_img_path"]) == 2 for r in task.records)
    with pytest.raises(UserError, match="more than 3 candidates"):
        caption_task(caption_dir, "test", "i2t", candidates=3)
    with pytest.raises(UserError, match="direction"):
        caption_task(caption_dir, "test", "x2y")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="no images in split 'dev'"):
        caption_task(caption_dir, "dev", "t2i")


def test_label_task(tmp_path, image_dir):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\ni0.png,cat\ni1.png,dog\ni2.png,cat\ni3.png,bird\n")
    task = label_task(labels, image_dir)
    assert [r["tgt_text"] for r in task.records[:2]] == [["cat", "bird", "dog"], ["dog", "bird", "cat"]]
    rows = parse_records(task.records, labels, task.image_root)
    assert rows[3].query.image == image_dir / "i3.png" and rows[3].candidates[0].text == "bird"
    labels.write_text("image,label\ni0.png,cat\n")
    with pytest.raises(UserError, match="at least 2"):
        label_task(labels, image_dir)
    labels.write_text("file,class\ni0.png,cat\n")
    with pytest.raises(UserError, match="needs the columns image,label"):
        label_task(labels, image_dir)
    labels.write_text("image,label\ni0.png,cat\n,dog\n")
    with pytest.raises(UserError, match="empty image or label on line"):
        label_task(labels, image_dir)


# -- tasks YAML ----------------------------------------------------------------------
def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tasks_yaml_resolves_paths_and_mmeb_meta(tmp_path):
    spec = load_tasks(write_yaml(tmp_path / "t.yaml", "tasks:\n  - {name: MSCOCO_t2i, file: a/b.parquet, image_root: imgs}\n"))[0]
    assert spec.path == tmp_path / "a" / "b.parquet" and spec.image_root == tmp_path / "imgs"
    assert (spec.meta, spec.distribution) == ("retrieval", "ind") == MMEB_TASKS["MSCOCO_t2i"]
    assert len(MMEB_TASKS) == 36


@pytest.mark.parametrize("text, message", [
    ("tasks: []\n", "non-empty 'tasks:'"),
    ("tasks:\n  - {name: a, file: x.jsonl, captions: y}\n", "exactly one of"),
    ("tasks:\n  - {name: a, file: x.jsonl, colour: red}\n", "unknown key"),
    ("tasks:\n  - {name: a, file: x.jsonl}\n  - {name: a, file: y.jsonl}\n", "more than once"),
    ("tasks:\n  - {name: a, file: x.jsonl, mode: sideways}\n", "mode 'sideways'"),
    ("tasks: [\n", "not valid YAML"),
])
def test_tasks_yaml_errors(tmp_path, text, message):
    with pytest.raises(TasksFileError, match=message):
        load_tasks(write_yaml(tmp_path / "t.yaml", text))


# -- end to end: the real harness and CLI with a tiny random model --------------------
def test_eval_command_end_to_end_and_cached(run_cli, tmp_path, caption_dir):
    tasks = write_yaml(tmp_path / "tasks.yaml", f"tasks:\n"
                       f"  - {{name: t2i, captions: {caption_dir}, split: test, direction: t2i}}\n"
                       f"  - {{name: i2t, captions: {caption_dir}, split: test, direction: i2t, mode: global}}\n")
    args = ["eval", "--tasks", tasks, "--model", "tiny-random-composed", "--out", tmp_path / "res",
            "--cache-dir", tmp_path / "cache", "--json"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    first = json.loads(out)
    assert first["embedded_now"] == 12 + 4 + 4 + 12  # captions+images as queries and as candidates
    assert set(first["averages"]) == {"retrieval", "overall"}
    t2i = json.loads((tmp_path / "res" / "t2i.json").read_text())
    assert t2i["counts"] == {"queries": 12, "unique_queries": 12, "unique_candidates": 4, "candidates_per_query": 4}
    assert len(t2i["predictions"]) == 12 and 0 <= t2i["score"] <= 1
    assert "| t2i | retrieval | local | 12 | 4 |" in (tmp_path / "res" / "results.md").read_text()
    code, out, _ = run_cli(*args)
    second = json.loads(out)
    assert second["embedded_now"] == 0 and second["tasks"] == first["tasks"]


def test_eval_rerank_needs_a_reranker_folder(run_cli, tmp_path, caption_dir):
    from magic_mm import MagicEmbedder

    folder = tmp_path / "embedder-only"
    MagicEmbedder.from_pretrained("tiny-random-composed").save_pretrained(folder)
    tasks = write_yaml(tmp_path / "t.yaml", f"tasks:\n  - {{name: a, captions: {caption_dir}, split: test}}\n")
    code, _, err = run_cli("eval", "--tasks", tasks, "--model", folder, "--rerank", "--out", tmp_path / "out")
    assert code == 2 and "not a reranker folder" in err and "Traceback" not in err


def test_convert_captions_command_writes_a_readable_task(run_cli, tmp_path, caption_dir):
    out = tmp_path / "elsewhere" / "i2t.parquet"
    code, stdout, err = run_cli("convert", "captions", caption_dir, "--direction", "i2t", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["rows"] == 4
    rows = read_task(out)  # image paths were written relative to the file, so no image_root is needed
    assert rows[0].query.image.resolve() == (caption_dir / "images" / "p0.png").resolve()
    code, _, err = run_cli("convert", "captions", caption_dir, "--candidates", "1", "--out", out)
    assert code == 2 and "--candidates 1" in err


def test_convert_labels_command(run_cli, tmp_path, image_dir):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\ni0.png,cat\ni1.png,dog\n")
    out = tmp_path / "cls.jsonl"
    code, _, err = run_cli("convert", "labels", labels, "--image-root", image_dir, "--out", out)
    assert code == 0, err
    assert [c.text for c in read_task(out)[1].candidates] == ["dog", "cat"]


class ReverseReranker:
    """Puts the embedder's top k in reverse order (and records what it was asked)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def rerank(self, query, candidates, top_k):
        from types import SimpleNamespace

        self.calls.append((query.text, [c.text for c in candidates]))
        return [SimpleNamespace(index=i, score=-i) for i in reversed(range(top_k))]


def test_rerank_reorders_only_the_embedders_top_five():
    cands = [t(f"c{i}") for i in range(7)]
    table = {"q": [1, 0]} | {f"c{i}": [1, 0.1 * (i + 1)] for i in range(7)}  # c0 most similar, c6 least
    rows = [TaskRow(t("q"), cands, [1, 0, 0, 0, 0, 0, 0])]
    plain, preds, _ = evaluate_rows(rows, encoder(LookupModel(table)), "local", ks=(1, 5))
    assert plain["hit@1"] == 1.0
    reranker = ReverseReranker()
    reranked, preds, _ = evaluate_rows(rows, encoder(LookupModel(table)), "local", ks=(1, 5), reranker=reranker)
    assert reranker.calls == [("q", ["c0", "c1", "c2", "c3", "c4"])]
    assert [p["candidate"] for p in preds[0]["top"]] == ["'c4'", "'c3'", "'c2'", "'c1'", "'c0'"]
    assert reranked["hit@1"] == 0.0 and reranked["hit@5"] == 1.0 and reranked["mrr"] == pytest.approx(1 / 5)


def test_eval_unknown_primary_metric_fails_before_embedding(run_cli, tmp_path, caption_dir):
    tasks = write_yaml(tmp_path / "t.yaml", f"tasks:\n  - {{name: a, captions: {caption_dir}, primary: precision@3}}\n")
    code, _, err = run_cli("eval", "--tasks", tasks, "--model", "/no/such/model", "--out", tmp_path)
    assert code == 2 and "primary metric 'precision@3' unknown" in err and "hit@1" in err


def test_eval_rerank_with_the_real_reranker(run_cli, tmp_path, caption_dir, monkeypatch):
    import magic_mm

    if not hasattr(magic_mm, "MagicReranker"):
        pytest.skip("magic_mm.MagicReranker is not in this version")
    calls = []
    original = magic_mm.MagicReranker.rerank

    def counting(self, query, candidates, top_k=5):
        calls.append(len(candidates))
        return original(self, query, candidates, top_k)

    monkeypatch.setattr(magic_mm.MagicReranker, "rerank", counting)
    folder = tmp_path / "model"  # a reranker folder is an embedder folder plus reranker.json
    magic_mm.MagicReranker(magic_mm.MagicEmbedder.from_pretrained("tiny-random-composed")).save_pretrained(folder)
    tasks = write_yaml(tmp_path / "t.yaml", f"tasks:\n  - {{name: a, captions: {caption_dir}, split: test, limit: 3}}\n")
    base = ["eval", "--tasks", tasks, "--model", folder, "--no-cache", "--json"]
    code, out, err = run_cli(*base, "--out", tmp_path / "plain")
    assert code == 0, err
    code, out2, err = run_cli(*base, "--rerank", "--out", tmp_path / "rr")
    assert code == 0, err
    plain, reranked = json.loads(out), json.loads(out2)
    assert reranked["rerank"] is True and calls == [4, 4, 4]  # each query's top 5 (of 4 candidates)
    # The reranker only reorders the top 5 of 4 candidates: hit@5 (all of them) cannot change.
    assert reranked["tasks"]["a"]["metrics"]["hit@5"] == plain["tasks"]["a"]["metrics"]["hit@5"] == 1.0
    code, _, err = run_cli("eval", "--tasks", tasks, "--model", "tiny-random-composed", "--rerank", "--out", tmp_path)
    assert code == 2 and "reranker" in err
