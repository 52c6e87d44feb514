import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_image
from magic_mm import MagicEmbedder, MMInput
from magic_mm.errors import BadInputError, CompressionSpecError, ModelFolderError
from magic_mm.model.config import LoraSettings

FAMILIES = ["composed", "internvl"]


def mixed_inputs():
    return [
        "a dog runs across the grass",
        make_image(120, 80, seed=1),
        (make_image(64, 128, seed=2), "a tall picture with a caption"),
        "short",
        MMInput(image=make_image(200, 200, seed=3), text="another pair with a somewhat longer caption text"),
        make_image(50, 50, seed=4),
    ]


@pytest.fixture(scope="module", params=[(f, c) for f in FAMILIES for c in ("none", "bilinear:2")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def model(request):
    family, compression = request.param
    return MagicEmbedder.from_pretrained(f"tiny-random-{family}", compression=compression)


def test_same_vector_alone_in_any_batch_and_any_order(model):
    inputs = mixed_inputs()
    together = model.encode(inputs, batch_size=len(inputs))
    alone = np.concatenate([model.encode([x]) for x in inputs])
    order = [3, 0, 5, 2, 4, 1]
    shuffled = model.encode([inputs[i] for i in order], batch_size=4)
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(shuffled, together[order], atol=1e-4)
    # Different inputs really give different vectors (the check above could not pass trivially):
    # two texts, and two images.
    assert np.abs(together[0] - together[3]).max() > 1e-3
    assert np.abs(together[1] - together[5]).max() > 1e-3


def test_vectors_are_unit_length_and_dim_truncates(model):
    vecs = model.encode(["a", "b"], role="candidate")
    assert vecs.shape == (2, model.embedding_dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    raw = model.encode(["a"], normalize=False)
    short = model.encode(["a"], dim=16)
    assert short.shape == (1, 16)
    np.testing.assert_allclose(short[0], raw[0, :16] / np.linalg.norm(raw[0, :16]), atol=1e-5)


def test_role_and_instruction_change_the_vector(tiny_composed):
    q = tiny_composed.encode(["a dog"], role="query")
    c = tiny_composed.encode(["a dog"], role="candidate")
    custom = tiny_composed.encode(["a dog"], role="query", instruction="Classify the sentiment.")
    none = tiny_composed.encode(["a dog"], role="query", instruction="")
    assert np.abs(q - c).max() > 1e-4
    assert np.abs(q - custom).max() > 1e-4
    assert np.abs(q - none).max() > 1e-4


def test_compression_reduces_visual_tokens_in_the_sequence(tiny_internvl):
    img = make_image(112, 112)
    tokens = {}
    for spec in ("none", "bilinear:2"):
        model = MagicEmbedder.from_pretrained("tiny-random-internvl", compression=spec)
        tokens[spec] = len(model.backbone.encode_images([img])[0].embeds)
        assert tokens[spec] == model.backbone.visual_tokens(112, 112)
    assert tokens == {"none": 16, "bilinear:2": 4}  # 8×8 patches → shuffle 4×4; compressed 4×4 → 2×2


def test_internvl_tiling_matches_token_count():
    model = MagicEmbedder.from_pretrained("tiny-random-internvl", compression="bilinear:2")
    wide = make_image(400, 100)
    cols, rows = model.backbone.tile_layout(400, 100)
    assert (cols, rows) == (4, 1)
    tiles = model.backbone.image_tiles(wide)
    assert tiles.shape == (5, 3, 112, 112)  # 4 tiles + thumbnail
    assert len(model.backbone.encode_images([wide])[0].embeds) == 5 * 4 == model.backbone.visual_tokens(400, 100)


def test_internvl_refuses_pixel_unshuffle():
    with pytest.raises(CompressionSpecError, match="pixel shuffle"):
        MagicEmbedder.from_pretrained("tiny-random-internvl", compression="pixel_unshuffle:2")


def test_composed_pixel_unshuffle_widens_the_connector():
    model = MagicEmbedder.from_pretrained("tiny-random-composed", compression="pixel_unshuffle:2")
    assert model.backbone.connector.fc1.in_features == 1280 * 4
    assert model.encode([make_image()]).shape == (1, model.embedding_dim)


def test_similarity_is_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    b = np.array([[3.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    sim = MagicEmbedder.similarity(a, b)
    np.testing.assert_allclose(sim, [[1.0, 2 ** -0.5], [0.0, 2 ** -0.5]], atol=1e-6)


def test_encode_argument_errors(tiny_composed):
    with pytest.raises(BadInputError, match="list"):
        tiny_composed.encode("not a list")
    with pytest.raises(BadInputError, match="dim"):
        tiny_composed.encode(["x"], dim=10_000)
    with pytest.raises(BadInputError, match="role"):
        tiny_composed.encode(["x"], role="document")
    assert tiny_composed.encode([]).shape == (0, tiny_composed.embedding_dim)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip_writes_only_trained_weights(family, tmp_path):
    model = MagicEmbedder.from_pretrained(f"tiny-random-{family}")
    with torch.no_grad():
        for p in model.trained_parameters().values():
            p.add_(0.05 * torch.randn_like(p))  # pretend training changed them
    inputs = mixed_inputs()[:3]
    before = model.encode(inputs)
    folder = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.safetensors"]
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.trained_parameters().values())
    assert trained < total / 3
    reloaded = MagicEmbedder.from_pretrained(folder)
    np.testing.assert_allclose(reloaded.encode(inputs), before, atol=1e-5)
    fresh = MagicEmbedder.from_pretrained(f"tiny-random-{family}")
    assert np.abs(fresh.encode(inputs) - before).max() > 1e-3  # the saved weights mattered


def test_lora_is_saved_and_restored(tmp_path):
    model = MagicEmbedder.from_pretrained("tiny-random-composed")
    model.add_lora(LoraSettings(rank=4, alpha=8))
    lora = {k: p for k, p in model.trained_parameters().items() if k.startswith("lora.")}
    assert lora and all("lora_" in k for k in lora)
    with torch.no_grad():
        for p in lora.values():
            p.add_(0.1 * torch.randn_like(p))
    before = model.encode(["lora changes this"])
    reloaded = MagicEmbedder.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert reloaded.config.lora.rank == 4
    np.testing.assert_allclose(reloaded.encode(["lora changes this"]), before, atol=1e-5)


def test_compression_override_on_load(tmp_path):
    folder = MagicEmbedder.from_pretrained("tiny-random-composed", compression="bilinear:2").save_pretrained(tmp_path / "m")
    assert str(MagicEmbedder.from_pretrained(folder, compression="none").compression) == "none"
    with pytest.raises(ModelFolderError, match="channel count differs"):
        MagicEmbedder.from_pretrained(folder, compression="pixel_unshuffle:2")


class TestModelFolderErrors:
    def saved(self, tmp_path):
        return MagicEmbedder.from_pretrained("tiny-random-composed").save_pretrained(tmp_path / "m")

    def test_missing_folder(self, tmp_path):
        with pytest.raises(ModelFolderError, match="no such model folder"):
            MagicEmbedder.from_pretrained(tmp_path / "absent")

    def test_folder_without_config(self, tmp_path):
        with pytest.raises(ModelFolderError, match="has no config.json"):
            MagicEmbedder.from_pretrained(tmp_path)

    def test_file_instead_of_folder(self, tmp_path):
        f = tmp_path / "model.bin"
        f.write_bytes(b"x")
        with pytest.raises(ModelFolderError, match="is a file"):
            MagicEmbedder.from_pretrained(f)

    def test_foreign_config(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        with pytest.raises(ModelFolderError, match="not a magic-mm model"):
            MagicEmbedder.from_pretrained(tmp_path)

    def test_broken_json(self, tmp_path):
        (tmp_path / "config.json").write_text("{not json")
        with pytest.raises(ModelFolderError, match="not valid JSON"):
            MagicEmbedder.from_pretrained(tmp_path)

    def test_unknown_family(self, tmp_path):
        folder = self.saved(tmp_path)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["family"] = "mystery"
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelFolderError, match="unknown backbone family 'mystery'"):
            MagicEmbedder.from_pretrained(folder)

    def test_weights_from_another_model(self, tmp_path):
        folder = self.saved(tmp_path)
        other = MagicEmbedder.from_pretrained("tiny-random-internvl").save_pretrained(tmp_path / "other")
        shutil.copy(other / "weights.safetensors", folder / "weights.safetensors")
        with pytest.raises(ModelFolderError, match="weights do not match its config"):
            MagicEmbedder.from_pretrained(folder)

    def test_missing_weights(self, tmp_path):
        folder = self.saved(tmp_path)
        (folder / "weights.safetensors").unlink()
        with pytest.raises(ModelFolderError, match="has no weights.safetensors"):
            MagicEmbedder.from_pretrained(folder)

    def test_corrupt_weights(self, tmp_path):
        folder = self.saved(tmp_path)
        (folder / "weights.safetensors").write_bytes(b"\x00" * 10)
        with pytest.raises(ModelFolderError, match="unreadable weights"):
            MagicEmbedder.from_pretrained(folder)

    def test_internvl_folder_of_wrong_type(self, tmp_path):
        from magic_mm.model.backbones.internvl import InternVLBackbone
        from magic_mm.model.compression import Compression

        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        with pytest.raises(ModelFolderError, match="not 'internvl'"):
            InternVLBackbone.build({"base": str(tmp_path)}, Compression())


def test_raw_internvl_checkpoint_folder_loads_through_transformers(tmp_path):
    """A transformers-format InternVL folder (config, weights, tokenizer) becomes an embedder."""
    from magic_mm.model.backbones.internvl import tiny_internvl

    hf_model, tokenizer = tiny_internvl()
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_patches": 4, "crop_to_patches": True}))
    loaded = MagicEmbedder.from_pretrained(tmp_path, compression="bilinear:2")
    reference = MagicEmbedder.from_pretrained("tiny-random-internvl", compression="bilinear:2")
    assert loaded.config.family == "internvl" and loaded.backbone.max_tiles == 4
    inputs = mixed_inputs()[:3]
    np.testing.assert_allclose(loaded.encode(inputs), reference.encode(inputs), atol=1e-5)
