"""Which device a model runs on, and which number format it runs in there.

Device: ``"auto"`` (the command line's default) is the first CUDA GPU when torch sees one,
else the CPU (``resolve_device``).

Number format:

``"auto"`` (the default everywhere) means bfloat16 where the hardware computes it
natively and float32 elsewhere:

* a CUDA GPU that supports bf16 (Ampere and newer): bf16; an older GPU: float32;
* a CPU with AVX512-BF16 or AMX-BF16 (x86, ``/proc/cpuinfo`` flags ``avx512_bf16`` /
  ``amx_bf16``) or the Arm ``bf16`` extension: bf16;
* any other CPU: float32 (bf16 there is emulated and slower than float32).

"bf16" means bf16 *weights* (the whole model is cast), not float32 weights under
autocast: on this project's CPU the two give the same vectors (mean cosine to float32
> 0.999) and bf16 weights are faster, because autocast re-casts every weight on every
call (see docs/speed.md for the measurement).

The environment variable ``MAGIC_MM_DTYPE`` (float32 / bfloat16 / float16) replaces
what ``"auto"`` resolves to, e.g. to keep a whole test suite or a script in float32
without passing ``--dtype`` to every command; an explicit ``dtype=`` still wins.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from magic_mm.errors import UserError

DTYPE_ENV = "MAGIC_MM_DTYPE"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


class DtypeError(UserError):
    """An unknown dtype name."""


def resolve_device(value: str | torch.device | None, source: str = "device") -> torch.device:
    """``"auto"`` / ``None`` → ``cuda`` when torch sees a GPU, else ``cpu``; any other value is
    checked here, before a slow load, so a typo or a GPU this torch cannot see fails with a
    ``UserError`` that names ``source`` (``device`` in the API, ``--device`` on the command line)."""
    if value is None or str(value).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = f"use one of {', '.join(DEVICE_CHOICES)}"
    try:
        device = torch.device(str(value).strip().lower()) if isinstance(value, str) else torch.device(value)
    except (RuntimeError, TypeError):
        raise UserError(f"{source} {value!r}: unknown device; {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{source} {value!r}: magic-mm runs on a CPU or a CUDA GPU; {choices}")
    if device.type == "cuda":
        fix = "--device cpu" if source.startswith("--") else "device='cpu'"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"{source} {value!r}: no CUDA GPU is visible to this torch; use {fix}")
        if device.index is not None and device.index >= count:
            raise UserError(f"{source} {value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def parse_dtype(value: str | torch.dtype | None, source: str = "dtype") -> torch.dtype | None:
    """A dtype name → ``torch.dtype``; ``None`` / ``"auto"`` → ``None`` (decide per device)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower()
    if key == "auto":
        return None
    try:
        return _NAMES[key]
    except KeyError:
        raise DtypeError(f"{source} {value!r}: unknown dtype; use one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where ``/proc/cpuinfo`` does not exist)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86 / Arm
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16, AMX-BF16 or Arm BF16)."""
    flags = cpu_flags()
    return any(f in flags for f in CPU_BF16_FLAGS) or "bf16" in flags


def cuda_has_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@functools.cache
def cpu_runs_bf16() -> bool:
    """Whether oneDNN runs bf16 here, tried once: its bf16 convolutions and packed products refuse
    a CPU without AVX512-BW/VL/DQ or AVX-NE-CONVERT (an AMD EPYC of the Zen 3 generation)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


def resolve_dtype(value: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to run in on ``device``: ``value`` if given, else the device's best (see module doc)."""
    dev = torch.device(device)
    explicit = parse_dtype(value)
    env = os.environ.get(DTYPE_ENV)
    chosen = explicit if explicit is not None else parse_dtype(env, f"${DTYPE_ENV}") if env else None
    if chosen is not None:
        if chosen == torch.bfloat16 and dev.type == "cpu" and not cpu_runs_bf16():
            raise DtypeError("dtype bfloat16: this CPU has no oneDNN bf16 kernels (they need AVX512-BW/VL/DQ or "
                            "AVX-NE-CONVERT); use --dtype float32 or auto")
        return chosen
    if dev.type == "cuda":
        return torch.bfloat16 if cuda_has_bf16(dev) else torch.float32
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return torch.float32


def exact_float32_on_gpus() -> None:
    """Run float32 on a GPU as IEEE float32, not TF32. cuDNN's convolutions default to TF32 (a
    10-bit mantissa), whose rounding changes with the batch size: the server's micro-batched
    answers would then differ from single-request ones by about 1e-3. bf16, not TF32, is the fast
    GPU path. The setting is process-wide (torch has no per-model switch)."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def describe_choice(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What ``auto`` picks here and why (for ``bench`` and docs)."""
    dev = torch.device(device)
    return {"device": str(dev), "auto": dtype_name(resolve_dtype(None, dev)),
            "cpu_bf16_flags": sorted(f for f in cpu_flags() if f in CPU_BF16_FLAGS or f == "bf16"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "env_override": os.environ.get(DTYPE_ENV) or None}
