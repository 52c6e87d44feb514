"""The embedded default model with its real weights (EfficientNet-Lite0 + SmolLM2-135M)."""

import numpy as np
import pytest
import torch
from PIL import Image

from magic_mm.model import efficientnet_lite

pytestmark = pytest.mark.real_weights

# The shipped model measured 51.6 % text→image R@5 over all 216 test images (README table, row 4).
# Over 40 images chance is 12.5 %; an untrained connector sits there, a trained one far above.
RECALL5_FLOOR = 0.4


def test_efficientnet_weights_load_strictly_and_classify(flickr_dir):
    net = efficientnet_lite.EfficientNetLite0()
    state = torch.load(efficientnet_lite.packaged_weights_path(), map_location="cpu", weights_only=True)
    result = net.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    net.eval()
    # 1001773457_577c3a7d70.jpg: "A black dog and a spotted dog are fighting".
    img = Image.open(flickr_dir / "images" / "1001773457_577c3a7d70.jpg").convert("RGB").resize((224, 224))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        top = net(x).softmax(-1).topk(5).indices[0].tolist()
    assert any(151 <= c <= 268 for c in top), top  # ImageNet's dog classes


def test_default_model_embeds_a_shared_image_and_caption(default_model, flickr_dir):
    info = default_model.info()
    assert info["family"] == "composed" and info["embedding_dim"] == 576
    assert info["visual_tokens"] == {"none": 196, "bilinear:2": 49}
    image = flickr_dir / "images" / "1001773457_577c3a7d70.jpg"
    caption = "A black dog and a spotted dog are fighting"
    img_vec = default_model.encode([image], role="candidate")
    txt_vec = default_model.encode([caption], role="query")
    pair_vec = default_model.encode([(image, caption)], role="candidate")
    for v in (img_vec, txt_vec, pair_vec):
        assert v.shape == (1, 576) and np.isfinite(v).all()
        assert abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.abs(img_vec - txt_vec).max() > 1e-3 and np.abs(img_vec - pair_vec).max() > 1e-3
    # Batch invariance on the real backbone, too.
    both = default_model.encode([caption, image, (image, caption)], role="candidate", batch_size=3)
    alone = np.concatenate([default_model.encode([x], role="candidate") for x in (caption, image, (image, caption))])
    np.testing.assert_allclose(both, alone, atol=1e-4)


def test_visual_tokens_really_reach_the_lm(default_model, flickr_dir):
    """With s = 2 the LM input holds 49 image positions; with none, 196."""
    from magic_mm import MagicEmbedder

    image = Image.open(flickr_dir / "images" / "1001773457_577c3a7d70.jpg").convert("RGB")
    assert default_model.backbone.encode_images([image])[0].embeds.shape == (49, 576)
    uncompressed = MagicEmbedder.from_pretrained("magic-mm-tiny", compression="none")
    assert uncompressed.backbone.encode_images([image])[0].embeds.shape == (196, 576)


def test_shipped_model_retrieves_far_above_chance(default_model, flickr_dir):
    """The committed connector + LoRA are trained: the first 40 test images, each queried by its
    first caption, land in the top 5 far more often than chance (5/40 = 12.5 %)."""
    from magic_mm.data.captions import read_captioned_images

    items = read_captioned_images(flickr_dir, "test")[:40]
    images = default_model.encode([i.path for i in items], role="candidate")
    captions = default_model.encode([i.captions[0] for i in items], role="query")
    scores = captions @ images.T
    rank_of_own = (scores > scores.diagonal()[:, None]).sum(axis=1)
    assert (rank_of_own < 5).mean() >= RECALL5_FLOOR


