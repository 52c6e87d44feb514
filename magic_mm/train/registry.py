"""Stage name → trainer class (imported lazily by the CLI)."""

from __future__ import annotations

from magic_mm.train.loop import Trainer
from magic_mm.train.reranker import RerankerTrainer
from magic_mm.train.stage1 import GenerativeTrainer
from magic_mm.train.stage2 import ContrastiveTrainer
from magic_mm.train.stage3 import JudgedTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "stage1": GenerativeTrainer,
    "stage2": ContrastiveTrainer,
    "stage3": JudgedTrainer,
    "reranker": RerankerTrainer,
}
