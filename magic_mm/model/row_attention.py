"""Attention that runs each sequence of a padded batch on its own, at its own length.

transformers' SDPA attention runs a right-padded batch as one call with a padding mask, while a
sequence alone runs with no mask (``is_causal``): a different kernel, whose bf16 rounding
differs (by up to 2⁻¹² in one layer's output, growing to a bf16 step of the final vector).
``rowwise_sdpa`` slices every row of a padded batch to its real length and makes exactly the
call that row would get alone, so a text's vector does not depend on the texts it was batched
with. Unpadded batches (every row full length, such as candidates with one prompt) are one call,
as before: a call without a mask computes each row independently of the others.  On top of
stored keys (an instruction line's, ``lm_batch.PrefixStates``) a row alone gets an explicit
causal mask, so each row gets that mask's slice.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROWWISE_SDPA = "magic_mm_rowwise_sdpa"


def row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real keys per row of a right-padded batch, from transformers' 4-D (B, 1, Lq, Lk) mask
    (bool, True = may attend, or additive floats, 0 = may attend): the last query position of a
    row sees every real key of it and no padding."""
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed[:, 0, -1, :].sum(dim=-1).tolist()


def rowwise_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, heads, length, head_dim = query.shape
    stored = key.shape[2] - length  # keys from an earlier pass, shared by every row
    out = query.new_zeros(batch, length, heads, head_dim)  # padding positions: zeros, never read
    for row, keys in enumerate(row_lengths(attention_mask)):
        n = keys - stored
        mask = attention_mask[row : row + 1, :, :n, :keys] if stored else None
        alone, _ = sdpa_attention_forward(module, query[row : row + 1, :, :n], key[row : row + 1, :, :keys],
                                          value[row : row + 1, :, :keys], mask, **kwargs)
        out[row, :n] = alone[0]
    return out, None


def use_rowwise_sdpa(decoder: torch.nn.Module) -> bool:
    """Switch ``decoder`` (a transformers model) from "sdpa" to ``rowwise_sdpa``, in place.
    Other implementations (eager, a GPU's flash attention) are left alone; True if switched."""
    config = getattr(decoder, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    config._attn_implementation = ROWWISE_SDPA
    return True


AttentionInterface.register(ROWWISE_SDPA, rowwise_sdpa)
AttentionMaskInterface.register(ROWWISE_SDPA, sdpa_mask)  # the same masks as "sdpa"
