"""Helpers for training on several processes (``torchrun`` / ``accelerate launch``).

Every function also works in a plain single process, where it is the identity (or a
no-op), so the stages call them unconditionally.

The rule the stages follow: rank r back-propagates its *additive contribution* to the
global-batch loss, and the trained parameters' gradients are then **summed** over
ranks (``all_reduce_grads``).  For the contrastive stages the contribution is the
whole global loss, computed on every rank from all-gathered embeddings in which only
the rank's own slice carries autograd (``all_gather_with_grad``): the sum over ranks
of those partial gradients is exactly the one-process gradient.  For the generative
stages (stage 1, reranker) rank r's contribution is its shard's summed loss divided
by the global count of loss terms.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Judging or mining on a big pool keeps ranks apart for a long time between collectives.
TIMEOUT = timedelta(minutes=float(os.environ.get("MAGIC_MM_DIST_TIMEOUT_MIN", "180")))


def init() -> None:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA.  Nothing to do in a single process or when a launcher
    (accelerate, a test) has already initialised the group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# -- sharding ---------------------------------------------------------------------------
def shard_bounds(n: int, rank_: int | None = None, world_: int | None = None) -> tuple[int, int]:
    """Rank's contiguous share ``[start, end)`` of ``n`` items; shares differ by at most one."""
    r = rank() if rank_ is None else rank_
    w = world() if world_ is None else world_
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of ``items``; concatenating the shares in rank order gives ``items``."""
    start, end = shard_bounds(len(items))
    return items[start:end]


# -- collectives ------------------------------------------------------------------------
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (sizes may differ); no autograd.

    Gathered in float32 (gloo has no bf16 reductions and the losses are taken in float32).
    """
    return _gather(tensor)[0]


def _gather(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    if not active():
        return tensor.detach().float(), [tensor.shape[0]]
    device = _comm_device()
    local = tensor.detach().float().to(device).contiguous()
    shapes = all_gather_objects(tuple(local.shape))
    counts = [s[0] for s in shapes]
    row = next((s[1:] for s in shapes if s[0] > 0), tuple(local.shape[1:]))  # an empty share may be shapeless
    padded = torch.zeros((max(counts), *row), dtype=local.dtype, device=device)
    if local.shape[0]:
        padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world())]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device), counts


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``all_gather`` whose own slice is ``tensor`` itself (float32), so gradients reach it.

    Other ranks' slices are constants here; their own ranks back-propagate into them.
    Summing the parameter gradients over ranks then gives the gradient of a loss on
    the whole gathered batch.
    """
    if not active():
        return tensor.float()
    full, counts = _gather(tensor)
    if not counts[rank()]:
        return full
    start = sum(counts[: rank()])
    return torch.cat([full[:start], tensor.float(), full[start + counts[rank()]:]])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over ranks in place, in one flat buffer.

    A parameter keeps ``grad is None`` only when it has no gradient on any rank, so
    the optimiser skips exactly what a single process would skip.
    """
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = _comm_device()
    flags = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
    flat = torch.cat([flags] + [(torch.zeros(p.numel(), device=device) if p.grad is None
                                 else p.grad.detach().float().reshape(-1).to(device)) for p in params])
    dist.all_reduce(flat)
    offset = len(params)
    for i, p in enumerate(params):
        size = p.numel()
        if float(flat[i]) > 0:
            summed = flat[offset : offset + size].view_as(p).to(p.device, p.dtype if p.grad is None else p.grad.dtype)
            if p.grad is None:
                p.grad = summed.clone()
            else:
                p.grad.copy_(summed)
        offset += size



def close() -> None:
    """Leave the process group (end of a command), after every rank got there."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
