"""Which part's bf16 costs retrieval quality: flickr8k-1k test text→image R@1/5/10 of
magic-mm-tiny with queries and candidates each in float32 or bfloat16, and candidates with
only the vision encoder in bf16 (connector and LM in float32).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dtype_parts_quality.py [--cache-dir DIR]

float32 and bfloat16 vectors go through the eval harness's embedding cache (per dtype);
the vision-only-bf16 candidates are computed here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from magic_mm.eval.harness import EvalSettings, evaluate_rows, make_encoder
from magic_mm.eval.tasks import load_tasks


class Fixed:
    def __init__(self, vectors: dict[str, tuple[list, np.ndarray]]) -> None:
        self.vectors = vectors

    def encode(self, items: list, role: str) -> np.ndarray:
        keys, matrix = self.vectors[role]
        index = {k: n for n, k in enumerate(keys)}
        return matrix[[index[i] for i in items]]


def vision_only_bf16(model_name: str, items: list, instruction: str) -> np.ndarray:
    from magic_mm import MagicEmbedder
    from magic_mm.model.inputs import MMInput

    model = MagicEmbedder.from_pretrained(model_name, dtype="float32")
    backbone = model.backbone
    backbone.vision.to(torch.bfloat16)
    original = type(backbone).vision_grid

    def vision_grid(pixels: torch.Tensor) -> torch.Tensor:
        return original(backbone, pixels.to(torch.bfloat16)).float()

    connect = type(backbone).connect

    def connect_fp32(grid: torch.Tensor) -> torch.Tensor:
        # Features are cast to the backbone's dtype (its first parameter's: now the vision
        # encoder's bf16); the connector and LM stay float32.
        return connect(backbone, grid.float())

    backbone.vision_grid = vision_grid
    backbone.connect = connect_fp32
    inputs = [MMInput(text=i.text, image=i.image) for i in items]
    return model.encode(inputs, role="candidate", instruction=instruction, batch_size=16, show_progress=True)


def task_items(tasks: Path):  # noqa: ANN201
    """The first task of ``tasks``: its spec, rows, and its unique queries and candidates in order."""
    spec = load_tasks(tasks)[0]
    rows = spec.load()
    queries = list(dict.fromkeys(r.query for r in rows))
    pool = list(dict.fromkeys(c for r in rows for c in r.candidates))
    return spec, rows, queries, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=Path, default=Path(__file__).parent / "flickr8k-t2i.yaml")
    parser.add_argument("--model", default="magic-mm-tiny")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    spec, rows, queries, pool = task_items(args.tasks)
    enc = {d: make_encoder(EvalSettings(model=args.model, dtype=d, cache_root=args.cache_dir, show_progress=True))
           for d in ("float32", "bfloat16")}
    q = {d: enc[d].encode(queries, "query") for d in enc}
    c = {d: enc[d].encode(pool, "candidate") for d in enc}
    c["vision-bf16"] = vision_only_bf16(args.model, pool, enc["float32"].instruction(pool[0], "candidate"))
    for name, m in c.items():
        cos = (m * c["float32"]).sum(1)
        print(f"candidates {name:12} vs float32: cosine mean {cos.mean():.5f} min {cos.min():.5f}")
    print(f"{'queries':10} {'candidates':12} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
    for qn in q:
        for cn in c:
            metrics, _, _ = evaluate_rows(rows, Fixed({"query": (queries, q[qn]), "candidate": (pool, c[cn])}),
                                          spec.mode)
            print(f"{qn:10} {cn:12} " + " ".join(f"{100 * metrics[f'recall@{k}']:6.1f}" for k in (1, 5, 10)))


if __name__ == "__main__":
    main()
