"""Command-line options shared by several sub-commands, defined once."""

from __future__ import annotations

from typing import Annotated

import typer


def _check_dtype(value: str) -> str:
    from magic_mm.model.dtypes import parse_dtype

    parse_dtype(value, "--dtype")  # a UserError naming the value and the choices
    return value


DtypeOpt = Annotated[str, typer.Option(
    "--dtype", callback=_check_dtype,
    help="Number format: auto (bfloat16 on a GPU or a CPU with native bf16, else float32), float32, bfloat16, "
         "float16. $MAGIC_MM_DTYPE changes what auto means.")]
