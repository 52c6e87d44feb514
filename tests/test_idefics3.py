"""The ``idefics3`` family (Idefics3, SmolVLM) on tiny random configs."""

from __future__ import annotations

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

VARIANTS = ["smolvlm", "idefics3"]


@pytest.fixture(scope="module", params=[(v, c) for v in VARIANTS for c in ("none", "bilinear:2")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    return tiny("idefics3", *request.param)


def test_embeddings_with_s1_and_s2():
    for variant in VARIANTS:
        inputs = mixed_inputs()
        s1 = tiny("idefics3", variant, "none").encode(inputs, role="candidate")
        s2 = tiny("idefics3", variant, "bilinear:2").encode(inputs, role="candidate")
        assert s1.shape == s2.shape == (len(inputs), 48) and np.isfinite(s2).all()
        np.testing.assert_allclose(np.linalg.norm(s2, axis=1), 1.0, atol=1e-5)
        assert np.abs(s1[[0, 2, 3, 4]] - s2[[0, 2, 3, 4]]).max() > 1e-3
        np.testing.assert_allclose(s1[1], s2[1], atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_s1_equals_the_transformers_forward(variant):
    """Without compression the embedding equals transformers' own forward on the processor's prompt."""
    model = tiny("idefics3", variant, "none")
    backbone = model.backbone
    image = make_image(150, 100, seed=1)
    with torch.no_grad():
        ours = model.embed_prepared([prepare((image, "a cat"))], "candidate", "Represent.")
        rows, cols = backbone.tile_layout(*image.size)
        markers = backbone.tile_markers(rows, cols)
        per_tile = backbone.tokens_per_grid(*backbone.token_grid(8, 8))
        expanded = "".join(m + "<IMG_CONTEXT>" * per_tile for m in markers[:-1]) + markers[-1]
        text = f"Instruct: Represent.\n{expanded}\nText: a cat"
        ids = torch.tensor([backbone.tokenizer(text, add_special_tokens=False)["input_ids"]])
        pixels = backbone.processor(images=[[image]], return_tensors="pt")
        reference = backbone.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
    torch.testing.assert_close(ours, reference.last_hidden_state[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_visual_token_counts(variant):
    """150×100 px → longest side 128 → 2×2 tiles of 64 px + global = 5 tiles of 8×8 patches, r = 2:
    16 tokens per tile (80) without compression, 4 per tile (20) with s = 2."""
    image = make_image(150, 100, seed=1)
    for compression, count in (("none", 80), ("bilinear:2", 20)):
        model = tiny("idefics3", variant, compression)
        backbone = model.backbone
        assert backbone.tile_layout(150, 100) == (2, 2)
        assert backbone.visual_tokens(150, 100) == count
        tokens = backbone.encode_images([image])[0]
        assert len(tokens.embeds) == count and tokens.pieces == (count // 5,) * 5  # one piece per tile
        assert tokens.markers == tuple(backbone.tile_markers(2, 2))  # the tile-marker texts around them
        assert model.info((150, 100))["tiles_per_image"] == 5


def test_grid_rounds_up_to_the_scale_factor():
    backbone = tiny("idefics3", "smolvlm", "bilinear:3").backbone
    assert backbone.token_grid(8, 8) == (4, 4)  # ceil(8/3) = 3 → 4 for r = 2
    backbone.compression = Compression.parse("bilinear:2")
    assert backbone.token_grid(26, 26) == (14, 14)  # Idefics3-8B's 26 → 13 → 14: 49 tokens
    backbone.scale = 4
    assert backbone.token_grid(32, 32) == (16, 16)  # SmolVLM-256M's 32 → 16: 16 tokens per tile
    assert backbone.tokens_per_grid(16, 16) == 16


def test_token_budget_without_splitting():
    model = tiny("idefics3", "smolvlm", "bilinear:2", image_splitting=False)
    assert model.backbone.visual_tokens(150, 100) == 4  # the global tile only
    assert model.info((150, 100))["parts"]["vision"]["image_splitting"] is False
    small = tiny("idefics3", "smolvlm", "none", longest_edge=64)
    assert small.backbone.tile_layout(150, 100) == (0, 0) and small.backbone.visual_tokens(150, 100) == 16


def test_batch_invariance(model):
    assert_batch_invariant(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage2_training_step_with_lora_and_round_trip(variant, tmp_path):
    model = tiny("idefics3", variant, "bilinear:2")
    before, after = info_nce_step(model)
    assert after < before
    assert_round_trip(model, tmp_path / "saved")
    fresh = tiny("idefics3", variant, "bilinear:2").encode(mixed_inputs()[:1])
    assert np.abs(MagicEmbedder.from_pretrained(tmp_path / "saved").encode(mixed_inputs()[:1]) - fresh).max() > 1e-4


def test_cli_info_reports_family_and_tokens(run_cli):
    code, out, _ = run_cli("info", "--model", "tiny-random-idefics3", "--image-size", "150x100", "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "idefics3" and info["tiles_per_image"] == 5
    assert info["visual_tokens"] == {"none": 80, "bilinear:2": 20}


def test_raw_checkpoint_folder_with_local_tokenizer(tmp_path):
    reference = tiny("idefics3", "smolvlm", "bilinear:2")
    folder = tmp_path / "SmolVLM-tiny"
    reference.backbone.model.save_pretrained(folder)
    reference.backbone.tokenizer.save_pretrained(folder)
    reference.backbone.processor.save_pretrained(folder)
    loaded = MagicEmbedder.from_pretrained(folder, compression="bilinear:2")
    assert loaded.config.family == "idefics3" and loaded.backbone.variant == "smolvlm"
    inputs = mixed_inputs()[:3]
    np.testing.assert_allclose(loaded.encode(inputs), reference.encode(inputs), atol=1e-5)


def test_bad_configurations_are_user_errors(tmp_path):
    with pytest.raises(CompressionSpecError, match="pixel-shuffles"):
        tiny("idefics3", "smolvlm", "pixel_unshuffle:2")
    with pytest.raises(ModelFolderError, match="variant"):
        tiny("idefics3", "idefics9", "none")
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    from magic_mm.model.backbones.idefics3 import Idefics3Backbone

    with pytest.raises(ModelFolderError, match="model_type is 'qwen2'"):
        Idefics3Backbone.build({"base": str(folder)}, Compression())
