"""Is there reranking signal in the embedder's own token states?

A reranker reads the query and the photo together; magic-mm-tiny's learns nothing (its losses stay
at chance).  This asks the easier question first.  The shipped embedder's final-layer states are
kept for every caption token and every visual token of flickr8k-1k (frozen, computed once).  A
small cross-encoder (one transformer layer over [query tokens; visual tokens], width 128) reads
them, and its output is added to the embedder's cosine / 0.05.  Its output layer starts at zero,
so training starts from the embedder's own order.  It trains listwise on the embedder's top 10 of
each train caption (the positive put in if missing) and reports top-5 R@1 on val after every
epoch and on test at the end, next to the embedder alone.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/token_state_rerank.py --cache runs/token-states.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from magic_mm import MagicEmbedder  # noqa: E402
from magic_mm.data.captions import read_captioned_images  # noqa: E402
from magic_mm.eval.significance import paired_bootstrap_ci  # noqa: E402
from magic_mm.model.lm_batch import hidden_states  # noqa: E402
from magic_mm.progress import progress  # noqa: E402
from magic_mm.train.features import VisionCache  # noqa: E402

SPLITS = ("train", "val", "test")
TRAIN_TOP, EVAL_TOP, TAU = 10, 5, 0.05
BATCH = 16  # train captions per optimiser step


def token_states(embedder: MagicEmbedder, data: str, split: str) -> dict:
    """Each photo's visual-token states and pooled vector; each caption's token states and vector."""
    items = read_captioned_images(data, split)
    paths = [i.path for i in items]
    grids = VisionCache().build(embedder.backbone, paths)
    out: dict = {"visual": [], "photo": [], "tokens": [], "caption": [],
                 "owner": torch.tensor([n for n, i in enumerate(items) for _ in i.captions])}
    captions = [c for i in items for c in i.captions]
    for side, inputs, size, label in (("candidate", paths, 16, "photos"), ("query", captions, 32, "captions")):
        with torch.inference_mode(), progress(len(inputs), True, f"{split} {label}") as advance:
            for start in range(0, len(inputs), size):
                chunk = inputs[start : start + size]
                batch = [grids.item(p) for p in chunk] if side == "candidate" else embedder.prepare(chunk)
                lm = embedder.lm_batch(batch, side)
                states = hidden_states(embedder.backbone, lm).float()
                for b in range(len(batch)):
                    if side == "candidate":
                        out["visual"].append(states[b][lm.visual_mask[b]].half())
                        out["photo"].append(states[b, lm.last_token[b]])
                    else:  # the instruction's tokens are the same for every caption; the head may ignore them
                        out["tokens"].append(states[b, : int(lm.lengths[b])].half())
                        out["caption"].append(states[b, lm.last_token[b]])
                advance(len(chunk))
    out["visual"] = torch.stack(out["visual"])
    for key in ("photo", "caption"):
        out[key] = F.normalize(torch.stack(out[key]), dim=-1)
    return out


class CrossHead(torch.nn.Module):
    """One transformer layer over projected query and visual token states; a zero-initialised score."""

    def __init__(self, dim_in: int, width: int = 128, layers: int = 1) -> None:
        super().__init__()
        self.query_in = torch.nn.Linear(dim_in, width)
        self.visual_in = torch.nn.Linear(dim_in, width)
        self.segment = torch.nn.Parameter(torch.zeros(3, width))  # query / visual / score token
        self.score_token = torch.nn.Parameter(torch.randn(width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = torch.nn.Linear(width, 1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, query_tokens: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``(n, D)`` query tokens against ``(C, V, D)`` photos → ``(C,)`` score corrections."""
        count = len(visual)
        q = (self.query_in(query_tokens.float()) + self.segment[0]).expand(count, -1, -1)
        v = self.visual_in(visual.float()) + self.segment[1]
        s = (self.score_token + self.segment[2]).expand(count, 1, -1)
        return self.out(self.encoder(torch.cat([s, q, v], dim=1))[:, 0]).squeeze(-1)


def ranked(states: dict, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    cosine = states["caption"] @ states["photo"].T
    return cosine, cosine.argsort(dim=1, descending=True)[:, :top]


def reranker_scores(states: dict, cosine: torch.Tensor, head: CrossHead, q: int,
                    candidates: torch.Tensor) -> torch.Tensor:
    """The embedder's cosine / TAU plus the head's correction, for one query's candidates."""
    return cosine[q, candidates] / TAU + head(states["tokens"][q], states["visual"][candidates])


def top5_hits(states: dict, head: CrossHead) -> tuple[np.ndarray, np.ndarray]:
    """Per query, 1 if rank 1 is the positive: the embedder alone, and cosine / TAU + head over its top 5."""
    cosine, top = ranked(states, EVAL_TOP)
    head.eval()
    alone, fused = np.zeros(len(top)), np.zeros(len(top))
    with torch.no_grad():
        for q, candidates in enumerate(top):
            positive = int(states["owner"][q])
            scores = reranker_scores(states, cosine, head, q, candidates)
            alone[q] = candidates[0] == positive
            fused[q] = candidates[int(scores.argmax())] == positive
    head.train()
    return alone, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedder", default="magic-mm-tiny")
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/flickr8k-1k"))
    parser.add_argument("--cache", type=Path,
                        help="keep the token states here and reuse them (made by the same --embedder)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.cache and args.cache.is_file():
        states = torch.load(args.cache)
    else:
        embedder = MagicEmbedder.from_pretrained(args.embedder).eval()
        states = {split: token_states(embedder, args.data, split) for split in SPLITS}
        if args.cache:
            torch.save(states, args.cache)
    torch.manual_seed(args.seed)
    train = states["train"]
    head = CrossHead(train["visual"].shape[-1], args.width, args.layers)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.05)
    cosine, top = ranked(train, TRAIN_TOP)
    print(f"{args.embedder}: train R@1 {100 * float((top[:, 0] == train['owner']).float().mean()):.1f} "
          f"over {len(train['photo'])} train photos; top-{EVAL_TOP} R@1 below, embedder alone → reranked")
    for epoch in range(1, args.epochs + 1):
        order, total = torch.randperm(len(top)), 0.0
        for start in range(0, len(order), BATCH):
            loss = torch.zeros(())
            for q in order[start : start + BATCH].tolist():
                positive, candidates = int(train["owner"][q]), top[q]
                if positive not in candidates.tolist():
                    candidates = torch.cat([candidates[:-1], torch.tensor([positive])])
                scores = reranker_scores(train, cosine, head, q, candidates)
                target = torch.tensor([candidates.tolist().index(positive)])
                loss = loss + F.cross_entropy(scores[None], target)
            optimizer.zero_grad()
            (loss / BATCH).backward()
            optimizer.step()
            total += loss.item()
        alone, fused = top5_hits(states["val"], head)
        print(f"epoch {epoch}: train loss {total / len(order):.3f}  val {100 * alone.mean():.1f} → "
              f"{100 * fused.mean():.1f}", flush=True)
    alone, fused = top5_hits(states["test"], head)
    mean, low, high = (100 * x for x in paired_bootstrap_ci(alone, fused))
    print(f"test ({len(alone)} captions): {100 * alone.mean():.1f} → {100 * fused.mean():.1f} "
          f"({mean:+.1f}, paired bootstrap 95 % CI {low:+.1f} … {high:+.1f})")


if __name__ == "__main__":
    main()
