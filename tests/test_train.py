"""Training recipe on tiny random models: losses fall, mining rules, judge, resume, GradCache."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic_mm.train.config import ConfigError, TrainConfig, from_dict, load_config
from magic_mm.train.judge import CachedJudge, Judge, decide, openai_yes_no
from magic_mm.train.losses import group_mask, info_nce
from magic_mm.train.mining import eligible_ranking, mine_hard_negatives, positive_aware_caps, sample_window

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30),
           "black": (10, 10, 10), "white": (245, 245, 245), "purple": (140, 30, 160), "orange": (250, 140, 20)}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """Eight flat-colour images, two captions each, all in the train split."""
    root = tmp_path_factory.mktemp("toy")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    with (root / "captions.csv").open("w", newline="") as f, (root / "splits.csv").open("w", newline="") as g:
        caps, splits = csv.writer(f), csv.writer(g)
        caps.writerow(["image", "caption"])
        splits.writerow(["image", "split"])
        for name, colour in COLOURS.items():
            pixels = (np.array(colour)[None, None] + rng.integers(-10, 10, (48, 48, 3))).clip(0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / f"{name}.jpg")
            caps.writerows([[f"{name}.jpg", f"a {name} square"], [f"{name}.jpg", f"all {name}"]])
            splits.writerow([f"{name}.jpg", "train"])
    return root


@pytest.fixture(scope="module")
def toy_grids(toy_data) -> Path:
    """Distinct vision grids for the toy images.

    The tiny random EfficientNet's features are ~1e-9 for every image (so every toy
    image would look the same); training reads grids from the vision cache, so
    the tests give it distinguishable ones, as a pretrained encoder would.
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    grids = {str(toy_data / "images" / f"{name}.jpg"): torch.randn(1, 4, 4, 1280, generator=generator)
             for name in COLOURS}
    path = toy_data / "grids.safetensors"
    save_file(grids, path)
    return path


def toy_config(data: Path, out: Path, stage: str = "stage2", **extra) -> TrainConfig:
    raw = {"stage": stage, "output": str(out), "model": "tiny-random-composed", "data": {"folder": str(data)},
           "vision_cache_file": str(data / "grids.safetensors"),
           "steps": 8, "batch_size": 4, "temperature": 0.1, "checkpoint_every": 3, "show_progress": False,
           "optim": {"lr": 1e-3, "connector_lr": 1e-3}, **extra}
    config = from_dict(TrainConfig, raw, "test")
    config.validate()
    return config


def trainer(config: TrainConfig):  # noqa: ANN201
    from magic_mm.train.registry import TRAINERS

    return TRAINERS[config.stage](config)


def contrastive_loss(t) -> float:  # noqa: ANN001
    """InfoNCE of every toy caption against every toy image (fixed, for before/after)."""
    pool = t.data.pool(0)  # the toy folder as a one-sub-dataset mixture: captions → their images
    with torch.no_grad():
        q = t.embed([t.side_input(x) for x in pool.queries], "query")
        c = t.embed([t.side_input(x) for x in pool.candidates], "candidate")
    return float(info_nce(q, c, torch.tensor(pool.owner), 0.1))


# -- losses and mining ------------------------------------------------------------------
def test_info_nce_masks_group_members():
    q = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0])
    unmasked = info_nce(q, c, targets, 1.0)
    mask = group_mask(torch.tensor([7]), torch.tensor([7, 7, 3]), targets)
    assert mask.tolist() == [[False, True, False]]  # same group, not the target
    masked = info_nce(q, c, targets, 1.0, mask)
    assert masked < unmasked
    assert masked == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-5)


def test_mining_drops_ground_truth_and_its_group():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    groups = ["a", "a", "b", "c", "a", "d"]  # the query belongs to group a
    ranking = eligible_ranking(scores, "a", groups)
    assert ranking.tolist() == [2, 3, 5]
    mined = mine_hard_negatives(np.stack([scores] * 20), ["a"] * 20, groups, window=(0, 2), count=2, seed=1)
    for row in mined:
        assert len(row) == 2 and set(row) <= {2, 3} and len(set(row)) == 2


