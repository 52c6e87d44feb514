"""One optimiser step of every training stage on every backbone family, with and without
cached vision grids; and the optimiser's learning-rate groups.

Tiny random models, three toy images, one step: these check that each stage runs on
each family and moves what it trains, not that it learns (test_train.py does that).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic_mm.model.backbones import backbone_class
from magic_mm.train.config import TrainConfig, from_dict

FAMILIES = [("composed", None), ("internvl", None), ("qwen_vl", "qwen2_vl"), ("qwen_vl", "qwen2_5_vl"),
            ("qwen_vl", "qwen3_vl"), ("idefics3", "smolvlm")]
IDS = [variant or family for family, variant in FAMILIES]
STAGES = ["stage1", "stage2", "stage3", "reranker"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three images of different sizes (so their token counts differ), one caption each."""
    root = tmp_path_factory.mktemp("family-data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    with (root / "captions.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "caption"])
        for name, size in (("wide", (96, 48)), ("tall", (48, 80)), ("square", (64, 64))):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
            rows.writerow([f"{name}.png", f"a {name} picture"])
    return root


def base_config(family: str, variant: str | None) -> dict:
    spec = backbone_class(family).tiny_spec()
    if variant is not None:
        spec = {**spec, "variant": variant}
    return {"family": family, "backbone": spec, "name": f"tiny-{variant or family}"}


def train_config(data: Path, out: Path, stage: str, family: str, variant: str | None, cache: bool,
                 **extra: object) -> TrainConfig:
    raw = {"stage": stage, "output": str(out), "base": base_config(family, variant), "data": {"folder": str(data), "split": None},
           "steps": 1, "batch_size": 2, "cache_vision": cache, "show_progress": False, "checkpoint_every": 100,
           "lora": {"rank": 2, "alpha": 4}, "optim": {"lr": 1e-2, "connector_lr": 1e-2, "max_grad_norm": 0},
           **extra}
    config = from_dict(TrainConfig, raw, "test")
    config.validate()
    return config


def stage_settings(stage: str, judge: Path) -> dict:
    if stage == "stage1":
        return {"stage1": {"max_answer_tokens": 4}}
    if stage == "stage3":
        return {"stage3": {"retrieve_top": 2, "hard_negatives": 1, "max_queries": 2,
                           "judge": {"kind": "self", "model": str(judge)}},
                "hard_negatives": {"queries_per_group": 1}}
    if stage == "reranker":
        return {"reranker": {"negatives": [1, 1]}}
    return {}


@pytest.fixture(scope="module")
def judges(tmp_path_factory):  # noqa: ANN201
    """A saved (untrained) model of each family, as stage 3's self-judge."""
    from magic_mm import MagicEmbedder
    from magic_mm.model.config import EmbedderConfig

    made: dict[str, Path] = {}

    def judge(family: str, variant: str | None) -> Path:
        key = variant or family
        if key not in made:
            model = MagicEmbedder.from_config(EmbedderConfig(**base_config(family, variant)))
            made[key] = model.save_pretrained(tmp_path_factory.mktemp(f"judge-{key}"))
        return made[key]

    return judge


# Every family with cached grids (the default), and without them for the default family and the
# tiled one: how the trainers feed images without a cache does not depend on the family, and that
# a cached grid embeds like its image is checked for every family in test_lm_batch.py.
CASES = [(f, v, True) for f, v in FAMILIES] + [("composed", None, False), ("idefics3", "smolvlm", False)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("family", "variant", "cache"), CASES,
                         ids=[f"{v or f}-{'cached' if c else 'uncached'}" for f, v, c in CASES])
def test_one_step_of_every_stage_moves_the_trained_weights(family, variant, cache, stage, data, judges, tmp_path):
    """Idefics3/SmolVLM with ``cache_vision: true`` used to fail (its encode_images refused cached grids)."""
    from magic_mm.train.registry import TRAINERS

    config = train_config(data, tmp_path / "run", stage, family, variant, cache,
                          **stage_settings(stage, judges(family, variant)))
    trainer = TRAINERS[stage](config)
    before = {k: v.clone() for k, v in trainer.embedder.trained_state_dict().items()}
    trainer.run()
    after = trainer.embedder.trained_state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    connector = {k for k in before if not k.startswith("lora.")}
    assert connector and connector <= moved, sorted(connector - moved)  # every connector / merger tensor
    assert any(k.startswith("lora.") for k in moved)  # and the LM's LoRA
    assert np.isfinite(trainer.embedder.trained_state_dict()[sorted(connector)[0]].numpy()).all()


@pytest.mark.parametrize(("family", "variant", "expected"), [
    ("composed", None, "connector."), ("internvl", None, "projector."),
    ("qwen_vl", "qwen3_vl", ("merger.", "deepstack_mergers.")), ("idefics3", "smolvlm", "connector.")])
def test_optimiser_groups_come_from_the_backbones_trainable_modules(family, variant, expected, data, tmp_path):
    """Qwen-VL's merger is its connector: it gets ``connector_lr``, not LoRA's ``lr``."""
    from magic_mm.train.registry import TRAINERS

    config = train_config(data, tmp_path / "run", "stage2", family, variant, False,
                          optim={"lr": 1e-4, "connector_lr": 3e-3})
    trainer = TRAINERS["stage2"](config)
    names = {id(p): name for name, p in trainer.embedder.trained_parameters().items()}
    by_lr = {group["lr"]: {names[id(p)] for p in group["params"]} for group in trainer.optimizer.param_groups}
    assert set(by_lr) == {3e-3, 1e-4}
    assert by_lr[3e-3] and all(name.startswith(expected) for name in by_lr[3e-3])
    assert by_lr[1e-4] and all(name.startswith("lora.") for name in by_lr[1e-4])
    assert by_lr[3e-3] | by_lr[1e-4] == set(names.values())
