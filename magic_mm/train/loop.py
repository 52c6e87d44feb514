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

Several processes (``torchrun`` / ``accelerate launch``): ``batch_size`` is the
global batch and each rank works on its share of it (see ``distributed.py``).  A
stage's ``train_step`` back-propagates, through ``backward``, this rank's additive
contribution to the global-batch loss; the loop then sums the trained gradients
over ranks, so a step equals one process's step on the same global batch.  Only
rank 0 writes logs, checkpoints and models; every rank's RNG state is checkpointed.
"""

from __future__ import annotations

import contextlib
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
from magic_mm.train import distributed
from magic_mm.train.config import ConfigError, OptimConfig, TrainConfig, config_to_dict
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
        self.autocast: Callable[[], Any] = contextlib.nullcontext  # mixed precision when not wrapped

    def forward(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self.autocast():
            if callable(method):
                return method(self.embedder, *args, **kwargs)
            return getattr(self.embedder, method)(*args, **kwargs)


def lr_factor(step: int, steps: int, optim: OptimConfig) -> float:
    """The learning-rate multiplier at ``step`` of a ``steps``-long schedule: linear warmup, then
    cosine decay to 0 at ``steps`` (or constant)."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    if optim.schedule == "constant":
        return 1.0
    span = max(1, steps - optim.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - optim.warmup_steps) / span)))