def test_mining_samples_only_inside_the_window():
    n = 200
    scores = np.linspace(1, 0, n)[None]  # candidate i has rank i
    groups = list(range(n))
    for seed in range(10):
        row = mine_hard_negatives(scores, [0], groups, window=(50, 100), count=2, seed=seed)[0]
        # group 0 (the ground truth at rank 0) is removed, so ranks shift by one
        assert all(51 <= c <= 100 for c in row) and len(set(row)) == 2


def test_positive_aware_mining_skips_candidates_near_the_positive():
    # the positive (candidate 3) scores 0.5; candidates 0-2 score above 0.95 * 0.5 and are
    # likely unlabelled matches, so the window starts at candidate 4
    scores = np.array([[0.9, 0.6, 0.48, 0.5, 0.47, 0.3, 0.2, 0.1]])
    caps = positive_aware_caps(scores, [3], 0.95)
    assert caps == pytest.approx([0.475])
    plain = mine_hard_negatives(scores, [3], list(range(8)), window=(0, 2), count=2, seed=0)[0]
    aware = mine_hard_negatives(scores, [3], list(range(8)), window=(0, 2), count=2, seed=0, score_caps=caps)[0]
    assert sorted(plain) == [0, 1] and sorted(aware) == [4, 5]
    # a positive scoring below zero caps at its own score rather than above it
    assert positive_aware_caps(np.array([[0.1, -0.2]]), [1], 0.95) == pytest.approx([-0.2])


def test_positive_aware_ratio_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="max_positive_ratio"):
        from_dict(TrainConfig, {"stage": "stage2", "output": str(tmp_path),
                                "hard_negatives": {"max_positive_ratio": 1.5}}, "test").validate()
    config = from_dict(TrainConfig, {"stage": "stage2", "output": str(tmp_path),
                                     "hard_negatives": {"max_positive_ratio": "0.95"}}, "test")
    config.validate()
    assert config.hard_negatives.max_positive_ratio == 0.95


def test_small_pool_slides_the_window_to_its_end():
    rng = np.random.default_rng(0)
    ranking = np.arange(30)
    picked = sample_window(ranking, (50, 100), 2, rng)
    assert len(picked) == 2 and all(0 <= p < 30 for p in picked)
    assert sample_window(np.arange(1), (0, 5), 3, rng) == [0]


# -- judge ------------------------------------------------------------------------------
def test_judge_decision_is_logit_yes_above_no():
    assert decide(2.0, 1.0) is True
    assert decide(-1.0, 0.5) is False
    assert decide(0.3, 0.3) is False  # a tie is not relevant


def test_openai_reply_is_read_from_top_logprobs():
    reply = {"choices": [{"message": {"content": "No"}, "logprobs": {"content": [{"top_logprobs": [
        {"token": "No", "logprob": -0.2}, {"token": " yes", "logprob": -1.9}]}]}}]}
    yes, no = openai_yes_no(reply)
    assert (yes, no) == (-1.9, -0.2) and not decide(yes, no)
    bare = {"choices": [{"message": {"content": "Yes."}}]}
    assert decide(*openai_yes_no(bare))


def test_judge_verdicts_are_cached_on_disk(tmp_path):
    class Counting(Judge):
        name = "counting"

        def __init__(self) -> None:
            self.calls = 0

        def logits(self, question, image):  # noqa: ANN001, ANN202
            self.calls += 1
            return (1.0, 0.0) if "dog" in question else (0.0, 1.0)

    judge = Counting()
    cached = CachedJudge(judge, tmp_path / "cache.jsonl")
    assert cached("a dog?", Path("x.jpg")).relevant and not cached("a cat?", Path("x.jpg")).relevant
    cached("a dog?", Path("x.jpg"))
    assert judge.calls == 2
    again = CachedJudge(judge, tmp_path / "cache.jsonl")  # a rerun reads the file
    assert again("a dog?", Path("x.jpg")).relevant and judge.calls == 2
    # many(): one call per unseen pair, in order, duplicates asked once
    verdicts = again.many("a dog?", [Path("x.jpg"), Path("y.jpg"), Path("y.jpg"), Path("z.jpg")])
    assert [v.relevant for v in verdicts] == [True] * 4 and judge.calls == 4


