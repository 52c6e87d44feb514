"""Linear layers whose bf16 weights are kept pre-packed for oneDNN, for CPU inference.

``F.linear`` in bf16 on a CPU hands oneDNN a plain row-major weight, which it reorders into
its blocked (AMX/VNNI) layout on every call. For the short sequences an embedder runs (a
22-token query, a 58-token candidate) that reorder is a large share of each matrix product:
packing the weight once makes the LM's products 1.2–1.46× faster at those lengths; packing alone
does not change the numbers (docs/speed.md, ``benchmarks/lm_linear_packing.py``).

In bf16, oneDNN's summation order depends on how many rows a call has, so a token's output
would change with the other inputs that share its batch (by up to one bf16 step). The packed
path therefore pads the rows to a multiple of ``ROW_BLOCK`` and runs them in calls of 64 or
128 rows: every row then gets the same numbers whatever shares its call, on 1 thread or 2
(``benchmarks/row_blocks.py``, ``tests/test_speed.py``). With row-by-row attention on padded
batches (``row_attention.py``) that makes bf16 embeddings batch-invariant, so the server's
micro-batched answers equal its single-request ones bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Rows are padded to a multiple of ROW_BLOCK (64: one s = 2 candidate of 58 tokens, or a query)
# and multiplied in calls of CALL_ROWS. A 128-row call gives each row the same numbers as two
# 64-row calls for every shape of magic-mm-tiny, on 1 and 2 threads, and is 5 % faster on a
# batch of 16 photos; from 192 rows on, some shapes round differently (measured).
ROW_BLOCK: int | None = 64  # None: one call of whatever rows come (benchmarks/row_blocks.py compares)
CALL_ROWS = 128


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that, for CPU bf16 inference, multiplies by a packed copy of its weight.

    The packed copy is made on the first call that can use it, and made again if the weight
    has changed since: replaced by another tensor, or changed in place (its version counter
    moved). Every other call (float32, a GPU,
    a gradient to track) is a plain ``F.linear``. The packed copy is a cache: it is not in the
    state dict, and copies or pickles of the module drop it (oneDNN's opaque tensors cannot be
    copied) and rebuild it when first used.
    """

    _packed: torch.Tensor | None = None
    _packed_from: tuple[int, int] = (0, -1)  # (data pointer, version) of the weight packed

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        weight = self.weight
        if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return None
        source = (weight.data_ptr(), weight._version)
        if self._packed is None or self._packed_from != source:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._packed_from = source
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_weight(x)
        if packed is None or x.numel() == 0:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        count = rows.shape[0]
        if ROW_BLOCK is None:
            calls = [rows]
        else:
            if count % ROW_BLOCK:
                rows = torch.cat([rows, rows.new_zeros(ROW_BLOCK - count % ROW_BLOCK, rows.shape[1])])
            calls = rows.split(CALL_ROWS)
        out = torch.cat([torch.ops.mkldnn._linear_pointwise(call, packed, self.bias, "none", [], "")
                         for call in calls])
        return out[:count].reshape(*x.shape[:-1], out.shape[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state


def pack_linears(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` inside ``module`` into a ``PackedLinear``, in place
    (the same parameters; only ``forward`` changes). Returns how many were turned."""
    if not packing_available():
        return 0
    turned = 0
    for sub in module.modules():
        if type(sub) is nn.Linear:
            sub.__class__ = PackedLinear
            turned += 1
    return turned
