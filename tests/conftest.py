"""Shared fixtures. Nothing here reaches the network: weights come from installed packages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# "auto" dtype means float32 in the suite (also in CLI subprocesses), so the exact-equality and
# batch-invariance checks keep their tolerances; bf16 is tested explicitly (tests/test_speed.py).
os.environ.setdefault("MAGIC_MM_DTYPE", "float32")

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLICKR = REPO.parent / "shared" / "data" / "flickr8k-1k"


@pytest.fixture(scope="session")
def flickr_dir() -> Path:
    if not (FLICKR / "captions.csv").is_file():
        pytest.skip(f"shared data not found at {FLICKR}")
    return FLICKR


@pytest.fixture(scope="session")
def tiny_composed():
    from magic_mm import MagicEmbedder

    return MagicEmbedder.from_pretrained("tiny-random-composed")


@pytest.fixture(scope="session")
def tiny_internvl():
    from magic_mm import MagicEmbedder

    return MagicEmbedder.from_pretrained("tiny-random-internvl")


@pytest.fixture(scope="session")
def default_model():
    from magic_mm import MagicEmbedder

    return MagicEmbedder.from_pretrained("magic-mm-tiny")


@pytest.fixture
def two_threads():
    """Two intra-op threads, as on a 2-core CPU, whatever runs the tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def make_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A deterministic, non-uniform RGB image."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Four small distinct PNGs, i0.png … i3.png."""
    root = tmp_path / "imgs"
    root.mkdir()
    for n in range(4):
        make_image(40, 30, seed=n).save(root / f"i{n}.png")
    return root


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run ``magic-mm ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from magic_mm.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["magic-mm", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _cpu_runs_bf16() -> bool:
    from magic_mm.model.dtypes import cpu_runs_bf16

    return cpu_runs_bf16()


needs_cpu_bf16 = pytest.mark.skipif(not _cpu_runs_bf16(), reason="this CPU has no oneDNN bf16 kernels")


def skip_without_cpu_bf16(dtype: object = "bfloat16") -> None:
    """bf16 on a CPU needs oneDNN's bf16 kernels (AVX512-BW/VL/DQ or AVX-NE-CONVERT); on a CPU
    without them (an AMD EPYC Zen 3) ``--dtype bfloat16`` is a clear error, tested on its own."""
    import torch

    if dtype in ("bfloat16", torch.bfloat16) and not _cpu_runs_bf16():
        pytest.skip("this CPU has no oneDNN bf16 kernels")
