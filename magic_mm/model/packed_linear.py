"""Linear layers whose bf16 weights are kept pre-packed for oneDNN, for CPU inference.

``F.linear`` in bf16 on a CPU hands oneDNN a plain row-major weight, which it reorders into
its blocked (AMX/VNNI) layout on every call. For the short sequences an embedder runs (a
22-token query, a 58-token candidate) that reorder is a large share of each matrix product:
packing the weight once makes the LM's products 1.2–1.46× faster at those lengths; packing alone
does not change the numbers (docs/speed.md, ``benchmarks/lm_linear_packing.py``).

In bf16, oneDNN's summation order depends on how many rows a call has, so a token's output
would change with the other inputs that share its batch (by up to one bf16 step). The packed
path therefore pads the rows to a multiple of ``ROW_BLOCK`` and runs them in calls no larger
than the largest one measured to round like ``ROW_BLOCK``-row calls for that shape on that
thread count (``invariant_call_rows``): every row then gets the same numbers whatever shares
its call, on 1 thread or 2 (``benchmarks/row_blocks.py``, ``tests/test_speed.py``). With
row-by-row attention on padded batches (``row_attention.py``) that makes bf16 embeddings
batch-invariant, so the server's micro-batched answers equal its single-request ones bit for bit.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from magic_mm.model import dtypes

# Rows are padded to a multiple of ROW_BLOCK (64: one s = 2 candidate of 58 tokens, or a query)
# and multiplied in calls of at most the shape's invariant_call_rows. Which call sizes round like
# 64-row calls differs by shape and thread count and is not monotonic (on this CPU, 1536 → 576 on
# 2 threads: 128, 192, 448 and 512 rows do, 256 does not), so it is measured, not assumed.
ROW_BLOCK: int | None = 64  # None: one call of whatever rows come (benchmarks/row_blocks.py compares)
MAX_CALL_ROWS = 512  # larger calls gain little (a batch of 8 candidates is 464 rows)
CALL_ROWS: int | None = None  # None: measured per shape; an int forces that cap (benchmarks only)

_invariant_calls: dict[tuple[int, int, bool, int], int] = {}
_invariant_calls_lock = threading.Lock()


def _linear(rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")


def invariant_call_rows(in_features: int, out_features: int, has_bias: bool, threads: int) -> int:
    """The largest call, in whole ``ROW_BLOCK``s up to ``MAX_CALL_ROWS``, in which oneDNN gives
    every row of a bf16 ``in_features → out_features`` product on ``threads`` intra-op threads
    exactly the numbers a ``ROW_BLOCK``-row call gives it, with every smaller whole-block call
    doing the same. oneDNN picks its kernel (and so its summation order) from the shapes and the
    thread count, not from the values, so random numbers measure it; once per process and key,
    on the calling thread's thread count (which torch keeps per thread)."""
    key = (in_features, out_features, has_bias, threads)
    known = _invariant_calls.get(key)  # every product of every pass asks: no lock once measured
    if known is not None:
        return known
    with _invariant_calls_lock:
        if key not in _invariant_calls:
            generator = torch.Generator().manual_seed(0)
            weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).bfloat16()
            bias = torch.randn(out_features, generator=generator).bfloat16() if has_bias else None
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            rows = torch.randn(MAX_CALL_ROWS, in_features, generator=generator).bfloat16()
            by_blocks = torch.cat([_linear(block, packed, bias) for block in rows.split(ROW_BLOCK or 64)])
            largest = ROW_BLOCK or 64
            for size in range(2 * largest, MAX_CALL_ROWS + 1, largest):
                if not torch.equal(_linear(rows[:size], packed, bias), by_blocks[:size]):
                    break
                largest = size
            _invariant_calls[key] = largest
        return _invariant_calls[key]


def packing_available() -> bool:
    return dtypes.cpu_runs_bf16()


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
            cap = CALL_ROWS or invariant_call_rows(self.in_features, self.out_features, self.bias is not None,
                                                   torch.get_num_threads())
            padded = -(-count // ROW_BLOCK) * ROW_BLOCK
            # Rows before `start` go as views (no copy) in calls of at most `cap`; the rest are
            # copied into one zero-padded call.
            if padded == count:  # whole blocks only
                start = count
            elif padded <= cap:  # all in one call: copying the input once is cheaper than
                start = 0  # concatenating two calls' outputs
            else:
                start = count - count % ROW_BLOCK
            calls = list(rows[:start].split(cap)) if start else []
            if start < count:
                tail = rows.new_empty(padded - start, rows.shape[1])
                tail[: count - start] = rows[start:]
                tail[count - start :] = 0  # only the padding rows: a zero fill of the whole call cost as much as the copy
                calls.append(tail)
        outs = [_linear(call, packed, self.bias) for call in calls]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
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
