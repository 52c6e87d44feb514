"""``MagicEmbedder``: prompt → backbone (with compression) → last-token pooling → vector."""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from magic_mm.errors import BadInputError, ModelFolderError
from magic_mm.progress import progress
from magic_mm.model.backbones import Backbone, backbone_class, checkpoint_family
from magic_mm.model.compression import Compression
from magic_mm.model.config import (
    CONFIG_FILE,
    DEFAULT_MODEL_FOLDER,
    DEFAULT_MODEL_NAME,
    RANDOM_DEFAULT_NAME,
    RANDOM_PARTS,
    WEIGHTS_FILE,
    EmbedderConfig,
    LoraSettings,
    read_folder_config,
)
from magic_mm.model.dtypes import dtype_name, exact_float32_on_gpus, resolve_device, resolve_dtype
from magic_mm.model.inputs import MAX_IMAGE_PIXELS, PreparedInput, as_input, prepare
from magic_mm.model.lm_batch import LMBatch, PrefixStates, build_lm_batch, last_token_states, with_images_encoded
from magic_mm.model.packed_linear import pack_linears
from magic_mm.model.prompts import IMAGE, ROLES, Role, build_prompt, shared_opening
from magic_mm.model.row_attention import use_rowwise_sdpa
from magic_mm.model.workers import DEFAULT_WORKERS, map_in_order, model_worker_pool

TINY_RANDOM_PREFIX = "tiny-random-"
# Worker threads that decode and resize images while the model runs (PIL releases the GIL).
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
LORA_PREFIX = "lora."


class TextTruncatedWarning(UserWarning):
    """A text was longer than ``max_text_tokens`` and was cut."""


class _Pending:
    """An input with an image, still to be decoded (on a worker thread)."""

    __slots__ = ("item", "index")

    def __init__(self, item: Any, index: int) -> None:
        self.item, self.index = item, index


def _length_key(item: Any) -> tuple[bool, int]:
    """Sort key: text-only inputs first, then by text length in characters."""
    if isinstance(item, _Pending):
        return True, len(item.item.text or "")
    return item.image is not None, len(item.text or "")


def _has_image_work(item: Any) -> bool:
    return isinstance(item, _Pending) or isinstance(getattr(item, "image", None), Image.Image)


