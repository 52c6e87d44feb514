"""The ``qwen_vl`` family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on tiny random configs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from conftest import make_image
from family_checks import assert_batch_invariant, assert_round_trip, info_nce_step, mixed_inputs, tiny
from magic_mm import MagicEmbedder
from magic_mm.errors import CompressionSpecError, ModelFolderError
from magic_mm.model.compression import Compression
from magic_mm.model.inputs import prepare
from magic_mm.model.lm_batch import build_lm_batch

VARIANTS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="module", params=[(v, c) for v in VARIANTS for c in ("none", "bilinear:2")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    return tiny("qwen_vl", *request.param)


def test_embeddings_with_s1_and_s2_are_unit_vectors_and_differ():
    for variant in VARIANTS:
        inputs = mixed_inputs()
        s1 = tiny("qwen_vl", variant, "none").encode(inputs, role="candidate")
        s2 = tiny("qwen_vl", variant, "bilinear:2").encode(inputs, role="candidate")
        assert s1.shape == s2.shape == (len(inputs), 48)
        assert np.isfinite(s1).all() and np.isfinite(s2).all()
        np.testing.assert_allclose(np.linalg.norm(s2, axis=1), 1.0, atol=1e-5)
        image_rows = [0, 2, 3, 4]
        assert np.abs(s1[image_rows] - s2[image_rows]).max() > 1e-3  # compression changes image vectors
        np.testing.assert_allclose(s1[1], s2[1], atol=1e-5)  # and leaves a text-only input alone


@pytest.mark.parametrize("variant", VARIANTS)
def test_s1_equals_the_transformers_forward(variant):
    """Without compression the embedding is exactly transformers' own multimodal forward
    (processor pixels, image_grid_thw, mm_token_type_ids, M-RoPE; window order; DeepStack)."""
    model = tiny("qwen_vl", variant, "none")
    backbone = model.backbone
    image = make_image(150, 100, seed=1)
    with torch.no_grad():
        ours = model.embed_prepared([prepare((image, "a cat"))], "candidate", "Represent.")
        n = backbone.visual_tokens(*image.size)
        before = backbone.tokenizer("Instruct: Represent.\n<|vision_start|>", add_special_tokens=False)["input_ids"]
        after = backbone.tokenizer("<|vision_end|>\nText: a cat", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([before + [backbone.model.config.image_token_id] * n + after])
        types = torch.tensor([[0] * len(before) + [1] * n + [0] * len(after)])
        pixels = backbone.processor(images=[image], return_tensors="pt")
        reference = backbone.model.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types, **pixels
        ).last_hidden_state[:, -1]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_visual_token_counts(variant):
    """150×100 px: Qwen2/2.5 resize to 140×112 → 10×8 patches; Qwen3 (16-px patches) to 160×96 → 10×6."""
    expected = {"qwen2_vl": (20, 6), "qwen2_5_vl": (20, 6), "qwen3_vl": (15, 6)}[variant]
    image = make_image(150, 100, seed=1)
    for compression, count in zip(("none", "bilinear:2"), expected):
        model = tiny("qwen_vl", variant, compression)
        assert model.backbone.visual_tokens(150, 100) == count
        assert len(model.backbone.encode_images([image])[0].embeds) == count
        assert model.info((150, 100))["visual_tokens"] == {"none": expected[0], str(model.compression): count}


def test_odd_compressed_grids_round_up_to_whole_merge_blocks():
    backbone = tiny("qwen_vl", "qwen2_vl", "bilinear:2").backbone
    assert backbone.token_grid(34, 34) == (18, 18)  # 17 → 18: 9×9 tokens, nothing dropped
    assert backbone.token_grid(8, 10) == (4, 6)
    backbone.compression = Compression.parse("bilinear:3")
    assert backbone.token_grid(16, 16) == (6, 6)  # ceil(16/3) = 6
    assert backbone.visual_tokens(224, 224) == 9


def test_pixel_budget_sits_next_to_compression():
    small = tiny("qwen_vl", "qwen2_vl", "bilinear:2", max_pixels=112 * 112)
    assert small.backbone.visual_tokens(448, 448) == 4  # 112 px → 8×8 → 4×4 → 2×2
    assert small.info((448, 448))["parts"]["vision"]["max_pixels"] == 112 * 112
    big = tiny("qwen_vl", "qwen2_vl", "bilinear:2")
    assert big.backbone.visual_tokens(448, 448) == 16


@pytest.mark.parametrize("variant", VARIANTS)
def test_mrope_positions_follow_the_compressed_grid(variant):
    """Visual tokens get (t, row, col) positions on the compressed grid; text resumes after max(h, w)."""
    model = tiny("qwen_vl", variant, "bilinear:2")
    backbone = model.backbone
    image = backbone.encode_images([make_image(150, 100, seed=1)])[0]  # compressed grid 4×6 → 2×3 tokens
    assert image.grid_thw == (1, 4, 6)
    batch = build_lm_batch(backbone, [["hello", image]])
    start, length = int(batch.visual_mask[0].nonzero()[0]), len(image.embeds)
    after_image = int(batch.lengths[0]) - start - length  # the "<|vision_end|>" marker's tokens
    positions = batch.position_ids
    assert positions.shape == (3, 1, batch.embeds.shape[1])
    visual = positions[:, 0, start : start + length]
    assert visual[0].tolist() == [start] * 6
    assert visual[1].tolist() == [start, start, start, start + 1, start + 1, start + 1]
    assert visual[2].tolist() == [start, start + 1, start + 2] * 2
    after = positions[:, 0, start + length :]
    assert after[0].tolist() == list(range(start + 3, start + 3 + after_image))  # start + max(2, 3)
    with pytest.raises(ValueError, match="grid"):  # an image whose grid disagrees with its tokens is refused
        build_lm_batch(backbone, [[dataclasses.replace(image, grid_thw=(1, 4, 8))]])


def test_qwen2_5_window_order_is_undone_before_compression():
    """The grid handed to compression is row-major: equal to the windowed tower's own merged output."""
    backbone = tiny("qwen_vl", "qwen2_5_vl", "none").backbone
    image = make_image(200, 200, seed=3)  # 14×14 patches: several 2×2-unit windows
    pixels = backbone.processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        native = backbone.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
        ours = backbone.encode_images([image])[0].embeds
    assert pixels["image_grid_thw"][0].tolist() == [1, 14, 14]
    torch.testing.assert_close(ours, native)


