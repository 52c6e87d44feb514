"""The training loop every stage shares: accelerate, seeds, optimiser, schedule,
checkpoint/resume, JSONL log and progress bar.

A stage subclasses ``Trainer`` and implements ``build_model`` and ``train_step``
(forward + backward for global step ``step``).  Batches must be a pure function of
``(seed, step)`` so that a resumed run sees exactly the batches an uninterrupted
one would: no step is lost or repeated.

Checkpoints (``OUTPUT/checkpoint/``) hold only what is trained (connector, LoRA)
plus optimiser, scheduler, RNG and step; the frozen base model is rebuilt from
its name.  They are written to a temporary folder and renamed, so a kill while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from magic_mm.model.config import EmbedderConfig
from magic_mm.model.embedder import MagicEmbedder
from magic_mm.train.config import TrainConfig, config_to_dict
from magic_mm.train.features import VisionCache

CHECKPOINT = "checkpoint"
LOG_FILE = "train_log.jsonl"
VISION_CACHE_FILE = "vision_cache.safetensors"
FINAL_MODEL = "model"


class StopTraining(Exception):
    """Raised by ``stop_after`` to simulate a kill (tests)."""


def batch_indices(n: int, batch_size: int, step: int, seed: int, stream: int = 0) -> list[int]:
    """Indices of step ``step``'s batch: epochs are seeded permutations of ``range(n)``.

    Pure in ``(n, batch_size, step, seed, stream)``, which is what makes resume exact.
    """
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        perm = np.random.default_rng([seed, stream, epoch]).permutation(n)
        take = perm[offset : offset + batch_size - len(out)]
        out.extend(int(i) for i in take)
        position += len(take)
    return out


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ModelCall(torch.nn.Module):
    """Routes ``model(method, ...)`` to ``embedder.method(...)`` (or ``method(embedder, ...)``
    for a function) so that DDP/FSDP wrappers, which hook ``forward``, see every
    training forward pass."""

    def __init__(self, embedder: MagicEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if callable(method):
            return method(self.embedder, *args, **kwargs)
        return getattr(self.embedder, method)(*args, **kwargs)


class Trainer:
    """Shared loop; subclasses build the model and define one step."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator

        self.config = config
        self.out = config.output_dir
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       cpu=not torch.cuda.is_available())
        set_seed(config.seed)
        self.model: torch.nn.Module = ModelCall(self.build_model()).to(self.accelerator.device)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.scheduler)
        self.step = 0

    # -- to implement -----------------------------------------------------------------
    def build_model(self) -> MagicEmbedder:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """Forward + backward for global step ``step``; returns at least ``{"loss": …}``."""
        raise NotImplementedError

    def prepare_run(self) -> None:
        """Once per process start, after resuming (e.g. build caches)."""

    def before_step(self, step: int) -> None:
        """Called before each step (e.g. mine hard negatives at a phase boundary)."""

    @property
    def total_steps(self) -> int:
        return self.config.steps

    def build_vision_cache(self, paths: list[Path]) -> VisionCache:
        """Grids of the frozen vision encoder for ``paths`` (read from / written to the cache file)."""
        cache = VisionCache()
        if self.config.cache_vision:
            file = Path(self.config.vision_cache_file) if self.config.vision_cache_file else self.out / VISION_CACHE_FILE
            cache.build(self.embedder.backbone, paths, self.config.show_progress, file)
        return cache

    # -- model set-up helpers -------------------------------------------------------
    @property
    def embedder(self) -> MagicEmbedder:
        return self.accelerator.unwrap_model(self.model).embedder

    def load_embedder(self) -> MagicEmbedder:
        """The start point with LoRA added if asked, and only the trained parts requiring grad."""
        cfg = self.config
        if cfg.base is not None:  # untrained parts, e.g. the default model rebuilt from scratch
            model = MagicEmbedder.from_config(EmbedderConfig(**cfg.base), compression=cfg.compression)
        else:
            model = MagicEmbedder.from_pretrained(cfg.model, compression=cfg.compression)
        if cfg.train_lm == "lora" and model.config.lora is None:
            model.add_lora(cfg.lora)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.trained_parameters().items():
            p.requires_grad_(cfg.train_lm != "frozen" or not name.startswith("lora."))
        if cfg.train_lm == "full":
            for p in model.backbone.decoder.parameters():
                p.requires_grad_(True)
        return model.train()

    def _optimizer(self) -> torch.optim.Optimizer:
        """Two learning-rate groups: the modules the backbone declares trainable (connector,
        projector, Qwen-VL's mergers) at ``connector_lr``; everything else trained (LoRA, or
        the LM itself) at ``lr``."""
        cfg = self.config.optim
        connector_ids = {id(p) for module in self.embedder.backbone.trainable_modules().values()
                         for p in module.parameters()}
        connector, rest = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (connector if id(p) in connector_ids else rest).append(p)
        groups = [{"params": g, "lr": lr} for g, lr in ((connector, cfg.connector_lr), (rest, cfg.lr)) if g]
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def _lr_factor(self, step: int) -> float:
        cfg = self.config.optim
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))

    # -- checkpoints ----------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything that moves: connector + LoRA, and the LM itself when ``train_lm: full``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.embedder.trained_state_dict().items()}
        if self.config.train_lm == "full":
            for k, v in self.embedder.backbone.decoder.state_dict().items():
                if "lora_" not in k:
                    state["decoder." + k] = v.detach().cpu().contiguous()
        return state

    def save_checkpoint(self) -> None:
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(self.trained_state(), tmp / "trained.safetensors")
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()},
        }, tmp / "state.pt")
        final = self.out / CHECKPOINT
        old = self.out / (CHECKPOINT + ".old")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> int:
        folder = self.out / CHECKPOINT
        if not (folder / "state.pt").is_file():
            old = self.out / (CHECKPOINT + ".old")  # killed between the two renames
            if not (old / "state.pt").is_file():
                return 0
            folder = old
        trained = load_file(folder / "trained.safetensors")
        params = dict(self.embedder.trained_parameters())
        decoder = self.embedder.backbone.decoder.state_dict() if self.config.train_lm == "full" else {}
        with torch.no_grad():
            for key, value in trained.items():
                target = params.get(key) if not key.startswith("decoder.") else decoder[key[len("decoder."):]]
                target.copy_(value)
        state = torch.load(folder / "state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.random.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        return int(state["step"])

    # -- the loop -------------------------------------------------------------------
    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint (they will run again)."""
        log = self.out / LOG_FILE
        if not log.is_file():
            return
        keep = [line for line in log.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        log.write_text("".join(line + "\n" for line in keep))

    def run(self, stop_after: int | None = None) -> Path:
        """Train to ``total_steps`` (resuming if a checkpoint exists); returns the saved model folder.

        ``stop_after`` raises ``StopTraining`` after that global step (tests use it as a kill).
        """
        from magic_mm.progress import progress

        self.out.mkdir(parents=True, exist_ok=True)
        import yaml

        (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        self.step = self.load_checkpoint()
        self._truncate_log(self.step)
        self.prepare_run()
        total = self.total_steps
        show = self.config.show_progress and self.accelerator.is_main_process
        with progress(total, show, f"{self.config.stage}") as advance, (self.out / LOG_FILE).open("a") as log:
            advance(self.step)
            while self.step < total:
                started = time.time()
                self.before_step(self.step)
                self.model.train()
                metrics = self.train_step(self.step)
                if self.config.optim.max_grad_norm:
                    self.accelerator.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], self.config.optim.max_grad_norm)
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.accelerator.is_main_process and (self.step % self.config.log_every == 0 or self.step == total):
                    record = {"step": self.step, **{k: round(v, 6) for k, v in metrics.items()},
                              "lr": lrs[-1], "lr_groups": lrs, "seconds": round(time.time() - started, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % self.config.checkpoint_every == 0 or self.step == total:
                    self.save_checkpoint()
                if self.step in self.config.snapshot_steps and self.accelerator.is_main_process:
                    self.embedder.save_pretrained(self.out / f"{FINAL_MODEL}-step{self.step}")
                advance(1)
                if stop_after is not None and self.step >= stop_after and self.step < total:
                    raise StopTraining(f"stopped after step {self.step}")
        return self.finish()

    def finish(self) -> Path:
        folder = self.out / FINAL_MODEL
        if self.accelerator.is_main_process:
            self.embedder.save_pretrained(folder)
        return folder
