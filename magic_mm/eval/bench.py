"""The efficiency benchmark behind ``magic-mm bench``.

What is measured, per compression variant of one model:

* visual tokens per image and the LM sequence length of a query and a candidate;
* latency at batch 1: a *query* is a caption (text, query prompt), a *candidate*
  an image (candidate prompt) — the two sides of text→image retrieval;
* throughput: candidates per second when ``batch`` images go in one call;
* peak memory: the peak RSS of a fresh process that loads the model and runs one
  throughput batch (on CPU; ``torch.cuda.max_memory_allocated`` on a GPU);
* where the time goes: for a candidate at batch 1 (and per candidate in the throughput
  batch), the milliseconds spent in the vision encoder, in the LM and elsewhere
  (tokenising, connector, pooling), the GFLOP each part computes (counted with
  ``torch.utils.flop_counter``) and the GFLOP/s it reaches against the peak of the LM's
  MLP products at 1,024 rows, measured at the start of the run (``matmul_peak``), in float32
  and, where the device runs it natively, bfloat16.

Device and dtype: ``--device`` (default: ``cuda`` when a GPU is visible, else ``cpu``)
and ``--dtype`` (default ``auto``, see ``magic_mm.model.dtypes``).  On a GPU every timed
call is bracketed by ``torch.cuda.synchronize()``, so the time is the GPU's, not the
launch's; latency is per candidate at batch 1, as the paper measured it.

Fairness: all variants of one model are timed in *one* process, sharing the
weights (only the parameter-free compression is swapped), with the repetitions
interleaved (rep 1 of every variant, then rep 2, …), so drift and other load on
the machine hit all variants alike.  Memory needs a fresh process per variant
(a process's peak RSS never goes down), so every measurement runs in a worker
subprocess, one at a time: the parent stays small and big random models are
never held twice.

Random-initialisation architectures (speed needs no trained weights):
``internvl3-1b`` / ``internvl3-2b`` (InternVL3-shaped InternViT-300M + Qwen2.5
0.5B / 1.5B, through the same ``MagicEmbedder`` pipeline) and ``clip-vit-b32``
(transformers' CLIPModel with ViT-B/32 shapes: the dual encoder a user would
otherwise pick).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from magic_mm.errors import UserError

ARCHS = ("internvl3-1b", "internvl3-2b", "clip-vit-b32")
# Qwen2.5 text shapes of InternVL3-1B / -2B; the vision side (InternViT-300M, 448-px
# tiles, patch 14) is transformers' InternVLVisionConfig default.
INTERNVL3_TEXT = {
    "internvl3-1b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "internvl3-2b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
}
QWEN25_VOCAB = 151674
IMAGE_SIZE = 448  # natural images are given at 448×448: one InternVL tile, the default model's input size


@dataclass
class BenchSettings:
    model: str = "magic-mm-tiny"
    compressions: list[str] = field(default_factory=lambda: ["none", "bilinear:2", "bilinear:4", "avgpool:4"])
    reps: int = 5  # interleaved repetitions
    items: int = 4  # distinct queries / candidates timed per repetition
    batch: int = 8  # throughput batch (0: skip)
    archs: list[str] = field(default_factory=list)
    arch_compressions: list[str] = field(default_factory=lambda: ["none", "bilinear:2"])
    arch_reps: int = 3
    arch_items: int = 1
    arch_batch: int = 0  # random architectures are slow on CPU: no throughput batch by default
    data: Path = Path("../shared/data/flickr8k-1k")
    memory: bool = True
    threads: int | None = None
    dtype: str = "auto"
    device: str = "auto"  # the GPU when torch sees one, else the CPU


# -- the things being timed ------------------------------------------------------------
class EmbedderSubject:
    """A ``MagicEmbedder`` whose compression is swapped between variants (weights shared)."""

    splittable = True

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.models = {embedder.compression.channel_multiplier(): embedder}
        self.variant = str(embedder.compression)

    def set_variant(self, spec: str) -> None:
        from magic_mm.model.compression import Compression

        comp = Compression.parse(spec)
        model = self.models.get(comp.channel_multiplier())
        if model is None:
            raise UserError(f"--compression {spec}: changes the connector's input width; bench it on its own")
        model.backbone.compression = comp
        model.config.compression = str(comp)
        self.embedder, self.variant = model, str(comp)

    def query(self, texts: list[Any]) -> None:
        self.embedder.encode(texts, role="query", batch_size=len(texts))

    def candidate(self, images: list[Any]) -> None:
        self.embedder.encode(images, role="candidate", batch_size=len(images))

    def shape(self, text: Any, image: Any) -> dict[str, int]:
        return {"visual_tokens": int(self.embedder.backbone.visual_tokens(*image.image.size)),
                "query_seq_len": self._lm_length(self.query, text),
                "candidate_seq_len": self._lm_length(self.candidate, image)}

    def _lm_length(self, run: Any, item: Any) -> int:
        """The sequence length the LM actually runs for one input (read by a hook): the tokens
        after the instruction line, whose states a model loaded for inference stores once."""
        seen: list[int] = []

        def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            seen.append(int(kwargs["inputs_embeds"].shape[1]))

        handle = self.embedder.backbone.decoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            run([item])
        finally:
            handle.remove()
        return seen[-1]  # the first call may be the instruction line's, stored for later


class ClipSubject:
    """A CLIP dual encoder: texts through the text tower, images through the vision tower."""

    splittable = False

    def __init__(self, device: Any = "cpu", dtype: Any = None) -> None:
        import torch
        from transformers import CLIPConfig, CLIPModel

        from magic_mm.model.backbones.composed import smollm2_tokenizer

        torch.manual_seed(0)
        self.model = CLIPModel(CLIPConfig()).eval()  # the defaults are ViT-B/32's shapes
        self.model.to(device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype or torch.float32
        self.tokenizer = smollm2_tokenizer()
        self.variant = "none"
        self.size = self.model.config.vision_config.image_size

    def set_variant(self, spec: str) -> None:
        if spec != "none":
            raise UserError(f"clip-vit-b32 has no compression; got {spec}")

    def _ids(self, texts: list[Any]) -> Any:
        import torch

        vocab = self.model.config.text_config.vocab_size
        ids = [[t % vocab for t in self.tokenizer(p.text)["input_ids"][:77]] for p in texts]
        longest = max(map(len, ids))
        return (torch.tensor([i + [0] * (longest - len(i)) for i in ids]),
                torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids]))

    def query(self, texts: list[Any]) -> None:
        import torch

        ids, mask = self._ids(texts)
        with torch.inference_mode():
            self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))

    def _pixels(self, images: list[Any]) -> Any:
        import torch
        from PIL import Image

        arrays = [np.asarray(p.image.resize((self.size, self.size), Image.BICUBIC), dtype=np.float32) / 255.0
                  for p in images]
        return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.45) / 0.27

    def candidate(self, images: list[Any]) -> None:
        import torch

        with torch.inference_mode():
            self.model.get_image_features(pixel_values=self._pixels(images).to(self.device, self.dtype))

    def shape(self, text: Any, image: Any) -> dict[str, int]:
        patch = self.model.config.vision_config.patch_size
        return {"visual_tokens": (self.size // patch) ** 2, "query_seq_len": int(self._ids([text])[0].shape[1]),
                "candidate_seq_len": (self.size // patch) ** 2 + 1}  # + CLS, in the vision tower


def random_internvl(arch: str, compression: str) -> Any:
    """A ``MagicEmbedder`` over a randomly initialised InternVL3-1B/2B-shaped model."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from magic_mm import MagicEmbedder
    from magic_mm.model.backbones.composed import smollm2_tokenizer
    from magic_mm.model.backbones.internvl import InternVLBackbone
    from magic_mm.model.compression import Compression
    from magic_mm.model.config import EmbedderConfig

    text = {"model_type": "qwen2", "vocab_size": QWEN25_VOCAB, "max_position_embeddings": 32768,
            "rope_theta": 1_000_000.0, "tie_word_embeddings": True, **INTERNVL3_TEXT[arch]}
    config = InternVLConfig(text_config=text, image_token_id=QWEN25_VOCAB - 7)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    spec = {"base": f"random:{arch}"}
    # One 448-px tile per natural image (no thumbnail), as the paper's latency figures use.
    backbone = InternVLBackbone(spec, Compression.parse(compression), model, smollm2_tokenizer(),
                                {"max_patches": 1, "crop_to_patches": False})
    return MagicEmbedder(EmbedderConfig(family="internvl", backbone=spec, compression=compression, name=arch),
                         backbone).eval()


