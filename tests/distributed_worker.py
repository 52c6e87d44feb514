"""Run under ``torchrun`` by tests/test_distributed.py: the first step's gradients of each
stage, stage 1 and the reranker, then the stage-2 command (which resumes the run a first
launch stopped).  Usage:

    torchrun --nproc_per_node 2 tests/distributed_worker.py CONFIG_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from magic_mm.cli import app
from magic_mm.train import distributed
from magic_mm.train.config import load_config
from magic_mm.train.registry import TRAINERS

GRADS_FILE = "first-step-grads.pt"


def first_step_grads(folder: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Each stage's trained-parameter gradients after step 0 (summed over ranks), stage 2 with GradCache."""
    grads = {}
    for stage, extra in (("stage2", {"grad_cache_chunk": 2}), ("stage1", {}), ("reranker", {})):
        trainer = TRAINERS[stage](load_config(folder / f"{stage}.yaml",
                                              overrides={**extra, "output": str(out / f"grads-{stage}")}))
        trainer.prepare_run()
        trainer.train_step(0)
        trainer.sync_gradients()
        grads[stage] = {k: p.grad.clone() for k, p in trainer.embedder.trained_parameters().items()
                        if p.grad is not None}
    return grads


def main(folder: Path) -> None:
    grads = first_step_grads(folder, folder)
    if distributed.is_main():
        torch.save(grads, folder / GRADS_FILE)
    for stage in ("stage1", "reranker"):
        TRAINERS[stage](load_config(folder / f"{stage}.yaml")).run()
    # the CLI path last: it leaves the process group when it is done
    app(["train", "stage2", "--config", str(folder / "stage2.yaml"), "--quiet"], standalone_mode=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
