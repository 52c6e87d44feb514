"""Losses shared by the stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 0.03,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of each query against all candidates; ``targets[i]`` is query i's positive.

    Inputs are un-normalised embeddings (cosine similarity is taken here).  ``mask[i, j]``
    True removes candidate j from query i's softmax: used for items that share the
    query's group (another caption of the same image) so they are never negatives.
    """
    q = F.normalize(queries.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    logits = q @ c.T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, targets)


def group_mask(query_groups: torch.Tensor, candidate_groups: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """True where a candidate shares the query's group but is not its target."""
    same = query_groups[:, None] == candidate_groups[None, :]
    same[torch.arange(len(targets)), targets] = False
    return same


def caption_image_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    query_groups: torch.Tensor,
    candidate_groups: torch.Tensor,
    temperature: float = 0.03,
    symmetric: bool = False,
) -> torch.Tensor:
    """Caption → image InfoNCE; candidates in a query's group, other than its target, are masked.

    ``symmetric`` averages it with image → caption InfoNCE over the positive images
    (candidates ``0..max(targets)``, listed first), each against its first caption with
    its other captions masked.  Used by stage 2 and by the dual-encoder baseline.
    """
    loss = info_nce(queries, candidates, targets, temperature, group_mask(query_groups, candidate_groups, targets))
    if symmetric:
        n_pos = int(targets.max()) + 1
        first = torch.tensor([int((targets == j).nonzero()[0]) for j in range(n_pos)])
        back_mask = group_mask(candidate_groups[:n_pos], query_groups, first)
        loss = (loss + info_nce(candidates[:n_pos], queries, first, temperature, back_mask)) / 2
    return loss


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where ``labels`` is -100 on everything but answer tokens.

    ``logits[:, t]`` predicts token ``t + 1``, so labels shift left by one.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