class NotEnoughMemory(UserError):
    """The machine has no room for a model right now."""


# fp32 bytes of the random models (parameters only), to wait for room on a shared machine.
ARCH_BYTES = {"internvl3-1b": 0.94e9 * 4, "internvl3-2b": 2.1e9 * 4}


def wait_for_memory(needed: float, label: str, timeout_s: float = 900.0) -> None:
    """Block until ``needed`` bytes (plus 25%) are available, so a big model never pushes
    other people's processes into the OOM killer; give up with a clear error."""
    deadline = time.monotonic() + timeout_s
    while True:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
        if available >= needed * 1.25:
            return
        if time.monotonic() > deadline:
            raise NotEnoughMemory(f"{label}: needs about {needed / 2**30:.1f} GiB of free memory, only "
                            f"{available / 2**30:.1f} GiB available; retry when the machine is less busy")
        time.sleep(10)


def build_subject(target: dict[str, Any], compression: str, memory_wait_s: float = 600.0,
                  device: str = "cpu", dtype: str = "auto") -> Any:
    from magic_mm.model.dtypes import resolve_dtype

    run_dtype = resolve_dtype(dtype, device)
    if target["kind"] == "embedder":
        from magic_mm import MagicEmbedder

        return EmbedderSubject(MagicEmbedder.from_pretrained(target["model"], compression=compression,
                                                             device=device, dtype=dtype))
    if target["kind"] == "clip":
        return ClipSubject(device, run_dtype)
    wait_for_memory(ARCH_BYTES[target["arch"]], target["arch"], memory_wait_s)
    return EmbedderSubject(random_internvl(target["arch"], compression).to(device=device, dtype=run_dtype))