def test_calibrated_threshold_undoes_a_yes_bias():
    from magic_mm.train.judge import Verdict, calibrated_threshold

    matched = [Verdict(5.0 + m, 0.0) for m in (1.0, 1.5, 2.0)]  # says yes to everything...
    mismatched = [Verdict(5.0 + m, 0.0) for m in (-1.0, 0.2, -0.5)]  # ...but ranks matches higher
    assert all(v.relevant for v in matched + mismatched)  # the paper's cut at 0 keeps them all
    cut, accuracy = calibrated_threshold(matched, mismatched)
    assert 5.2 < cut < 6.0 and accuracy == 1.0
    assert [v.margin > cut for v in matched + mismatched] == [True] * 3 + [False] * 3
    unbiased, _ = calibrated_threshold([Verdict(1.0, 0.0)], [Verdict(-1.0, 0.0)])
    assert unbiased == 0.0  # ties between equally good cuts go to the one nearest 0
    with pytest.raises(ValueError):
        calibrated_threshold([], mismatched)


# -- configs ----------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "match"), [
    ("stage: stage2\nbatch_sise: 4", "batch_sise"),
    ("stage: stage2\nhard_negatives: {window: [100, 50]}", "window"),
    ("stage: stage2\nmixed_precision: fp64", "mixed_precision"),
    ("stage: stage3\nstage3: {max_queries: 0}", "max_queries"),
    ("stage: stage2\nsnapshot_steps: [0]", "snapshot_steps"),
    ("stage: stage2\nhard_negatives: {schedule: cyclic}", "schedule"),
    ("stage: stage2\nhard_negatives: {lr_scale: 0}", "lr_scale"),
    ("stage: stage2\noptim: {lr: fast}", "optim.lr: expected a number, got 'fast'"),
    ("stage: stage2\nsteps: 2.5", "steps: expected a whole number"),
    ("stage: stage2\nsteps: true", "steps: expected a number"),
    ("stage: stage2\ntemperature: .inf", "temperature: expected a number"),
])
def test_config_rejects_unknown_keys_and_bad_values(tmp_path, body, match):
    path = tmp_path / "c.yaml"
    path.write_text(f"output: out\n{body}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_config_stage_mismatch_missing_file_and_yaml_no(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: stage1\noutput: out\n")
    with pytest.raises(ConfigError, match="magic-mm train stage1"):
        load_config(path, expect_stage="stage2")
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")

    path.write_text("stage: stage2\noutput: out\nmixed_precision: no\n")  # YAML's bare `no` is false
    assert load_config(path).mixed_precision == "no"


def test_config_overrides_merge_nested_keys(tmp_path):
    from magic_mm.train.config import parse_overrides

    path = tmp_path / "c.yaml"
    path.write_text("stage: stage2\noutput: out\noptim: {lr: 1.0e-4, connector_lr: 1.0e-3}\n")
    config = load_config(path, overrides=parse_overrides(["optim.lr=0.5", "compression=none", "output=elsewhere"]))
    assert (config.optim.lr, config.optim.connector_lr) == (0.5, 1e-3)  # nested keys merge, siblings stay
    assert (config.compression, config.output) == ("none", "elsewhere")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, overrides=parse_overrides(["optim.lrr=1"]))
    # YAML 1.1 reads 1e-3 (no dot) as a string: numeric fields take it as the number it spells
    config = load_config(path, overrides=parse_overrides(["optim.lr=1e-3", "steps=12", "temperature=5e-2"]))
    assert (config.optim.lr, config.steps, config.temperature) == (1e-3, 12, 0.05)
    assert isinstance(config.optim.lr, float) and isinstance(config.steps, int)