class Trainer:
    """Shared loop; subclasses build the model and define one step."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator

        self.config = config
        self.out = config.output_dir
        distributed.init()  # torchrun's environment → a gloo (CPU) or nccl (CUDA) process group
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                       cpu=not torch.cuda.is_available())
        if config.batch_size < distributed.world():
            raise ConfigError(f"batch_size {config.batch_size} is the global batch: it must be at least the "
                              f"number of processes ({distributed.world()})")
        set_seed(config.seed)
        self.model: torch.nn.Module = ModelCall(self.build_model()).to(self.accelerator.device)
        self.optimizer = self._optimizer()
        # not handed to accelerate: its scheduler wrapper steps once per process per step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # FSDP/DeepSpeed (from `accelerate launch --config_file`) shard the model, so accelerate wraps it and
        # averages gradients itself.  Otherwise the model stays unwrapped and the loop sums gradients
        # over ranks (one flat all-reduce of the trained parameters, which are small).
        from accelerate.utils import DistributedType

        self.wrapped = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if self.wrapped:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        else:
            self.model.autocast = self.accelerator.autocast
            self.optimizer = self.accelerator.prepare(self.optimizer)
        self.step = 0

    # -- to implement -----------------------------------------------------------------
    def build_model(self) -> MagicEmbedder:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, Any]:
        """Forward + ``backward`` for global step ``step``; returns at least ``{"loss": …}``, the
        global batch's loss (the same on every rank), and ``"dataset"``: its sub-dataset's name."""
        raise NotImplementedError

    def backward(self, contribution: torch.Tensor) -> None:
        """Back-propagate this rank's additive share of the global-batch loss.

        The loop sums gradients over ranks afterwards; a wrapper that averages them
        (FSDP, DeepSpeed) gets the share times the number of processes instead.
        """
        self.accelerator.backward(contribution * distributed.world() if self.wrapped else contribution)

    def share_of_mean(self, local_mean: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
        """This rank's mean over its ``count`` loss terms → (its contribution to the mean over every
        rank's terms, that global mean's value).  One process: ``(local_mean, its value)``."""
        total, summed = distributed.all_reduce_sum([count, float(local_mean.detach()) * count])
        if total == count:
            return local_mean, float(local_mean.detach())
        return local_mean * (count / total), summed / total

    def full_params(self, writeback: bool = False) -> contextlib.AbstractContextManager[Any]:
        """A block where the embedder's parameters are whole on every rank (FSDP shards them);
        every rank must enter it.  A no-op unless the model is FSDP-wrapped."""
        from accelerate.utils import DistributedType

        if self.wrapped and self.accelerator.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(self.model, writeback=writeback)
        return contextlib.nullcontext()

    def sync_gradients(self) -> None:
        if not self.wrapped:
            distributed.all_reduce_grads(p for p in self.model.parameters() if p.requires_grad)

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
            main = distributed.is_main()
            if not main:
                distributed.barrier()  # rank 0 computes and writes the file; the others then read it
            cache.build(self.embedder.backbone, paths, self.config.show_progress and main, file)
            if main:
                distributed.barrier()
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
            # float32 master weights: AdamW steps on bf16 weights lose small updates; the
            # config's mixed precision (autocast) is where bf16 belongs in training.
            model = MagicEmbedder.from_pretrained(cfg.model, compression=cfg.compression, dtype="float32",
                                                  trainable=True)
        if cfg.train_lm == "lora" and model.config.lora is None:
            model.add_lora(cfg.lora)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in model.trained_parameters().items():
            p.requires_grad_(cfg.train_lm != "frozen" or not name.startswith("lora."))
        if cfg.train_lm == "full":
            for p in model.backbone.decoder.parameters():
                p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            decoder = model.backbone.decoder
            if not getattr(decoder, "supports_gradient_checkpointing", False):
                raise ConfigError(f"gradient_checkpointing: the {model.config.family} backbone's LM does not support it")
            # non-reentrant: gradients reach LoRA even though the frozen input embeddings need none
            enable = getattr(decoder, "activation_checkpointing_enable", None)  # transformers >= 5's name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        return lr_factor(step, self.total_steps, self.config.optim)

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
        """Write the checkpoint (rank 0); every rank must call it, as it gathers their RNG states."""
        rng = distributed.all_gather_objects({
            "torch": torch.random.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None})
        # unwrapped, every rank's optimiser state is the same; FSDP shards it, so each rank's is kept
        optimizers = distributed.all_gather_objects(self.optimizer.state_dict()) if self.wrapped else None
        with self.full_params():
            trained = self.trained_state()
        if not self.accelerator.is_main_process:
            return
        tmp = self.out / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trained, tmp / "trained.safetensors")
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "optimizer_per_rank": optimizers,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng[0], "rng_per_rank": rng,
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
        with torch.no_grad(), self.full_params(writeback=True):
            for key, value in trained.items():
                target = params.get(key) if not key.startswith("decoder.") else decoder[key[len("decoder."):]]
                target.copy_(value)
        state = torch.load(folder / "state.pt", weights_only=False)
        per_rank_optim = state.get("optimizer_per_rank")
        self.optimizer.load_state_dict(per_rank_optim[distributed.rank()] if self.wrapped and per_rank_optim
                                       else state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("rng_per_rank", [state["rng"]])
        if len(per_rank) != distributed.world():
            raise ConfigError(f"{folder}: checkpoint written by {len(per_rank)} process(es); resume it with "
                              f"the same number (now {distributed.world()})")
        rng = per_rank[distributed.rank()]
        torch.random.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
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

        main = self.accelerator.is_main_process
        if main:
            import yaml

            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        distributed.barrier()
        self.step = self.load_checkpoint()
        if main:
            self._truncate_log(self.step)
        self.prepare_run()
        total = self.total_steps
        show = self.config.show_progress and main
        log_file = (self.out / LOG_FILE).open("a") if main else contextlib.nullcontext()
        with progress(total, show, f"{self.config.stage}") as advance, log_file as log:
            advance(self.step)
            while self.step < total:
                started = time.time()
                self.before_step(self.step)
                self.model.train()
                metrics = self.train_step(self.step)
                self.sync_gradients()
                if self.config.optim.max_grad_norm:
                    self.accelerator.clip_grad_norm_(
                        [p for p in self.model.parameters() if p.requires_grad], self.config.optim.max_grad_norm)
                lrs = [g["lr"] for g in self.optimizer.param_groups]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if main and (self.step % self.config.log_every == 0 or self.step == total):
                    record = {"step": self.step,  # a str metric, e.g. the batch's sub-dataset, as it is
                              **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()},
                              "lr": lrs[-1], "lr_groups": lrs, "seconds": round(time.time() - started, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if self.step % self.config.checkpoint_every == 0 or self.step == total:
                    self.save_checkpoint()
                if self.step in self.config.snapshot_steps:
                    with self.full_params():
                        if main:
                            self.embedder.save_pretrained(self.out / f"{FINAL_MODEL}-step{self.step}")
                advance(1)
                if stop_after is not None and self.step >= stop_after and self.step < total:
                    raise StopTraining(f"stopped after step {self.step}")
        return self.finish()

    def finish(self) -> Path:
        folder = self.out / FINAL_MODEL
        with self.full_params():
            if self.accelerator.is_main_process:
                self.embedder.save_pretrained(folder)
        return folder
