"""The dual-encoder baseline (training: benchmarks/dual_encoder.py; model: magic_mm/model/dual_encoder.py)
on tiny random parts: a random EfficientNet-Lite0 at 64 px and a 2-layer random BERT with the byte tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import dual_encoder as de  # noqa: E402
from default_model import compare, evaluate_row, markdown  # noqa: E402

from magic_mm.data.captions import CaptionedImage  # noqa: E402
from magic_mm.errors import ModelFolderError  # noqa: E402
from magic_mm.model import dual_encoder as dm  # noqa: E402
from magic_mm.train.pairs import CaptionPairs  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "black": (10, 10, 10), "white": (245, 245, 245)}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import BertConfig, BertModel

    from magic_mm.model.tiny import byte_tokenizer

    root = tmp_path_factory.mktemp("dual")
    text_dir = root / "tiny-bert"
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    rng = np.random.default_rng(0)
    paths, captions, owner = [], [], []
    for n, (name, rgb) in enumerate(COLOURS.items()):
        pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
        paths.append(root / f"{name}.png")
        Image.fromarray(pixels).save(paths[-1])
        captions += [f"a {name} square", f"something painted {name}"]
        owner += [n, n]
    config = dm.DualConfig(vision="efficientnet-lite0-random", text=str(text_dir), image_size=64, dim=16)
    encoders = dm.FrozenEncoders(config)
    pairs = CaptionPairs(paths, captions, owner)
    return {"root": root, "config": config, "encoders": encoders, "pairs": pairs,
            "features": de.split_features(encoders, pairs, root / "features.safetensors", show=False)}


SETTINGS = de.TrainSettings(temperature=0.03, batch_size=4, lr=1e-3, max_epochs=8, seed=0)


def train(toy: dict):  # noqa: ANN201
    f = toy["features"]
    return de.train_heads(toy["config"], SETTINGS, toy["encoders"].text_dim, f, f, show=False)


def test_loss_goes_down_and_training_repeats(toy: dict) -> None:
    heads, summary = train(toy)
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert len(losses) == SETTINGS.max_epochs
    assert losses[-1] < 0.5 * losses[0], losses
    best = summary["epochs"][summary["best_epoch"] - 1]["val"]["text_to_image"]["R@5"]
    assert best == max(e["val"]["text_to_image"]["R@5"] for e in summary["epochs"])
    again, _ = train(toy)  # seeded: the same heads, bit for bit
    for key, value in heads.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_feature_cache_is_reused_and_invalidated(toy: dict) -> None:
    cache = toy["root"] / "features.safetensors"
    again = de.split_features(toy["encoders"], toy["pairs"], cache, show=False)
    assert torch.equal(again.images, toy["features"].images) and torch.equal(again.texts, toy["features"].texts)
    pairs = toy["pairs"]
    changed = CaptionPairs(pairs.images, ["a different caption"] + pairs.captions[1:], pairs.owner)
    fresh = de.split_features(toy["encoders"], changed, cache, show=False)
    assert not torch.equal(fresh.texts[0], toy["features"].texts[0])
    assert torch.equal(fresh.texts[1:], toy["features"].texts[1:])


def test_save_load_round_trip_and_table_row(toy: dict, tmp_path: Path) -> None:
    heads, summary = train(toy)
    model = dm.DualEncoder(toy["config"], heads, toy["encoders"], {"best_epoch": summary["best_epoch"]})
    pairs = toy["pairs"]
    before = (model.encode(pairs.images, role="candidate"), model.encode(pairs.captions, role="query"))
    model.save_pretrained(tmp_path / "model")
    loaded = dm.DualEncoder.from_pretrained(tmp_path / "model")
    assert loaded.config == toy["config"] and loaded.training["best_epoch"] == summary["best_epoch"]
    assert np.array_equal(loaded.encode(pairs.images, role="candidate"), before[0])
    assert np.array_equal(loaded.encode(pairs.captions, role="query"), before[1])
    assert np.allclose(np.linalg.norm(before[0], axis=1), 1, atol=1e-5)

    # The table row (one image per encode call) agrees with the recall used to pick the epoch.
    items = [CaptionedImage(p.name, p, pairs.captions[2 * n : 2 * n + 2]) for n, p in enumerate(pairs.images)]
    # The labels column: each photo against the four "a <colour> square" labels, its own listed first.
    names = list(COLOURS)
    lines = [json.dumps({"qry_inst": "Represent the given image for classification.", "qry_text": "",
                         "qry_img_path": str(path), "tgt_inst": "",
                         "tgt_text": [f"a {name} square"] + [f"a {o} square" for o in names if o != name][:3],
                         "tgt_img_path": [""] * 4}) for name, path in zip(names, pairs.images)]
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.yaml").write_text("tasks:\n  - name: colours\n    file: labels.jsonl\n    meta: classification\n")
    row = evaluate_row("dual", f"dual:{tmp_path / 'model'}", items, pairs.captions, pairs.owner, tmp_path / "labels.yaml")
    assert row["visual_tokens"] == 0 and row["visual_tokens_note"] == "no LM"
    assert row["median_encode_ms"] > 0 and row["images_per_s_batch16"] > 0
    expected = de.split_recalls(heads, toy["features"])
    assert row["text_to_image"] == pytest.approx(expected["text_to_image"])
    assert row["image_to_text"] == pytest.approx(expected["image_to_text"])
    # the harness's accuracy equals the dual encoder's own image-vs-label argmax
    image_vectors = loaded.encode(pairs.images, role="candidate")
    right = [np.argmax(loaded.encode(json.loads(line)["tgt_text"], role="query") @ v) == 0
             for line, v in zip(lines, image_vectors)]
    assert row["label_accuracy"] == pytest.approx(np.mean(right))
    line = markdown([row]).splitlines()[-1]
    assert line.startswith("| dual | 0 (no LM) |") and line.endswith(f"| {100 * row['label_accuracy']:.1f} |")
    # paired comparisons read the per-query ranks: a row against itself differs by exactly nothing,
    # against a row that misses every query at rank 1 by minus its R@1
    assert all(d == {"difference": 0.0, "ci95": [0.0, 0.0]} for d in compare(row, row, 100).values())
    blind = {**row, "text_to_image_first_rank": [9] * len(row["text_to_image_first_rank"])}
    assert compare(row, blind, 100)["text_to_image R@1"]["difference"] == pytest.approx(-row["text_to_image"]["R@1"])


def test_folder_that_is_not_a_dual_encoder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="not a dual-encoder folder"):
        dm.DualEncoder.from_pretrained(tmp_path)
    (tmp_path / dm.CONFIG_FILE).write_text(json.dumps({"format": "magic-mm", "config": {}}))
    with pytest.raises(ModelFolderError, match="format is 'magic-mm'"):
        dm.DualEncoder.from_pretrained(tmp_path)
    (tmp_path / dm.CONFIG_FILE).write_text(json.dumps({"format": dm.FORMAT, "config": {}}))
    with pytest.raises(ModelFolderError, match="heads.safetensors is missing"):
        dm.DualEncoder.from_pretrained(tmp_path)
    (tmp_path / dm.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        dm.DualEncoder.from_pretrained(tmp_path)


@pytest.mark.parametrize("weight", [0.0, 1e3])
def test_rerank_row_with_a_fusion_reranker_folder(toy: dict, tmp_path: Path, weight: float) -> None:
    """``rerank:EMBEDDER+FOLDER`` with a FusionReranker folder: the embedder's top 5 of each caption,
    reordered by its cosine + weight × this dual encoder's cosine (weight 0: the embedder's own order;
    a large weight: the dual encoder's order within the top 5)."""
    from default_model import encode_timed, first_ranks

    from magic_mm import MagicEmbedder
    from magic_mm.model.fusion_reranker import FusionReranker

    heads, _ = train(toy)
    dual = dm.DualEncoder(toy["config"], heads, toy["encoders"])
    FusionReranker(dual, weight, {"split": "val"}).save_pretrained(tmp_path / "fusion")
    pairs = toy["pairs"]
    items = [CaptionedImage(p.name, p, pairs.captions[2 * n : 2 * n + 2]) for n, p in enumerate(pairs.images)]
    row = evaluate_row("fused", f"rerank:tiny-random-composed+{tmp_path / 'fusion'}", items, pairs.captions,
                       pairs.owner, None)
    assert row["reranked_top5"] is True and row["label_accuracy"] is None

    embedder = MagicEmbedder.from_pretrained("tiny-random-composed")
    images, _ = encode_timed(embedder, pairs.images)  # as the row computes them
    scores = embedder.encode(pairs.captions, role="query", batch_size=32) @ images.T
    second = dual.encode(pairs.captions, role="query") @ dual.encode(pairs.images, role="candidate").T
    relevant = [{o} for o in pairs.owner]
    expected = scores.copy()
    for q, top in enumerate(np.argsort(-scores, axis=1, kind="stable")[:, :5]):
        order = np.argsort(-(scores[q, top] + weight * second[q, top]), kind="stable")
        expected[q, top[order]] = 1e3 - np.arange(len(top))
    assert row["text_to_image_first_rank"] == first_ranks(expected, relevant).tolist()
    if weight == 0:
        assert row["text_to_image_first_rank"] == first_ranks(scores, relevant).tolist()
    else:
        assert row["text_to_image_first_rank"] != first_ranks(scores, relevant).tolist()
