"""Checks every MLLM backbone family must pass (used by test_qwen_vl.py and test_idefics3.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import make_image
from magic_mm import MagicEmbedder, MMInput
from magic_mm.model.config import EmbedderConfig, LoraSettings


def tiny(family: str, variant: str, compression: str, **spec: object) -> MagicEmbedder:
    config = EmbedderConfig(family=family, backbone={"base": "tiny-random", "variant": variant, **spec},
                            name=f"tiny-random-{family}-{variant}")
    return MagicEmbedder.from_config(config, compression).eval()


def mixed_inputs() -> list:
    return [
        make_image(150, 100, seed=1),
        "a dog runs across the grass",
        (make_image(64, 128, seed=2), "a tall picture with a caption"),
        MMInput(image=make_image(200, 200, seed=3), text="a square picture"),
        make_image(300, 60, seed=4),
    ]


def assert_batch_invariant(model: MagicEmbedder) -> None:
    """Same vector (1e-4) alone, in one batch, and in another order and batch size."""
    inputs = mixed_inputs()
    together = model.encode(inputs, batch_size=len(inputs), role="candidate")
    alone = np.concatenate([model.encode([x], role="candidate") for x in inputs])
    order = [3, 0, 4, 2, 1]
    shuffled = model.encode([inputs[i] for i in order], batch_size=3, role="candidate")
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(shuffled, together[order], atol=1e-4)
    assert np.abs(together[0] - together[4]).max() > 1e-3  # distinct inputs stay distinct


def info_nce_step(model: MagicEmbedder, lr: float = 1e-2) -> tuple[float, float]:
    """One stage-2 step with LoRA (the trainer's InfoNCE, τ = 0.03, in-batch negatives) → loss before, after."""
    from magic_mm.train.losses import info_nce

    model.add_lora(LoraSettings(rank=4, alpha=8))
    model.train()
    params = list(model.trained_parameters().values())
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=lr)
    queries = model.prepare(["a red square", "a tall picture", "a wide strip"])
    candidates = model.prepare([make_image(80, 80, seed=5), make_image(64, 128, seed=6), make_image(200, 50, seed=7)])

    def loss() -> torch.Tensor:
        q, c = model.embed_prepared(queries, "query"), model.embed_prepared(candidates, "candidate")
        return info_nce(q, c, torch.arange(len(q)), temperature=0.03)

    before = loss()
    optimiser.zero_grad()
    before.backward()
    grads = {name: p.grad for name, p in model.trained_parameters().items()}
    assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.startswith("lora.")), "no LoRA grad"
    assert any(g is not None and g.abs().sum() > 0 for k, g in grads.items() if not k.startswith("lora."))
    optimiser.step()
    with torch.no_grad():
        after = loss()
    model.eval()
    return before.item(), after.item()


def assert_round_trip(model: MagicEmbedder, folder: Path) -> None:
    """save_pretrained → from_pretrained gives the same vectors, and saves only trained weights."""
    inputs = mixed_inputs()[:3]
    expected = model.encode(inputs, role="candidate")
    model.save_pretrained(folder)
    loaded = MagicEmbedder.from_pretrained(folder)
    np.testing.assert_allclose(loaded.encode(inputs, role="candidate"), expected, atol=1e-5)
    assert loaded.config.family == model.config.family and loaded.config.backbone == model.config.backbone
    from safetensors.torch import load_file

    saved = load_file(folder / "weights.safetensors")
    assert set(saved) == set(model.trained_parameters())
    assert any(k.startswith("lora.") for k in saved)