def bench_inputs(data: Path, count: int) -> tuple[list[Any], list[Any]]:
    """``count`` (caption, 448×448 image) pairs from an image–caption folder, or synthetic ones."""
    from PIL import Image

    from magic_mm.model.inputs import PreparedInput

    texts, images = [], []
    if (data / "captions.csv").is_file():
        from magic_mm.data.captions import read_captioned_images

        items = read_captioned_images(data)[:count]
        for n, item in enumerate(items):
            img = Image.open(item.path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            texts.append(PreparedInput(item.captions[0], None, f"caption {n}"))
            images.append(PreparedInput(None, img, item.image))
    rng = np.random.default_rng(0)
    while len(images) < count:  # no data folder: deterministic noise images
        n = len(images)
        pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        texts.append(PreparedInput("A dog runs across a grassy field with a ball.", None, f"caption {n}"))
        images.append(PreparedInput(None, Image.fromarray(pixels), f"noise {n}"))
    return texts, images


# -- worker side -----------------------------------------------------------------------
def _sync(device: Any) -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so a timer sees the real end."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, *args: Any, device: Any = "cpu") -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


# (m, k, n): the LM's two MLP products at the rows a batch of 16 candidates gives (576 = SmolLM2's width)
PEAK_SHAPES = ((1024, 576, 1536), (1024, 1536, 576))
# On a GPU those shapes are launch-bound: an H200 ran them at 81 TFLOP/s in bf16, and the
# InternVL3-2B shape's batched parts then read 520 % "of peak". A square 8192 product fills it.
GPU_PEAK_SHAPES = PEAK_SHAPES + ((8192, 8192, 8192),)


def peak_shapes(device: Any) -> tuple[tuple[int, int, int], ...]:
    """The matmul shapes ``matmul_peak`` times on ``device``."""
    import torch

    return GPU_PEAK_SHAPES if torch.device(device).type == "cuda" else PEAK_SHAPES


def matmul_peak(device: Any = "cpu", reps: int = 10) -> dict[str, float]:
    """GFLOP/s of the ``peak_shapes`` matmuls in float32, and in bfloat16 where the device runs it
    natively: the practical ceiling the model's parts are compared with.  The fastest of ``reps``
    repetitions of the faster shape, after a warm-up: on a shared machine other work only ever
    slows a run, and a median of 5 at 512 rows read 87 GFLOP/s where the model's own products ran
    at 149 (AMD EPYC, float32)."""
    import torch

    from magic_mm.model.dtypes import cpu_runs_bf16

    dtypes = [torch.float32]
    if torch.device(device).type != "cpu" or cpu_runs_bf16():
        dtypes.append(torch.bfloat16)
    out = {}
    for dtype in dtypes:
        best = 0.0
        for m, k, n in peak_shapes(device):
            a = torch.randn(m, k, device=device).to(dtype)
            b = torch.randn(k, n, device=device).to(dtype)
            with torch.inference_mode():
                for _ in range(2):
                    a @ b
                fastest_ms = min(_timed(torch.matmul, a, b, device=device) for _ in range(reps))
            best = max(best, 2.0 * m * k * n / (fastest_ms / 1000.0) / 1e9)
        out[str(dtype).removeprefix("torch.")] = round(best, 1)
    return out


_FUSED_OPS_COUNTED = False


def count_fused_onednn_ops() -> None:
    """Teach ``FlopCounterMode`` the fused oneDNN ops magic-mm's CPU path calls: the vision
    encoder's convolution + ReLU6 and the LM's packed linears (their default overloads, the
    ones called). It knows only the plain aten ops and would count those parts as zero."""
    global _FUSED_OPS_COUNTED
    if _FUSED_OPS_COUNTED:
        return
    import torch
    from torch.utils.flop_counter import conv_flop_count, register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._convolution_pointwise)
    def _conv(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape)

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _linear(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        rows = int(np.prod(x_shape[:-1]))
        return 2 * rows * int(w_shape[1]) * int(w_shape[0])  # weight (out, in), packed or not

    _FUSED_OPS_COUNTED = True


def gqa_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                  **kwargs: Any) -> int:
    """FLOPs of one fused attention call, (b, heads, seq, dim) shapes, where key and value may have
    fewer heads than the query (grouped-query attention, shared across head groups). torch before
    2.13 asserts equal heads, and transformers passes grouped heads to the fused GPU kernels."""
    batch, heads, q_len, q_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * q_len * k_len * (q_dim + v_dim)  # scores = q·kᵀ, then scores·v


