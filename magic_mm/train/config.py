"""YAML training configs as dataclasses.

One ``TrainConfig`` holds what every stage shares (model, data, optimiser,
schedule, checkpointing); each stage reads its own sub-section.  Unknown keys
are an error so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from magic_mm.data.train_layout import DEFAULT_BLOCK_ROWS, SubDataset, TrainDataError
from magic_mm.errors import UserError
from magic_mm.model.config import LoraSettings

STAGES = ("stage1", "stage2", "stage3", "reranker")


class ConfigError(UserError):
    """A training config that cannot be read or has a bad value."""


DEFAULT_DATA_FOLDER = "../shared/data/flickr8k-1k"


@dataclass
class DataConfig:
    """One image-caption folder (read as a one-sub-dataset mixture when ``datasets`` is empty)."""

    folder: str = DEFAULT_DATA_FOLDER  # images/ + captions.csv (+ splits.csv)
    split: str = "train"
    limit_images: int | None = None  # keep only the first N images (toy runs, tests)
    block_rows: int = DEFAULT_BLOCK_ROWS  # rows per streamed block (also for ``datasets``)


@dataclass
class OptimConfig:
    lr: float = 1e-4  # LoRA / LM
    connector_lr: float = 1e-3  # the connector starts from random, so it moves faster
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    max_grad_norm: float = 1.0


@dataclass
class HardNegativeConfig:
    steps: int = 0  # steps trained with mined negatives (after the in-batch steps)
    window: tuple[int, int] = (50, 100)  # ranks (0-based, after exclusions) to sample from
    count: int = 2  # hard negatives per query
    queries_per_group: int | None = None  # mine for only N queries of each group (cheaper)
    # "continue": one warmup + cosine over both phases, so the mined-negative steps run at the
    # schedule's tail (a few % of the peak).  "restart": each phase gets its own warmup + cosine,
    # the hard-negative one peaking at lr_scale × the optimiser's rates.
    schedule: str = "continue"
    lr_scale: float = 1.0
    # positive-aware mining: skip candidates scoring above this share of the query's positive
    # (NV-Retriever uses 0.95); None keeps every candidate the window reaches
    max_positive_ratio: float | None = None


@dataclass
class Stage1Config:
    caption_prompt: str = "Describe the image in one sentence."
    text_instructions: list[dict[str, str]] = field(default_factory=list)  # {"prompt":…, "answer":…}
    max_answer_tokens: int = 48


@dataclass
class JudgeConfig:
    # self (the project's stage-1 model) | hf (local HF VLM folder) | openai (URL) |
    # captions (the candidate photo's other human captions, compared by a sentence encoder)
    kind: str = "self"
    model: str | None = None  # folder for kind=self/hf; model name for kind=openai; sentence encoder for captions
    url: str | None = None  # OpenAI-compatible base URL for kind=openai
    references: str | None = None  # kind=captions: the caption folder (images/ + captions.csv)
    api_key_env: str = "OPENAI_API_KEY"
    cache: str = "judge_cache.jsonl"  # relative to the run's output folder unless absolute
    # 0 = the paper's rule, relevant iff logit(yes) > logit(no).  N > 0: first ask the judge about N
    # ground-truth pairs and N mismatched ones, and cut logit(yes) - logit(no) where it best
    # separates them (for a biased judge that says "yes" to everything).
    calibrate: int = 0
    question: str = (
        "Does the image match the query? Query: {query}\nAnswer yes or no."
    )


@dataclass
class Stage3Config:
    retrieve_top: int = 20
    max_queries: int | None = None  # judge a seeded sample of this many queries (each costs retrieve_top judge calls)
    hard_negatives: int = 12
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # task name → {"query": instruction, "candidate": instruction}
    instructions: dict[str, dict[str, str]] = field(default_factory=dict)
    task: str = "caption-to-image"


@dataclass
class RerankerConfig:
    negatives: tuple[int, int] = (2, 5)  # listwise: the positive among this many negatives
    pointwise_weight: float = 1.0
    listwise_weight: float = 1.0
    candidates_from: str | None = None  # embedder folder that retrieves the negatives (else random)


@dataclass
class TrainConfig:
    stage: str
    output: str
    model: str = "magic-mm-tiny"  # start point: a name or a folder written by save_pretrained
    # or build the start point from scratch: an EmbedderConfig mapping (family, backbone, name, …)
    base: dict[str, Any] | None = None
    compression: str | None = None  # override the start point's compression
    seed: int = 0
    steps: int = 100  # total optimiser steps (stage 2: in-batch steps; hard-negative steps come on top)
    batch_size: int = 16  # queries per optimiser step: the global batch, shared out over processes
    grad_cache_chunk: int | None = None  # GradCache chunk size; None = one plain forward/backward
    gradient_checkpointing: bool = False  # recompute the LM's layer activations in backward (less memory)
    temperature: float = 0.03
    symmetric: bool = False  # stage 2: add the candidate→query InfoNCE direction
    train_lm: str = "lora"  # lora | full | frozen
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # a mixture of sub-datasets (see magic_mm/data/train_layout.py, docs/data.md); empty = `data`
    datasets: list[SubDataset] = field(default_factory=list)
    hard_negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    checkpoint_every: int = 10
    snapshot_steps: list[int] = field(default_factory=list)  # also save OUTPUT/model-stepN after these steps
    log_every: int = 1
    cache_vision: bool = True  # precompute the frozen vision encoder's grids once
    vision_cache_file: str | None = None  # share grids between runs (default: OUTPUT/vision_cache.safetensors)
    mixed_precision: str = "no"  # accelerate: no | bf16 | fp16
    show_progress: bool = True

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage {self.stage!r} is unknown; use one of {', '.join(STAGES)}")
        if self.train_lm not in ("lora", "full", "frozen"):
            raise ConfigError(f"train_lm {self.train_lm!r}: use lora, full or frozen")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        lo, hi = self.hard_negatives.window
        if not 0 <= lo < hi:
            raise ConfigError(f"hard_negatives.window {lo}-{hi}: need 0 <= start < end")
        if self.hard_negatives.schedule not in ("continue", "restart"):
            raise ConfigError(f"hard_negatives.schedule {self.hard_negatives.schedule!r}: use continue or restart")
        if not self.hard_negatives.lr_scale > 0:
            raise ConfigError(f"hard_negatives.lr_scale {self.hard_negatives.lr_scale}: must be > 0")
        ratio = self.hard_negatives.max_positive_ratio
        if ratio is not None and not 0 < ratio <= 1:
            raise ConfigError(f"hard_negatives.max_positive_ratio {ratio}: use a share in (0, 1], e.g. 0.95")
        if self.optim.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optim.schedule {self.optim.schedule!r}: use cosine or constant")
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            raise ConfigError("grad_cache_chunk must be >= 1 (or omitted)")
        n_lo, n_hi = self.reranker.negatives
        if not 1 <= n_lo <= n_hi:
            raise ConfigError(f"reranker.negatives {n_lo}-{n_hi}: need 1 <= low <= high")
        if self.mixed_precision is False:  # YAML reads a bare `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision {self.mixed_precision!r}: use no, bf16 or fp16")
        if any(n < 1 for n in self.snapshot_steps):
            raise ConfigError(f"snapshot_steps {self.snapshot_steps}: steps count from 1")
        if self.stage3.max_queries is not None and self.stage3.max_queries < 1:
            raise ConfigError("stage3.max_queries must be >= 1 (or omitted for every query)")
        if self.stage3.judge.calibrate < 0:
            raise ConfigError("stage3.judge.calibrate must be >= 0 (0 = the paper's rule)")
        if self.stage3.judge.kind not in ("self", "hf", "openai", "captions"):
            raise ConfigError(f"stage3.judge.kind {self.stage3.judge.kind!r}: use self, hf, openai or captions")
        if self.data.block_rows < 1:
            raise ConfigError(f"data.block_rows must be >= 1, got {self.data.block_rows}")
        if self.datasets and self.data.folder != DEFAULT_DATA_FOLDER:
            raise ConfigError("give either data.folder (one caption folder) or datasets (a mixture), not both")
        names = [spec.label for spec in self.datasets]
        if len(set(names)) != len(names):
            raise ConfigError(f"datasets: names {names} repeat; give each sub-dataset its own 'name'")
        for n, spec in enumerate(self.datasets):
            try:
                spec.validate(f"datasets[{n}] ({spec.label})")
            except TrainDataError as exc:
                raise ConfigError(str(exc)) from None
        if self.datasets and not any(spec.weight > 0 for spec in self.datasets):
            raise ConfigError("datasets: every weight is 0; give at least one sub-dataset a positive weight")


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        item = (getattr(hint, "__args__", None) or [None])[0]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value or {}, f"{where}.{key}")
        elif getattr(hint, "__origin__", None) is list and dataclasses.is_dataclass(item):
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{key}: expected a list of mappings, got {type(value).__name__}")
            kwargs[key] = [from_dict(item, v, f"{where}.{key}[{n}]") for n, v in enumerate(value)]
        elif getattr(hint, "__origin__", None) is tuple and isinstance(value, list):
            kwargs[key] = tuple(value)
        elif hint in (int, float):
            kwargs[key] = number(value, hint, f"{where}.{key}")
        elif value is not None and (kind := optional_number(hint)):
            kwargs[key] = number(value, kind, f"{where}.{key}")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def optional_number(hint: Any) -> type | None:
    """``int`` or ``float`` for an ``int | None`` / ``float | None`` field, else None."""
    args = set(getattr(hint, "__args__", ()))
    kinds = args - {type(None)}
    return next(iter(kinds)) if type(None) in args and len(kinds) == 1 and kinds <= {int, float} else None


def number(value: Any, kind: type, where: str) -> int | float:
    """``value`` as ``kind``.  YAML 1.1 reads ``1e-4`` (no dot) as a string, so numeric strings
    are accepted; anything else (a word, a bool, inf, nan) is a config error naming the key."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if kind is int else float(value)
    try:
        converted = float(value) if isinstance(value, (float, str)) else math.nan
    except ValueError:
        converted = math.nan
    if not math.isfinite(converted):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if kind is int:
        if not converted.is_integer():
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return int(converted)
    return converted


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "compression=none"]`` → nested mapping; values are read as YAML."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: write KEY=VALUE, e.g. --set optim.lr=1e-4")
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursing into nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, expect_stage: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; relative ``output`` / ``data.folder`` resolve against the cwd."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    raw = merge(raw, overrides or {})
    if expect_stage is not None:
        raw.setdefault("stage", expect_stage)
        if raw["stage"] != expect_stage:
            raise ConfigError(f"{path}: is a {raw['stage']} config; run `magic-mm train {raw['stage']}`")
    for required in ("stage", "output"):
        if required not in raw:
            raise ConfigError(f"{path}: missing required key {required!r}")
    config = from_dict(TrainConfig, raw, str(path))
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