def test_cli_stop_after_saves_a_checkpoint_and_the_same_command_resumes(run_cli, toy_data, toy_grids, tmp_path):
    import yaml

    out = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "stage2", "output": str(out), "model": "tiny-random-composed", "data": {"folder": str(toy_data)},
        "vision_cache_file": str(toy_grids), "steps": 4, "batch_size": 4, "checkpoint_every": 3}))
    code, stdout, err = run_cli("train", "stage2", "--config", path, "--stop-after", 2, "--quiet",
                                "--set", "snapshot_steps=[2]")
    assert code == 0, err
    assert "stopped after step 2 of 4" in stdout and "resume" in stdout
    assert not (out / "model").exists()
    assert (out / "model-step2" / "weights.safetensors").is_file()  # the snapshot
    code, stdout, err = run_cli("train", "stage2", "--config", path, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["finished"] and summary["steps"] == 4 and summary["last"]["step"] == 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the checkpoint at step 2 (not 3): nothing lost or repeated


def test_cli_reports_a_bad_config_without_traceback(run_cli, tmp_path):
    code, _, err = run_cli("train", "stage2", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "no such config file" in err and "Traceback" not in err


# -- the stages -------------------------------------------------------------------------
def test_stage2_loss_goes_down_and_mines_hard_negatives(toy_data, toy_grids, tmp_path):
    config = toy_config(toy_data, tmp_path / "s2", steps=10, batch_size=8,
                        hard_negatives={"steps": 2, "window": [1, 4], "count": 2})
    t = trainer(config)
    t.prepare_run()
    before = contrastive_loss(t)
    folder = t.run()
    after = contrastive_loss(t)
    assert after < before - 0.2, (before, after)
    from magic_mm.train.stage2 import negatives_from_json

    negatives = negatives_from_json(json.loads((tmp_path / "s2" / "hard_negatives.json").read_text()))
    assert list(negatives) == [toy_data.name]  # the caption folder is a sub-dataset named after the folder
    rows = {row.index: row for row in t.data.readers[0]}
    assert sorted(negatives[toy_data.name]) == sorted(rows)  # every caption mined
    for r, negs in negatives[toy_data.name].items():
        assert rows[r].positive not in negs and len(negs) == 2 and all(n.image is not None for n in negs)
    assert (tmp_path / "s2" / "model-in-batch" / "weights.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "s2" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13)) and all("lr" in r for r in log)
    from magic_mm import MagicEmbedder

    saved = MagicEmbedder.from_pretrained(folder)
    assert saved.config.lora is not None


@pytest.mark.parametrize("schedule", ["continue", "restart"])
def test_hard_negative_phase_schedule(toy_data, toy_grids, tmp_path, schedule):
    """"continue" decays one cosine over both phases; "restart" gives the mined-negative phase its
    own cosine, peaking at lr_scale × lr (the learning rates logged are the ones the steps used)."""
    config = toy_config(toy_data, tmp_path / "s2", steps=4, batch_size=4,
                        hard_negatives={"steps": 3, "window": [1, 4], "count": 1, "schedule": schedule, "lr_scale": 0.5})
    trainer(config).run()
    log = [json.loads(line) for line in (tmp_path / "s2" / "train_log.jsonl").read_text().splitlines()]
    cos = [0.5 * (1 + math.cos(math.pi * k / n)) for n, k in ((4, 0), (4, 1), (4, 2), (4, 3))]
    if schedule == "restart":
        expected = cos + [0.5 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    else:
        expected = [0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(7)]
    assert [r["lr"] for r in log] == pytest.approx([1e-3 * f for f in expected])
    assert [r["hard_negative_phase"] for r in log] == [0.0] * 4 + [1.0] * 3


def test_stage1_loss_goes_down(toy_data, toy_grids, tmp_path):
    config = toy_config(toy_data, tmp_path / "s1", stage="stage1", steps=10,
                        stage1={"text_instructions": [{"prompt": "Say hi.", "answer": "hi"}]})
    t = trainer(config)
    t.prepare_run()
    from magic_mm.model.generative import answer_loss, build_batch, logits
    from magic_mm.train.losses import answer_token_loss

    def loss() -> float:
        with torch.no_grad():
            examples = [t.example(d, row) for d, reader in enumerate(t.data.readers) for row in reader]
            batch = build_batch(t.embedder, examples)
            full = float(answer_token_loss(logits(t.embedder, batch), batch.labels))
            # the trainers' loss runs the LM head only where answer tokens are predicted
            assert float(answer_loss(t.embedder, batch)) == pytest.approx(full, rel=1e-5)
            return full

    before = loss()
    t.run()
    assert loss() < before - 0.1
    # the text instructions are a second, text-kind sub-dataset, weighted by its size (1 vs 16 captions)
    assert t.data.names == [toy_data.name, "text-instructions"] and t.kinds == ["caption", "text"]
    assert [s.weight for s in t.data.specs] == [16.0, 1.0]
    assert t.parts(1, t.data.readers[1].rows([0])[0]) == (None, "Say hi.", "hi")


def test_stage3_judges_and_trains_and_reranker_learns(toy_data, toy_grids, tmp_path):
    from magic_mm.model.reranker import MagicReranker

    base = toy_config(toy_data, tmp_path / "base", stage="stage1", steps=1)
    judge_folder = trainer(base).run()  # a (barely) stage-1 model as the judge
    config = toy_config(toy_data, tmp_path / "s3", stage="stage3", steps=4, stage3={
        "retrieve_top": 3, "hard_negatives": 2, "task": "colours",
        "instructions": {"colours": {"query": "Find the colour.", "candidate": "Represent the colour."}},
        "judge": {"kind": "self", "model": str(judge_folder)}}, hard_negatives={"queries_per_group": 1})
    t = trainer(config)
    assert t.instructions() == ("Find the colour.", "Represent the colour.")  # the table, under the task's name
    t.run()
    judged = json.loads((tmp_path / "s3" / "judgements.json").read_text())[toy_data.name]
    assert len(judged) == 8  # one caption per image
    rows = {row.index: row for row in t.data.readers[0]}
    for q, j in judged.items():
        owner = {"text": None, "image": str(rows[int(q)].positive.image)}
        assert j["positive"] == [owner]  # the ground truth stays the only InfoNCE positive
        assert owner not in j["negatives"] and owner not in j["judged_relevant"]
        names = lambda items: {i["image"] for i in items}  # noqa: E731
        assert not names(j["negatives"]) & names(j["judged_relevant"]) and len(j["negatives"]) <= 2
    cache_lines = (tmp_path / "s3" / "judge_cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == 8 * 3

    rr = toy_config(toy_data, tmp_path / "rr", stage="reranker", model=str(judge_folder), steps=6,
                    reranker={"candidates_from": str(tmp_path / "s3"), "negatives": [2, 3]})
    rt = trainer(rr)
    rt.prepare_run()
    assert rt.rows == [sorted(int(q) for q in judged)]
    rt.run()
    log = [json.loads(line) for line in (tmp_path / "rr" / "train_log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    reranker = MagicReranker.from_pretrained(tmp_path / "rr" / "model")
    hits = reranker.rerank("a red square", [toy_data / "images" / f"{c}.jpg" for c in COLOURS], top_k=3)
    assert sorted(h.index for h in hits) == [0, 1, 2]
    # Each score recomputed from a full-sequence forward: logit("Yes") - logit("No") at the prompt's end,
    # one candidate at a time; the hits come in that order (a shuffled or inverted reranker fails).
    from magic_mm.model.generative import build_batch, logits

    query = reranker.model.prepare(["a red square"])[0]
    yes, no = (reranker.model.backbone.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    alone = []
    with torch.no_grad():
        for c in reranker.model.prepare([toy_data / "images" / f"{c}.jpg" for c in list(COLOURS)[:3]]):
            batch = build_batch(reranker.model, [reranker.pointwise_example(query, c)])
            row = logits(reranker.model, batch)[0, int(batch.prompt_end[0])]
            alone.append(float(row[yes] - row[no]))
    assert [h.index for h in hits] == sorted(range(3), key=lambda i: -alone[i])
    assert [h.score for h in hits] == pytest.approx([alone[h.index] for h in hits], abs=1e-4)

    sampled = toy_config(toy_data, tmp_path / "s3-sample", stage="stage3", steps=1, stage3={
        "retrieve_top": 3, "max_queries": 3, "judge": {"kind": "self", "model": str(judge_folder), "calibrate": 4}},
        hard_negatives={"queries_per_group": 1})
    trainer(sampled).run()
    picked = json.loads((tmp_path / "s3-sample" / "judgements.json").read_text())[toy_data.name]
    assert len(picked) == 3 and set(picked) <= set(judged)  # a sample of the one-caption-per-image queries
    calibration = json.loads((tmp_path / "s3-sample" / "judge_calibration.json").read_text())
    assert calibration["pairs"] == 3  # capped at the 3 sampled queries
    cached = [json.loads(line) for line in (tmp_path / "s3-sample" / "judge_cache.jsonl").read_text().splitlines()]
    # The calibration asks first, a (match, mismatch) pair per query: recount its numbers from those verdicts.
    template = sampled.stage3.judge.question
    owner_image = {template.format(query=rows[int(q)].query.text): str(rows[int(q)].positive.image) for q in picked}
    matched = [r["yes"] - r["no"] for r in cached[0:6:2]]
    mismatched = [r["yes"] - r["no"] for r in cached[1:6:2]]
    assert [r["candidate"] for r in cached[0:6:2]] == [owner_image[r["question"]] for r in cached[0:6:2]]
    assert all(r["candidate"] != owner_image[r["question"]] for r in cached[1:6:2])
    cut = calibration["threshold"]

    def right(c: float) -> int:
        return sum(m > c for m in matched) + sum(m <= c for m in mismatched)

    assert calibration["accuracy"] == pytest.approx(right(cut) / 6)
    assert right(cut) == max(right(c) for c in [min(matched + mismatched) - 1, *matched, *mismatched])  # the best cut
    assert calibration["mean_margin_matched"] == pytest.approx(np.mean(matched))
    assert calibration["mean_margin_mismatched"] == pytest.approx(np.mean(mismatched))
    margins = {(r["question"], r["candidate"]): r["yes"] - r["no"] for r in cached}
    for q, j in picked.items():  # judged relevant iff the margin clears the calibrated cut
        question = sampled.stage3.judge.question.format(query=rows[int(q)].query.text)
        for c in j["judged_relevant"]:
            assert margins[(question, c["image"])] > calibration["threshold"]
        for c in j["negatives"]:
            assert margins[(question, c["image"])] <= calibration["threshold"]


def test_reranker_folder_errors(tmp_path):
    from magic_mm.errors import ModelFolderError
    from magic_mm.model.reranker import MagicReranker

    with pytest.raises(ModelFolderError, match="not a reranker folder"):
        MagicReranker.from_pretrained(tmp_path)


# -- resume and GradCache ---------------------------------------------------------------
def test_resume_after_a_kill_matches_an_uninterrupted_run(toy_data, toy_grids, tmp_path):
    from magic_mm.train.loop import StopTraining

    extra = {"steps": 5, "hard_negatives": {"steps": 3, "window": [1, 4], "count": 1}, "checkpoint_every": 2}
    whole = trainer(toy_config(toy_data, tmp_path / "whole", **extra))
    whole.run()
    first = trainer(toy_config(toy_data, tmp_path / "split", **extra))
    with pytest.raises(StopTraining):
        first.run(stop_after=5)  # killed after step 5; the last checkpoint is step 4
    resumed = trainer(toy_config(toy_data, tmp_path / "split", **extra))
    resumed.run()
    a, b = whole.trained_state(), resumed.trained_state()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))  # no step lost or repeated
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in whole_log], rel=1e-4)


def test_gradcache_gives_the_gradients_of_a_plain_step(toy_data, toy_grids, tmp_path):
    grads = []
    for chunk in (None, 2):
        t = trainer(toy_config(toy_data, tmp_path / f"gc{chunk}", grad_cache_chunk=chunk, batch_size=6))
        t.prepare_run()
        t.train_step(0)
        grads.append({k: p.grad.clone() for k, p in t.embedder.trained_parameters().items() if p.grad is not None})
    plain, cached = grads
    assert plain.keys() == cached.keys() and plain
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=1e-6)


def test_training_keeps_float32_weights_where_inference_would_pick_bf16(toy_data, toy_grids, tmp_path, monkeypatch):
    """On a bf16 CPU the inference default is bf16 weights; AdamW needs float32 master weights."""
    from conftest import skip_without_cpu_bf16

    skip_without_cpu_bf16()
    monkeypatch.setenv("MAGIC_MM_DTYPE", "bfloat16")  # what "auto" resolves to on this machine
    from magic_mm import MagicEmbedder

    MagicEmbedder.from_pretrained("tiny-random-composed").save_pretrained(tmp_path / "start")
    t = trainer(toy_config(toy_data, tmp_path / "s2", model=str(tmp_path / "start")))
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