def test_shipped_reranker_loads_and_scores(flickr_dir):
    from magic_mm import MagicReranker
    from magic_mm.data.captions import read_captioned_images

    reranker = MagicReranker.from_pretrained("magic-mm-tiny")
    items = read_captioned_images(flickr_dir, "test")[:6]
    hits = reranker.rerank(items[0].captions[0], [i.path for i in items], top_k=4)
    assert sorted(h.index for h in hits) == [0, 1, 2, 3]  # only the top 4 are rescored
    assert all(np.isfinite(h.score) for h in hits)
    # Each score recomputed from a full-sequence forward, one candidate at a time: logit("Yes") - logit("No")
    # right after the prompt. The hits carry those scores, best first (a shuffled or inverted reranker fails).
    # (A quality floor is not asserted: on val pairs the shipped reranker put a caption's own photo above
    # another photo 14 times in 30, i.e. at chance; see issue 13.)
    from magic_mm.model.generative import build_batch, logits

    model = reranker.model
    query = model.prepare([items[0].captions[0]])[0]
    yes, no = (model.backbone.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    alone = []
    with torch.no_grad():
        for candidate in model.prepare([i.path for i in items[:4]]):
            batch = build_batch(model, [reranker.pointwise_example(query, candidate)])
            row = logits(model, batch)[0, int(batch.prompt_end[0])]
            alone.append(float(row[yes] - row[no]))
    assert [h.index for h in hits] == sorted(range(4), key=lambda i: -alone[i])
    assert [h.score for h in hits] == pytest.approx([alone[h.index] for h in hits], abs=1e-3)


def test_a_large_jpeg_embeds_like_its_full_size_decode(default_model, tmp_path):
    """magic-mm-tiny decodes a phone-sized JPEG at 1/4 scale (it needs 448 × 448): the vector
    stays within a cosine of 0.999 of the full-size decode's, for paths, and for the server's bytes."""
    from conftest import FLICKR

    from magic_mm.model.inputs import load_image

    assert default_model.backbone.decode_size == (448, 448)
    paths = []
    for i, photo in enumerate(sorted((FLICKR / "images").glob("*.jpg"))[:2]):
        paths.append(tmp_path / f"big{i}.jpg")
        Image.open(photo).convert("RGB").resize((2400, 1800), Image.BICUBIC).save(paths[-1], quality=90)
    drafted = default_model.encode(paths, role="candidate")
    full = default_model.encode([load_image(p) for p in paths], role="candidate")
    assert load_image(paths[0], decode_size=(448, 448)).size == (600, 450)
    cosine = (drafted * full).sum(1)
    assert cosine.min() > 0.999 and not np.array_equal(drafted, full)  # close, and the scale did apply
    as_bytes = default_model.encode([p.read_bytes() for p in paths], role="candidate")
    np.testing.assert_array_equal(as_bytes, drafted)


def test_stored_instruction_states_keep_the_shipped_models_tokens_and_vectors(default_model, flickr_dir):
    """The instruction line, tokenised on its own, gives the ids it had inside the whole prompt
    for every caption of the data, and queries and photos embed as with every token run."""
    import csv

    tokenizer = default_model.backbone.tokenizer
    with open(flickr_dir / "captions.csv", newline="") as f:
        captions = [row["caption"] for row in csv.DictReader(f)]
    line = "Instruct: " + default_model.config.instructions["query"] + "\n"
    opening = tokenizer(line, add_special_tokens=False)["input_ids"]
    changed = [c for c in captions if tokenizer(line + "Query: " + c, add_special_tokens=False)["input_ids"]
               != opening + tokenizer("Query: " + c, add_special_tokens=False)["input_ids"]]
    assert len(captions) == 5000 and changed == []

    photos = sorted((flickr_dir / "images").glob("*.jpg"))[:3]
    assert default_model.prefix_states is not None
    stored = default_model.encode(captions[:4], role="query"), default_model.encode(photos, role="candidate")
    states, default_model.prefix_states = default_model.prefix_states, None
    try:
        full = default_model.encode(captions[:4], role="query"), default_model.encode(photos, role="candidate")
    finally:
        default_model.prefix_states = states
    for a, b in zip(stored, full):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_random_magic_mm_tiny_has_the_shipped_models_shapes_prompts_and_tokens(default_model):
    """Speed measured on random-magic-mm-tiny, where the shipped weights cannot go (a GPU machine),
    is the shipped model's: every parameter has its shape, and the prompts and tokens match."""
    from magic_mm import MagicEmbedder

    randomised = MagicEmbedder.from_pretrained("random-magic-mm-tiny")
    assert {k: v.shape for k, v in randomised.state_dict().items()} == {
        k: v.shape for k, v in default_model.state_dict().items()}
    assert randomised.config.instructions == default_model.config.instructions
    assert str(randomised.compression) == str(default_model.compression) == "bilinear:2"
    text = "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert randomised.backbone.tokenizer(text)["input_ids"] == default_model.backbone.tokenizer(text)["input_ids"]
    assert randomised.backbone.visual_tokens(448, 448) == default_model.backbone.visual_tokens(448, 448) == 49
    shipped_lm = default_model.backbone.decoder.state_dict()
    assert not all(torch.equal(v, shipped_lm[k]) for k, v in randomised.backbone.decoder.state_dict().items())