class MagicEmbedder(torch.nn.Module):
    """A universal embedder for text, images and image+text, with visual-token compression.

    >>> model = MagicEmbedder.from_pretrained("magic-mm-tiny")
    >>> q = model.encode(["a dog on the beach"], role="query")
    >>> c = model.encode([Path("dog.jpg")], role="candidate")
    >>> model.similarity(q, c)
    """

    def __init__(self, config: EmbedderConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.max_image_pixels = MAX_IMAGE_PIXELS
        # float32 copy of the trained weights when the model runs in another dtype (index stamps).
        self.source_state: dict[str, torch.Tensor] | None = None
        self.decode_threads = DECODE_THREADS
        # On a CPU, successive batches of one encode() run side by side on this many threads
        # (``magic_mm.model.workers``); 1: every batch on the calling thread.
        self.model_workers = DEFAULT_WORKERS
        # Stored LM states of instruction lines (``embed_prompts``): set by ``from_pretrained`` for
        # inference; training and its evaluations run every token.
        self.prefix_states: PrefixStates | None = None

    # -- loading and saving ---------------------------------------------------------
    @classmethod
    def from_config(cls, config: EmbedderConfig, compression: str | Compression | None = None) -> MagicEmbedder:
        comp = Compression.parse(compression if compression is not None else config.compression)
        config.compression = str(comp)
        backbone = backbone_class(config.family).build(config.backbone, comp)
        model = cls(config, backbone)
        if config.lora is not None:
            model.add_lora(config.lora)
        return model

    @classmethod
    def from_pretrained(
        cls,
        name_or_folder: str | Path = DEFAULT_MODEL_NAME,
        compression: str | Compression | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        trainable: bool = False,
    ) -> MagicEmbedder:
        """Load ``magic-mm-tiny``, a ``tiny-random-<family>`` test model, a folder written by
        ``save_pretrained``, or a raw transformers checkpoint folder of a known family (InternVL,
        Qwen2/2.5/3-VL, Idefics3, SmolVLM; untrained connector/LoRA).  ``random-magic-mm-tiny``
        is magic-mm-tiny with random weights: the same shapes, prompts and costs, for speed
        measurements where its weights cannot go.

        ``compression`` overrides the saved setting (e.g. ``"none"`` or ``"bilinear:4"``).
        ``dtype``: ``"auto"`` (bf16 on a GPU or a CPU with native bf16, else float32; see
        ``magic_mm.model.dtypes``), ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        ``device``: ``"cpu"`` (the default), ``"cuda"`` / ``"cuda:N"`` (the whole model on that
        GPU) or ``"auto"`` (a GPU when torch sees one, else the CPU).
        ``trainable=True`` keeps LoRA adapters separate from the base weights, to train them
        further; by default they are merged in, for inference (one matrix product per layer
        instead of three).
        """
        target = resolve_device(device)
        run_dtype = resolve_dtype(dtype, target)  # fails on a typo before the slow load
        name = str(name_or_folder)
        if name.startswith(TINY_RANDOM_PREFIX):
            family = name[len(TINY_RANDOM_PREFIX):]
            config = EmbedderConfig(family=family, backbone=backbone_class(family).tiny_spec(), name=name)
            model = cls.from_config(config, compression)
        elif name == RANDOM_DEFAULT_NAME:
            raw = read_folder_config(DEFAULT_MODEL_FOLDER)
            raw["backbone"] = {**raw["backbone"], **RANDOM_PARTS}
            config = EmbedderConfig.from_dict({**raw, "name": name}, name)
            model = cls.from_config(config, compression)
        else:
            folder = DEFAULT_MODEL_FOLDER if name == DEFAULT_MODEL_NAME else Path(name).expanduser()
            if not folder.exists():
                raise ModelFolderError(
                    f"{name}: no such model folder; pass '{DEFAULT_MODEL_NAME}', a folder written by "
                    "save_pretrained, or a checkpoint folder (InternVL, Qwen-VL, Idefics3, SmolVLM)"
                )
            if not folder.is_dir():
                raise ModelFolderError(f"{name}: is a file; pass the model's folder instead")
            raw = read_folder_config(folder)
            family = checkpoint_family(raw.get("model_type"))
            if family is not None:  # a plain transformers checkpoint (InternVL, Qwen-VL, ...)
                config = EmbedderConfig(family=family, backbone={"base": str(folder.resolve())},
                                        name=folder.name)
                model = cls.from_config(config, compression)
            else:
                config = EmbedderConfig.from_dict(raw, str(folder))
                saved_compression = Compression.parse(config.compression)
                model = cls.from_config(config, compression)
                model._load_trained_weights(folder, saved_compression)
                if config.name is None:
                    config.name = name
        if run_dtype != torch.float32:
            # The index stamp hashes the trained weights as saved (float32), so an index built
            # in one dtype is recognised by the same model loaded in another.
            model.source_state = {k: v.detach().clone() for k, v in model.trained_state_dict().items()}
        if not trainable:
            # LoRA merged into the base weights, in float32 before any cast (one rounding): 2/3
            # fewer LM products, 1.10× in float32 (docs/speed.md). The adapters
            # themselves stay as saved, so save_pretrained and the index stamp see no change.
            model.merge_lora()
        model = model.to(device=target, dtype=run_dtype).eval()
        if target.type == "cuda" and run_dtype == torch.float32:
            exact_float32_on_gpus()
        if target.type == "cpu" and run_dtype == torch.bfloat16:
            # Batch-invariant bf16: every product (LM, connector) packed once and run in fixed row
            # blocks, and a padded batch's attention run row by row (docs/serving.md).
            pack_linears(model.backbone)
            use_rowwise_sdpa(model.backbone.decoder)
        if not trainable:
            model.prefix_states = PrefixStates()
        return model

    def merge_lora(self) -> int:
        """Add every LoRA delta into its base weight (inference only: merged adapters get no
        gradient).  The LoRA parameters stay, so ``save_pretrained`` and the index fingerprint
        are unchanged.  Returns how many layers were merged."""
        from peft.tuners.lora import LoraLayer

        merged = 0
        with torch.no_grad():
            for module in self.backbone.decoder.modules():
                if not isinstance(module, LoraLayer) or module.merged:
                    continue
                for name in module.active_adapters:
                    if name in module.lora_variant or module.lora_bias.get(name):
                        module.merge(adapter_names=[name])  # DoRA and friends: peft's own merge
                        continue
                    # Into a new tensor, not in place as peft's merge does: the base weights are
                    # memory-mapped from the model cache, and a write copies each page on first
                    # touch (magic-mm-tiny: 1.62–1.79 s against 0.35 s this way).
                    base = module.get_base_layer()
                    base.weight.data = base.weight.data + module.get_delta_weight(name)
                    module.merged_adapters.append(name)
                merged += 1
        return merged

    def _load_trained_weights(self, folder: Path, saved: Compression) -> None:
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise ModelFolderError(f"{folder}: has no {WEIGHTS_FILE}; re-save the model with save_pretrained")
        current = Compression.parse(self.config.compression)
        if saved.channel_multiplier() != current.channel_multiplier():
            raise ModelFolderError(
                f"{folder}: its connector was trained with compression {saved}, which cannot be "
                f"swapped for {current} (the channel count differs); keep {saved} or retrain"
            )
        try:
            state = load_file(path)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFolderError(f"{path}: unreadable weights ({exc}); re-save the model") from None
        expected = self.trained_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or wrong_shape:
            raise ModelFolderError(
                f"{folder}: weights do not match its config ({self.config.family} backbone): "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]}; "
                "the folder was saved from a different model"
            )
        with torch.no_grad():
            for key, value in self.trained_parameters().items():
                value.copy_(state[key])

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Everything this project trains: connector (and similar) plus LoRA, by saved name."""
        params = {}
        for module_name, module in self.backbone.trainable_modules().items():
            for name, p in module.named_parameters():
                params[f"{module_name}.{name}"] = p
        for name, p in self.backbone.decoder.named_parameters():
            if "lora_" in name:
                params[LORA_PREFIX + name] = p
        return params

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.trained_parameters().items()}

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``config.json`` and the trained weights only (connector, LoRA)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trained_state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE, metadata={"format": "magic-mm"})
        (folder / CONFIG_FILE).write_text(self.config.to_json())
        return folder

    def add_lora(self, settings: LoraSettings | None = None) -> None:
        """Insert LoRA adapters into the LM (done by training; restored by from_pretrained)."""
        from peft import LoraConfig, inject_adapter_in_model

        settings = settings or LoraSettings()
        lora_config = LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
            target_modules=list(settings.targets),
        )
        inject_adapter_in_model(lora_config, self.backbone.decoder)
        self.config.lora = settings
        if self.prefix_states is not None:
            self.prefix_states.clear()  # new parameters: stored states no longer match

    # -- embedding ------------------------------------------------------------------
    @property
    def placement(self) -> dict[str, str]:
        """Where the vectors are computed: ``{"device": "cpu", "dtype": "float32"}`` (``auto`` resolved)."""
        return {"device": str(self.backbone.device), "dtype": dtype_name(self.backbone.dtype)}

    @property
    def embedding_dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def compression(self) -> Compression:
        return self.backbone.compression

    def prepare(self, inputs: Iterable[Any], start_index: int = 0) -> list[PreparedInput]:
        """Validate and decode inputs; raises a ``UserError`` naming the first bad one."""
        return [self._prepare(item, start_index + i) for i, item in enumerate(inputs)]

    def encode(
        self,
        inputs: Sequence[Any],
        instruction: str | None = None,
        role: Role = "query",
        batch_size: int = 16,
        show_progress: bool = False,
        normalize: bool = True,
        dim: int | None = None,
        workers: int | None = None,
    ) -> np.ndarray:
        """Embed texts, images (path / PIL / bytes) and (image, text) pairs → ``(N, D)`` float32.

        ``role`` picks the prompt (``Query:`` vs ``Text:``) and the default instruction
        from the model config; pass ``instruction=""`` for none.  ``dim`` keeps the first
        ``dim`` components (Matryoshka truncation), re-normalised if ``normalize``.
        ``workers`` (default ``self.model_workers``): on a CPU, successive batches run side by
        side on this many threads, each with its share of torch's intra-op threads; 1 runs every
        batch here on all of them (``magic_mm.model.workers``).
        """
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise BadInputError("encode() takes a list of inputs; wrap a single input in a list")
        if role not in ROLES:
            raise BadInputError(f"role must be 'query' or 'candidate', got {role!r}")
        if dim is not None and not 1 <= dim <= self.embedding_dim:
            raise BadInputError(f"dim={dim} is out of range; choose 1..{self.embedding_dim}")
        if batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {batch_size}")
        if workers is not None and workers < 1:
            raise BadInputError(f"workers must be >= 1, got {workers}")
        # Texts are checked (cheap) in input order first, so a bad text is reported before any
        # image is decoded; images are checked as their batch is decoded.
        items = [self._check_text(item, i) for i, item in enumerate(inputs)]
        # Sorted by length (as sentence-transformers does): similar lengths share a batch, so
        # little compute goes to padding; the vectors go back to input order at the end.
        order = sorted(range(len(items)), key=lambda i: _length_key(items[i]))
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        vectors: list[torch.Tensor] = []

        def embed(prepared_batch: tuple[list[int], list[PreparedInput]]) -> torch.Tensor:
            with torch.inference_mode():  # per thread: entered on the worker that runs the batch
                return self.embed_prepared(prepared_batch[1], role, instruction).float().cpu()

        workers = self.model_workers if workers is None else workers
        pool = model_worker_pool(self.backbone.device, workers) if len(batches) > 1 else None
        with progress(len(inputs), show_progress, f"embedding ({role}s)") as advance, \
                closing(self._prefetched(items, batches)) as prepared, pool or nullcontext():
            for (batch, _), pooled in map_in_order(embed, prepared, pool, workers):
                vectors.append(pooled)
                advance(len(batch))
        if not vectors:
            return np.zeros((0, dim or self.embedding_dim), dtype=np.float32)
        sorted_rows = torch.cat(vectors)
        out = torch.empty_like(sorted_rows)
        out[torch.tensor(order, dtype=torch.long)] = sorted_rows  # back to input order
        if dim is not None:
            out = out[:, :dim]
        if normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.numpy()

    def _check_text(self, item: Any, index: int) -> Any:
        """``item`` if text-only and valid → its ``PreparedInput``; image items pass unchanged
        (validated when decoded).  Raises the usual ``UserError`` naming the input."""
        if isinstance(item, PreparedInput):
            return item
        mm = as_input(item)
        if mm.image is None:
            return self._prepare(item, index)
        return _Pending(mm, index)

    def _prepare(self, item: Any, index: int | None) -> PreparedInput:
        return prepare(item, index, self.max_image_pixels, self.backbone.decode_size)

    def _prepare_for_model(self, item: Any) -> PreparedInput:
        """Decode (and, where the backbone allows, resize) one image on a worker thread."""
        if isinstance(item, _Pending):
            item = self._prepare(item.item, item.index)
        if not isinstance(item.image, Image.Image):  # no image, or cached vision features
            return item
        return PreparedInput(text=item.text, image=self.backbone.prepare_image(item.image), name=item.name)

    def _prefetched(self, items: list[Any], batches: list[list[int]]) -> Generator[tuple[list[int], list[PreparedInput]], None, None]:
        """Yield each batch's prepared inputs; the next batch is decoded on worker threads
        while the caller runs the model on the current one.  A bad image raises its
        ``UserError`` (the lowest input index of the batch, if several are bad)."""
        if not batches:
            return
        if self.decode_threads < 1 or not any(_has_image_work(items[i]) for batch in batches for i in batch):
            # decode inline: threads are off, or there is nothing to decode (texts only)
            for batch in batches:
                yield batch, [self._prepare_for_model(items[i]) for i in batch]
            return
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="magic-mm-decode") as pool:

            def submit(batch: list[int]) -> list[Future]:
                return [pool.submit(self._prepare_for_model, items[i]) for i in batch]

            upcoming = submit(batches[0])
            try:
                for n, batch in enumerate(batches):
                    current = upcoming
                    upcoming = submit(batches[n + 1]) if n + 1 < len(batches) else []
                    failures = sorted(((i, f.exception()) for i, f in zip(batch, current) if f.exception()),
                                      key=lambda pair: pair[0])
                    if failures:
                        raise failures[0][1]
                    yield batch, [f.result() for f in current]
            finally:
                for f in upcoming:
                    f.cancel()

    def encode_queries(self, inputs: Sequence[Any], **kwargs: Any) -> np.ndarray:
        return self.encode(inputs, role="query", **kwargs)

    def encode_candidates(self, inputs: Sequence[Any], **kwargs: Any) -> np.ndarray:
        return self.encode(inputs, role="candidate", **kwargs)

    @staticmethod
    def similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
        """Cosine similarity matrix ``(len(a), len(b))``."""
        ta = torch.nn.functional.normalize(torch.as_tensor(np.asarray(a), dtype=torch.float32).reshape(len(a), -1), dim=-1)
        tb = torch.nn.functional.normalize(torch.as_tensor(np.asarray(b), dtype=torch.float32).reshape(len(b), -1), dim=-1)
        return (ta @ tb.T).numpy()

    def embed_prepared(self, batch: list[PreparedInput], role: Role, instruction: str | None = None) -> torch.Tensor:
        """Differentiable core: prepared inputs → un-normalised last-token states ``(B, D)``
        (the final, post-norm hidden state of each prompt's last token)."""
        return self.embed_prompts(self.prompts(batch, role, instruction))

    def lm_batch(self, batch: list[PreparedInput], role: Role, instruction: str | None = None) -> LMBatch:
        """The padded LM batch of the inputs' prompts, each image spliced in where ``<image>`` stands."""
        return build_lm_batch(self.backbone, self.prompts(batch, role, instruction))

    def prompts(self, batch: Sequence[PreparedInput], role: Role, instruction: str | None = None) -> list[list[Any]]:
        """The LM prompt of each input: text segments with its image where ``<image>`` stands.
        ``instruction=None`` takes the model's default for ``role``; ``""`` means none."""
        if instruction is None:
            instruction = self.config.instructions.get(role, "")
        # Cut like a text (once per call, not per input): an instruction of any length would
        # otherwise run whole through the LM.
        instruction = self._truncate(instruction, "instruction") if instruction else instruction
        out = []
        for item in batch:
            text = self._truncate(item.text, item.name) if item.text else None
            prompt = build_prompt(role, instruction, text, item.image is not None)
            out.append([item.image if segment is IMAGE else segment for segment in prompt.segments])
        return out

    def embed_prompts(self, prompts: list[list[Any]]) -> torch.Tensor:
        """``(B, D)`` last-token states of LM prompts (``prompts``).

        With ``prefix_states`` (a model loaded for inference) and no gradient wanted, prompts are
        grouped by the instruction line they open with, and each group runs through the LM on top
        of that line's stored states: a query with the default instruction runs 20 tokens instead
        of 35. The images of all groups are encoded in one call."""
        if not prompts:
            return torch.empty(0, self.embedding_dim, device=self.backbone.device, dtype=self.backbone.dtype)
        if self.prefix_states is None or torch.is_grad_enabled():
            return last_token_states(self.backbone, build_lm_batch(self.backbone, prompts))
        groups: dict[str | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(shared_opening(prompt), []).append(i)
        if len(groups) > 1:
            prompts = with_images_encoded(self.backbone, prompts)  # one vision call for all groups
        out: torch.Tensor | None = None
        for opening, rows in groups.items():
            lm = build_lm_batch(self.backbone, [prompts[i] for i in rows])
            states = last_token_states(self.backbone, lm, None if opening is None
                                       else self.prefix_states.get(self.backbone, opening, lm))
            if out is None:
                out = states.new_empty(len(prompts), states.shape[-1])
            out[rows] = states
        return out

    def _truncate(self, text: str, name: str) -> str:
        ids = self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = self.config.max_text_tokens
        if len(ids) <= limit:
            return text
        warnings.warn(
            f"{name}: text has {len(ids)} tokens; truncated to the first {limit} "
            "(raise max_text_tokens in the model config to keep more)",
            TextTruncatedWarning,
            stacklevel=4,
        )
        return self.backbone.tokenizer.decode(ids[:limit])

    # -- description ----------------------------------------------------------------
    def info(self, image_size: tuple[int, int] = (448, 448)) -> dict[str, Any]:
        """Model, parts, dimensions and visual tokens per image with and without compression."""
        width, height = image_size
        trained = sum(p.numel() for p in self.trained_parameters().values())
        return {
            "model": self.config.name,
            "family": self.config.family,
            "backbone": self.config.backbone,
            "parts": self.backbone.describe_parts(),
            "lora": None if self.config.lora is None else vars(self.config.lora),
            "trained_parameters": trained,
            "embedding_dim": self.embedding_dim,
            "compression": str(self.compression),
            "image_size": [width, height],
            "tiles_per_image": len(self.backbone.tiles_for_size(width, height)),
            "visual_tokens": {
                "none": self.backbone.visual_tokens(width, height, Compression()),
                str(self.compression): self.backbone.visual_tokens(width, height),
            },
            "instructions": self.config.instructions,
            "max_text_tokens": self.config.max_text_tokens,
        }