def test_batch_invariance(model):
    assert_batch_invariant(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage2_training_step_with_lora_and_round_trip(variant, tmp_path):
    model = tiny("qwen_vl", variant, "bilinear:2")
    before, after = info_nce_step(model)
    assert after < before
    assert_round_trip(model, tmp_path / "saved")
    fresh = tiny("qwen_vl", variant, "bilinear:2").encode(mixed_inputs()[:1])
    assert np.abs(MagicEmbedder.from_pretrained(tmp_path / "saved").encode(mixed_inputs()[:1]) - fresh).max() > 1e-4


def test_cli_info_reports_family_and_tokens(run_cli):
    code, out, _ = run_cli("info", "--model", "tiny-random-qwen_vl", "--image-size", "150x100", "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "qwen_vl" and info["tiles_per_image"] == 1
    assert info["visual_tokens"] == {"none": 20, "bilinear:2": 6}


def test_raw_checkpoint_folder_with_local_tokenizer(tmp_path):
    """A transformers-format folder (config, weights, tokenizer, preprocessor) loads by its model_type."""
    reference = tiny("qwen_vl", "qwen2_5_vl", "bilinear:2")
    folder = tmp_path / "Qwen2.5-VL-tiny"
    reference.backbone.model.save_pretrained(folder)
    reference.backbone.tokenizer.save_pretrained(folder)
    reference.backbone.processor.save_pretrained(folder)
    loaded = MagicEmbedder.from_pretrained(folder, compression="bilinear:2")
    assert loaded.config.family == "qwen_vl" and loaded.backbone.variant == "qwen2_5_vl"
    inputs = mixed_inputs()[:3]
    np.testing.assert_allclose(loaded.encode(inputs), reference.encode(inputs), atol=1e-5)


def test_bad_configurations_are_user_errors(tmp_path):
    with pytest.raises(CompressionSpecError, match="merger"):
        tiny("qwen_vl", "qwen2_vl", "pixel_unshuffle:2")
    with pytest.raises(ModelFolderError, match="variant"):
        tiny("qwen_vl", "qwen9_vl", "none")
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    from magic_mm.model.backbones.qwen_vl import QwenVLBackbone

    with pytest.raises(ModelFolderError, match="model_type is 'llama'"):
        QwenVLBackbone.build({"base": str(folder)}, Compression())
    with pytest.raises(ModelFolderError, match="not found"):
        QwenVLBackbone.build({"base": str(tmp_path / "missing")}, Compression())


def test_readme_families_example_runs(capsys):
    """The Python example of docs/backbones.md runs and prints what it says."""
    import re

    from conftest import REPO

    page = (REPO / "docs" / "backbones.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    exec(compile(code, "docs/backbones.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert printed == expected