def flop_counter() -> Any:
    """A ``FlopCounterMode`` that also counts the CPU path's fused oneDNN ops and grouped-query attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    count_fused_onednn_ops()
    aten = torch.ops.aten
    fused_attention = [getattr(aten, name) for name in ("_scaled_dot_product_efficient_attention",
                                                        "_scaled_dot_product_flash_attention",
                                                        "_scaled_dot_product_cudnn_attention") if hasattr(aten, name)]
    return FlopCounterMode(display=False, custom_mapping={op: gqa_sdpa_flop for op in fused_attention})


class PartClock:
    """Times (or counts the FLOPs of) the vision encoder and the LM inside ``encode`` calls.

    The backbone's ``vision_grid`` (vision encoder) is wrapped on the instance and the
    decoder gets forward hooks; on a GPU each boundary synchronises, so a part's time is
    its GPU time.  ``counting`` swaps timing for ``FlopCounterMode`` around each part.
    """

    def __init__(self, embedder: Any, device: Any) -> None:
        self.backbone = embedder.backbone
        self.device = device
        self.counting = False
        self.ms = {"vision": 0.0, "lm": 0.0}
        self.flop = {"vision": 0.0, "lm": 0.0}
        self._handles: list[Any] = []
        self._lm_start = 0.0
        self._lm_counter: Any = None

    def __enter__(self) -> PartClock:
        original = self.backbone.vision_grid

        def vision_grid(pixels: Any) -> Any:
            if self.counting:
                with flop_counter() as counter:
                    out = original(pixels)
                self.flop["vision"] += counter.get_total_flops()
                return out
            _sync(self.device)
            start = time.perf_counter()
            out = original(pixels)
            _sync(self.device)
            self.ms["vision"] += (time.perf_counter() - start) * 1000.0
            return out

        def lm_pre(module: Any, args: Any) -> None:
            if self.counting:
                self._lm_counter = flop_counter()
                self._lm_counter.__enter__()
                return
            _sync(self.device)
            self._lm_start = time.perf_counter()

        def lm_post(module: Any, args: Any, output: Any) -> None:
            if self.counting:
                self._lm_counter.__exit__(None, None, None)
                self.flop["lm"] += self._lm_counter.get_total_flops()
                return
            _sync(self.device)
            self.ms["lm"] += (time.perf_counter() - self._lm_start) * 1000.0

        self.backbone.vision_grid = vision_grid  # instance attribute shadows the method
        decoder = self.backbone.decoder
        self._handles = [decoder.register_forward_pre_hook(lm_pre), decoder.register_forward_hook(lm_post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.backbone.vision_grid
        for handle in self._handles:
            handle.remove()

    def reset(self) -> None:
        self.ms = {"vision": 0.0, "lm": 0.0}
        self.flop = {"vision": 0.0, "lm": 0.0}


def time_split(subject: Any, images: list[Any], items: int, batch: int, peak: dict[str, float],
               device: Any) -> dict[str, Any]:
    """Where a candidate's time goes: vision encoder vs LM (vs the rest), and the GFLOP/s each
    reaches against the matmul ``peak`` in the model's dtype; at batch 1 over the first
    ``items`` images, and per candidate in one batch of ``batch`` if ``batch`` > 1."""
    embedder = subject.embedder
    dtype = str(embedder.backbone.dtype).removeprefix("torch.")
    ceiling = peak.get(dtype)
    out: dict[str, Any] = {"dtype": dtype, "peak_gflops_per_s": ceiling}
    with PartClock(embedder, device) as clock:
        clock.counting = True
        subject.candidate(images[:1])
        flop = dict(clock.flop)
        clock.counting = False
        runs = [("batch_1", [[img] for img in images[:items]])]
        if batch > 1:
            runs.append((f"batch_{batch}", [images[:batch]]))
        for label, groups in runs:
            rows = []
            for group in groups:
                clock.reset()
                total = _timed(subject.candidate, group, device=device)
                rows.append((total / len(group), clock.ms["vision"] / len(group), clock.ms["lm"] / len(group)))
            total_ms, vision_ms, lm_ms = (float(np.median([r[i] for r in rows])) for i in range(3))
            part = {"candidates_per_call": len(groups[0]), "total_ms": round(total_ms, 2),
                    "vision_ms": round(vision_ms, 2), "lm_ms": round(lm_ms, 2),
                    "other_ms": round(max(total_ms - vision_ms - lm_ms, 0.0), 2),
                    "vision_share": round(vision_ms / total_ms, 3) if total_ms else None,
                    "lm_share": round(lm_ms / total_ms, 3) if total_ms else None}
            for name, ms in (("vision", vision_ms), ("lm", lm_ms)):
                gflops = flop[name] / 1e9 / (ms / 1000.0) if ms > 0 else None
                part[f"{name}_gflop"] = flop[name] / 1e9  # unrounded: a tiny test model's LM is ~1e-4
                part[f"{name}_gflops_per_s"] = gflops
                part[f"{name}_of_peak"] = None if gflops is None or not ceiling else round(gflops / ceiling, 4)
            out[label] = part
    return out


def time_job(job: dict[str, Any]) -> dict[str, Any]:
    """All variants of one target in this process, repetitions interleaved."""
    variants = job["variants"]
    device, dtype = job.get("device") or "cpu", job.get("dtype") or "auto"
    try:
        subject = build_subject(job["target"], variants[0], device=device, dtype=dtype)
    except NotEnoughMemory as exc:  # reported as skipped; the rest of the benchmark goes on
        return {v: {"skipped": str(exc), "visual_tokens": None, "query_seq_len": None, "candidate_seq_len": None,
                    "query_ms": [], "candidate_ms": [], "throughput": []} for v in variants}
    peak = matmul_peak(device)
    texts, images = bench_inputs(Path(job["data"]), max(job["items"], job["batch"], 1))
    raw: dict[str, dict[str, Any]] = {v: {"query_ms": [], "candidate_ms": [], "throughput": []}
                                      for v in variants}
    shapes = {}
    for v in variants:  # warm-up, and the token counts
        subject.set_variant(v)
        subject.query(texts[:1])
        subject.candidate(images[:1])
        shapes[v] = subject.shape(texts[0], images[0])
    for _ in range(job["reps"]):
        for v in variants:
            subject.set_variant(v)
            for n in range(job["items"]):
                raw[v]["query_ms"].append(_timed(subject.query, texts[n : n + 1], device=device))
                raw[v]["candidate_ms"].append(_timed(subject.candidate, images[n : n + 1], device=device))
            if job["batch"]:
                ms = _timed(subject.candidate, images[: job["batch"]], device=device)
                raw[v]["throughput"].append(job["batch"] / (ms / 1000.0))
    for v in variants:  # after the timed reps, so the hooks never touch them
        subject.set_variant(v)
        raw[v]["split"] = (time_split(subject, images, job["items"], job["batch"], peak, device)
                           if subject.splittable else None)
        raw[v]["peak_gflops_per_s"] = peak
    return {v: {**shapes[v], **raw[v]} for v in variants}


def memory_job(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of a fresh process that loads the target and runs one batch of candidates."""
    import torch

    variant = job["variants"][0]
    device, dtype = job.get("device") or "cpu", job.get("dtype") or "auto"
    try:
        # Short wait: if the timing run found room, this one will too.
        subject = build_subject(job["target"], variant, memory_wait_s=60.0, device=device, dtype=dtype)
    except NotEnoughMemory as exc:
        return {"skipped": str(exc), "rss_loaded_mib": None, "peak_mib": None, "batch": max(job["batch"], 1)}
    subject.set_variant(variant)
    loaded = rss_mib()
    texts, images = bench_inputs(Path(job["data"]), max(job["batch"], 1))
    subject.query(texts[:1])
    subject.candidate(images[: max(job["batch"], 1)])
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        # ru_maxrss is KiB on Linux.  The kernel updates that high-water mark lazily, so it can
        # trail an RSS read a moment ago; the peak is at least every RSS actually seen.
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, loaded, rss_mib())
    return {"rss_loaded_mib": loaded, "peak_mib": peak, "batch": max(job["batch"], 1)}


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker_main(argv: list[str]) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    job = json.loads(argv[0])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        result = (time_job if job["job"] == "time" else memory_job)(job)
    except UserError as exc:
        print("BENCH-USERERROR " + str(exc))
        sys.exit(2)
    print("BENCH-RESULT " + json.dumps(result))


