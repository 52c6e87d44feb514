"""Command-line options shared by several sub-commands, defined once, and the model loader they feed."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer
from rich.console import Console

err = Console(stderr=True)


def _check_dtype(value: str) -> str:
    from magic_mm.model.dtypes import parse_dtype

    parse_dtype(value, "--dtype")  # a UserError naming the value and the choices
    return value


def _check_device(value: str) -> str:
    from magic_mm.model.dtypes import resolve_device

    resolve_device(value, "--device")  # a UserError naming the value and the fix, before any load
    return value


DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_check_device,
    help="Where the model runs: auto (the GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.")]

DtypeOpt = Annotated[str, typer.Option(
    "--dtype", callback=_check_dtype,
    help="Number format: auto (bfloat16 on a GPU or a CPU with native bf16, else float32), float32, bfloat16, "
         "float16. $MAGIC_MM_DTYPE changes what auto means.")]


def load_embedder(model: str, compression: str | None, quiet: bool = False, dtype: str = "auto",
                  device: str = "cpu") -> Any:
    """The model for a command: ``--model``, ``--compression``, ``--dtype`` and ``--device``."""
    from transformers.utils import logging as hf_logging

    from magic_mm import MagicEmbedder

    hf_logging.disable_progress_bar()
    with contextlib.nullcontext() if quiet else err.status(f"loading {model} …"):
        return MagicEmbedder.from_pretrained(model, compression=compression, dtype=dtype, device=device)
