"""GradCache: a contrastive step whose batch is larger than what fits in memory.

1. Embed every chunk without building a graph and keep only the vectors.
2. Compute the loss on the full batch of vectors and backpropagate to them.
3. Re-embed each chunk with a graph and backpropagate its cached vector
   gradients into the parameters, one chunk at a time.

The parameter gradients equal those of one plain step on the whole batch.  The
random-number state is replayed per chunk so dropout masks match step 1.

Across processes, ``queries`` and ``candidates`` are this rank's shares and
``gather`` (``distributed.all_gather_with_grad``) joins every rank's vectors before
the loss, keeping autograd on the rank's own slice; each rank back-propagates the
global loss into its own embeddings only, and the caller sums the parameter
gradients over ranks.  With GradCache the gathered vectors are leaves of step 2,
so step 3 needs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Embed = Callable[[Sequence[Any]], torch.Tensor]
Backward = Callable[[torch.Tensor], None]
Gather = Callable[[torch.Tensor], torch.Tensor]


def _embed(embed: Embed, items: Sequence[Any]) -> torch.Tensor:
    """``embed(items)``; an empty share (more processes than items) is an empty tensor."""
    return embed(items) if len(items) else torch.zeros(0)


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def contrastive_backward(
    embed_queries: Embed,
    embed_candidates: Embed,
    queries: Sequence[Any],
    candidates: Sequence[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int | None = None,
    backward: Backward = lambda loss: loss.backward(),
    gather: Gather = lambda local: local,
) -> float:
    """Run forward + backward for one contrastive step; returns the loss value.

    ``chunk_size`` None (or at least the batch) is a plain step; otherwise GradCache.
    ``gather`` turns this process's vectors into the global batch's (identity in one process).
    """
    if chunk_size is None or chunk_size >= max(len(queries), len(candidates)):
        loss = loss_fn(gather(_embed(embed_queries, queries)), gather(_embed(embed_candidates, candidates)))
        backward(loss)
        return float(loss.detach())

    cached: list[tuple[Embed, Sequence[Any], torch.Tensor]] = []  # (embed, chunk, rng state)
    reps = []
    for embed, items in ((embed_queries, queries), (embed_candidates, candidates)):
        parts = []
        for chunk in _chunks(items, chunk_size):
            state = torch.random.get_rng_state()
            with torch.no_grad():
                parts.append(embed(chunk).detach())
            cached.append((embed, chunk, state))
        reps.append(torch.cat(parts).requires_grad_(True) if parts else torch.zeros(0))
    q, c = reps
    loss = loss_fn(gather(q), gather(c))
    loss.backward()  # only reaches the two (local) leaf tensors
    grads = torch.cat([g for g in (q.grad, c.grad) if g is not None])
    offset = 0
    for embed, chunk, state in cached:
        saved = torch.random.get_rng_state()
        torch.random.set_rng_state(state)
        rep = embed(chunk)
        torch.random.set_rng_state(saved)
        grad = grads[offset : offset + len(rep)].to(rep.dtype)
        offset += len(rep)
        backward((rep * grad).sum())
    return float(loss.detach())