# -- parent side -----------------------------------------------------------------------
def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "magic_mm.eval.bench", json.dumps(job)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT "):])
        if line.startswith("BENCH-USERERROR "):
            raise UserError(line[len("BENCH-USERERROR "):])
    raise RuntimeError(f"bench worker for {job['target']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def summarise(raw: dict[str, Any], memory: dict[str, Any] | None) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "n": len(values)}

    return {
        **({"skipped": raw["skipped"]} if raw.get("skipped") else {}),
        "visual_tokens": raw["visual_tokens"], "query_seq_len": raw["query_seq_len"],
        "candidate_seq_len": raw["candidate_seq_len"],
        "query_ms": stats(raw["query_ms"]), "candidate_ms": stats(raw["candidate_ms"]),
        "throughput_per_s": stats(raw["throughput"]), "memory": memory,
        "split": raw.get("split"),
    }


def add_ratios(rows: dict[str, dict[str, Any]]) -> str:
    """Each variant's ratios against ``none`` (or the first variant if ``none`` was not run)."""
    base_name = "none" if "none" in rows else next(iter(rows))
    base = rows[base_name]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def median(row: dict[str, Any], key: str) -> float | None:
        return row[key]["median"] if row.get(key) else None

    for row in rows.values():
        row["ratios"] = {
            "visual_tokens": ratio(row["visual_tokens"], base["visual_tokens"]),
            "candidate_seq_len": ratio(row["candidate_seq_len"], base["candidate_seq_len"]),
            "query_ms": ratio(median(row, "query_ms"), median(base, "query_ms")),
            "candidate_ms": ratio(median(row, "candidate_ms"), median(base, "candidate_ms")),
            "throughput": ratio(median(row, "throughput_per_s"), median(base, "throughput_per_s")),
            "peak_memory": ratio((row["memory"] or {}).get("peak_mib"), (base["memory"] or {}).get("peak_mib")),
        }
    return base_name


def bench_target(target: dict[str, Any], variants: list[str], reps: int, items: int, batch: int,
                 settings: BenchSettings, advance: Any) -> dict[str, Any]:
    job = {"target": target, "variants": variants, "reps": reps, "items": items, "batch": batch,
           "data": str(settings.data), "threads": settings.threads, "dtype": settings.dtype,
           "device": bench_device(settings)}
    timed = run_worker({**job, "job": "time"})
    advance(1)
    rows = {}
    for v in variants:
        memory = run_worker({**job, "job": "memory", "variants": [v]}) if settings.memory else None
        advance(1)
        rows[v] = summarise(timed[v], memory)
    baseline = add_ratios(rows)
    first = next(iter(timed.values()))
    return {"target": target, "baseline": baseline, "reps": reps, "items_per_rep": items, "batch": batch,
            "peak_gflops_per_s": first.get("peak_gflops_per_s"), "variants": rows}


def bench_device(settings: BenchSettings) -> str:
    from magic_mm.model.dtypes import resolve_device

    return str(resolve_device(settings.device, "--device"))


def run_bench(settings: BenchSettings, tasks: Path | None = None, show_progress: bool = False) -> dict[str, Any]:
    from magic_mm.model.compression import Compression
    from magic_mm.progress import progress

    for spec in settings.compressions + settings.arch_compressions:
        Compression.parse(spec)  # fail fast on a typo
    unknown = [a for a in settings.archs if a not in ARCHS]
    if unknown:
        raise UserError(f"--archs {','.join(unknown)}: unknown; choose from {', '.join(ARCHS)}")
    if settings.reps < 1 or settings.items < 1:
        raise UserError("--reps and --items must be at least 1")
    import torch

    from magic_mm.model.dtypes import describe_choice, dtype_name, parse_dtype, resolve_dtype

    parse_dtype(settings.dtype, "--dtype")
    device = bench_device(settings)  # a UserError for a bad --device, before any worker starts

    jobs = bool(settings.compressions) + len(settings.compressions) + sum(
        1 + (1 if a == "clip-vit-b32" else len(settings.arch_compressions)) for a in settings.archs)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": settings.threads or torch.get_num_threads(),
                    "device": device,
                    "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                    "dtype": dtype_name(resolve_dtype(settings.dtype, device)),
                    "dtype_auto": describe_choice(device),
                    # Other work on a shared machine slows every variant alike (interleaving), but say so.
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
    }
    with progress(jobs, show_progress, "benchmark workers") as advance:
        result["model"] = bench_target({"kind": "embedder", "model": settings.model}, settings.compressions,
                                       settings.reps, settings.items, settings.batch, settings,
                                       advance) if settings.compressions else None
        result["architectures"] = {}
        for arch in settings.archs:
            target = {"kind": "clip"} if arch == "clip-vit-b32" else {"kind": "internvl-random", "arch": arch}
            variants = ["none"] if arch == "clip-vit-b32" else settings.arch_compressions
            result["architectures"][arch] = bench_target(target, variants, settings.arch_reps, settings.arch_items,
                                                         settings.arch_batch, settings, advance)
    if tasks is not None and result["model"] is not None:
        add_quality(result, settings, tasks, show_progress)
    return result


def add_quality(result: dict[str, Any], settings: BenchSettings, tasks: Path, show_progress: bool) -> None:
    """The eval harness's overall score for every compression variant of the model."""
    from magic_mm.eval.harness import EvalSettings, evaluate
    from magic_mm.eval.tasks import load_tasks

    specs = load_tasks(tasks)
    for variant, row in result["model"]["variants"].items():
        summary = evaluate(specs, EvalSettings(model=settings.model, compression=variant, show_progress=show_progress,
                                               dtype=settings.dtype))
        row["quality"] = {"score": summary["averages"]["overall"]["score"],
                          "tasks": {name: t["score"] for name, t in summary["tasks"].items()},
                          "metric": sorted({t["primary"] for t in summary["tasks"].values()})}


if __name__ == "__main__":
    worker_main(sys.argv[1:])
