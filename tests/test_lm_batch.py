"""The one LM-batch path, checked on every backbone family against transformers' own forward.

Uncompressed, the generative logits of a prompt with an image (stage 1, the self-judge
and the reranker all read them) must equal the full transformers model's logits on the
same prompt with placeholder tokens and pixels: that pins M-RoPE (Qwen-VL), DeepStack
(Qwen3-VL), tile markers (Idefics3) and the image wrap (InternVL) in the generative path.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from family_checks import tiny
from magic_mm.model.backbones.base import ImageTokens, VisionGrid
from magic_mm.model.generative import GenExample, answer_log_likelihoods, answer_loss, build_batch, logits
from magic_mm.model.lm_batch import IGNORE, build_lm_batch

# (family, variant): every family, and each Qwen-VL generation
FAMILIES = [("composed", None), ("internvl", None), ("qwen_vl", "qwen2_vl"), ("qwen_vl", "qwen2_5_vl"),
            ("qwen_vl", "qwen3_vl"), ("idefics3", "smolvlm")]
IDS = [variant or family for family, variant in FAMILIES]
PREFIX, SUFFIX, ANSWER = "Look: ", "\nWhat is it?\n", "a cat"


def tiny_model(family: str, variant: str | None, compression: str = "none"):  # noqa: ANN201
    if variant is not None:
        return tiny(family, variant, compression)
    from magic_mm import MagicEmbedder

    return MagicEmbedder.from_pretrained(f"tiny-random-{family}", compression=compression)


def ids(backbone, text: str) -> list[int]:  # noqa: ANN001
    return backbone.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def reference_logits(model, image) -> torch.Tensor:  # noqa: ANN001
    """transformers' full-model logits ``(L, V)`` for PREFIX <image> SUFFIX ANSWER </s>,
    with the image as placeholder tokens plus pixels, laid out as the checkpoints expect."""
    backbone = model.backbone
    layout = backbone.encode_images([image])[0]  # only its marker texts and piece sizes are used
    placeholder = 0 if model.config.family == "composed" else backbone.model.config.image_token_id
    sequence, visual = ids(backbone, PREFIX), []
    for marker, size in zip(layout.markers, layout.pieces):
        sequence += ids(backbone, marker)
        visual += range(len(sequence), len(sequence) + size)
        sequence += [placeholder] * size
    sequence += ids(backbone, layout.markers[-1]) + ids(backbone, SUFFIX)
    sequence += ids(backbone, ANSWER) + [backbone.tokenizer.eos_token_id]
    input_ids = torch.tensor([sequence])
    mask = torch.ones_like(input_ids)
    family = model.config.family
    if family == "composed":  # a plain transformers LM: visual tokens enter as embeddings
        pixels = backbone.image_tiles(image)
        grid = backbone.vision.features(pixels).permute(0, 2, 3, 1)
        embeds = backbone.lm.get_input_embeddings()(input_ids)
        embeds[0, visual] = backbone.connector(grid.reshape(1, -1, grid.shape[-1]))[0]
        return backbone.lm(inputs_embeds=embeds, attention_mask=mask).logits[0]
    if family == "internvl":
        return backbone.model(input_ids=input_ids, attention_mask=mask,
                              pixel_values=backbone.image_tiles(image)).logits[0]
    if family == "qwen_vl":
        types = torch.zeros_like(input_ids)
        types[0, visual] = 1
        pixels = backbone.processor(images=[image], return_tensors="pt")
        return backbone.model(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types, **pixels).logits[0]
    pixels = backbone.processor(images=[[image]], return_tensors="pt")
    return backbone.model(input_ids=input_ids, attention_mask=mask, **pixels).logits[0]


@pytest.mark.parametrize(("family", "variant"), FAMILIES, ids=IDS)
def test_uncompressed_generative_logits_equal_the_transformers_forward(family, variant):
    """Also in a padded batch next to a longer text-only prompt, and the answer loss with them."""
    model = tiny_model(family, variant)
    image = make_image(150, 100, seed=1)
    examples = [GenExample([PREFIX, image, SUFFIX], ANSWER),
                GenExample(["a text-only prompt that is longer than the first one " * 8], "no")]
    with torch.no_grad():
        batch = build_batch(model, examples)
        ours = logits(model, batch)
        reference = reference_logits(model, image)
        loss = answer_loss(model, batch)
        per_row = answer_log_likelihoods(model, batch)
    n = len(reference)
    assert int(batch.lengths[0]) == n and int(batch.lengths[1]) > n  # row 0 is padded
    torch.testing.assert_close(ours[0, :n], reference, atol=1e-4, rtol=1e-4)
    # the answer loss reads the same logits: check row 0's share against the reference
    targets = batch.labels[0, 1:n]
    answer = targets != IGNORE
    expected_row0 = torch.nn.functional.cross_entropy(reference[:-1][answer], targets[answer], reduction="sum")
    row1 = batch.labels[1, 1:] != IGNORE
    expected_row1 = torch.nn.functional.cross_entropy(ours[1, :-1][row1], batch.labels[1, 1:][row1], reduction="sum")
    expected = (expected_row0 + expected_row1) / (answer.sum() + row1.sum())
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    # per row, the same tokens summed: each row's answer log-likelihood, unmixed with the other row's
    torch.testing.assert_close(per_row, -torch.stack([expected_row0, expected_row1]), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(("family", "variant"), FAMILIES, ids=IDS)
def test_a_cached_vision_grid_is_an_ordinary_image_input(family, variant):
    """``encode_images`` takes an image's ``VisionGrid`` in place of the image, with the same
    result and metadata (Idefics3's tiling used to be refused: training it with cache_vision failed)."""
    model = tiny_model(family, variant, "bilinear:2")
    backbone = model.backbone
    images = [make_image(150, 100, seed=1), make_image(64, 128, seed=2)]
    with torch.no_grad():
        grids = backbone.vision_features(images)
        direct = backbone.encode_images(images)
        mixed = backbone.encode_images([grids[0], images[1]])
        cached = backbone.encode_images(grids)
    assert all(isinstance(g, VisionGrid) for g in grids)
    for a, b, c in zip(direct, mixed, cached):
        assert isinstance(a, ImageTokens)
        assert (a.markers, a.pieces, a.grid_thw) == (b.markers, b.pieces, b.grid_thw) == (c.markers, c.pieces, c.grid_thw)
        torch.testing.assert_close(b.embeds, a.embeds, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c.embeds, a.embeds, atol=1e-4, rtol=1e-4)
    # the backbone keeps nothing about the images it encoded
    assert not any(isinstance(v, (list, dict)) and v and isinstance(next(iter(v)), ImageTokens)
                   for v in vars(backbone).values())


def test_qwen3_deepstack_features_ride_with_their_image():
    """Each image's DeepStack features go to the decoder in the order its tokens appear."""
    model = tiny("qwen_vl", "qwen3_vl", "bilinear:2")
    backbone = model.backbone
    first, second = backbone.encode_images([make_image(150, 100, seed=1), make_image(64, 128, seed=2)])
    assert len(first.deepstack) == 1 and first.deepstack[0].shape == first.embeds.shape
    batch = build_lm_batch(backbone, [["text only"], ["b:", second, "a:", first]])
    assert batch.images == [second, first]
    assert torch.equal(batch.extra["visual_pos_masks"], batch.visual_mask)
    torch.testing.assert_close(batch.extra["deepstack_visual_embeds"][0],
                               torch.cat([second.deepstack[0], first.deepstack[0]]))
    assert batch.position_ids.shape == (3, *batch.attention_mask.shape)


def test_batch_fields_and_prompt_end():
    model = tiny("qwen_vl", "qwen2_vl", "bilinear:2")
    backbone = model.backbone
    image = backbone.encode_images([make_image(150, 100, seed=1)])[0]
    batch = build_lm_batch(backbone, [["ab", image, "c"], ["xyz"]], answers=[None, "ok"], eos=False)
    assert batch.visual_mask[0].sum() == len(image.embeds) and not batch.visual_mask[1].any()
    assert batch.prompt_end.tolist() == [int(batch.lengths[0]) - 1, 2]
    assert batch.labels[1, 3:5].tolist() == ids(backbone, "ok") and (batch.labels[0] == IGNORE).all()
    assert (batch.attention_mask.sum(1) == batch.lengths).all()
    with pytest.raises(ValueError, match="answers"):
        build_lm_batch(backbone, [["a"]], answers=["x", "y"])


@pytest.mark.parametrize(("family", "variant"), FAMILIES, ids=IDS)
def test_stored_instruction_states_give_the_vectors_of_a_full_pass(family, variant):
    """A mixed batch (two instructions, texts, images, a prompt with no instruction) embeds the
    same with the instruction lines' stored states as with every token run; Qwen3-VL's batches
    with images (DeepStack arguments) take the full pass."""
    from magic_mm.model.inputs import prepare
    from magic_mm.model.lm_batch import PrefixStates

    model = tiny_model(family, variant, "bilinear:2").eval()
    items = [prepare("a red square"), prepare(make_image(48, 40)), prepare((make_image(40, 48, 1), "a cat")),
             prepare("a much longer query about a small blue circle on a table")]
    prompts = (model.prompts(items[:1], "query") + model.prompts(items[1:2], "candidate")
               + model.prompts(items[2:3], "query", "Find the image.") + model.prompts(items[3:], "query", "")
               + model.prompts(items[3:], "query"))
    with torch.inference_mode():
        full = model.embed_prompts(prompts)
        model.prefix_states = PrefixStates()
        stored = model.embed_prompts(prompts)
        again = model.embed_prompts(prompts[:1])  # a later call reuses the stored line
    torch.testing.assert_close(stored, full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again[0], full[0], atol=1e-5, rtol=1e-4)
    assert len(model.prefix_states) == (1 if variant == "qwen3_vl" else 3)
    with torch.inference_mode():
        assert model.embed_prompts([]).shape == (0, model.embedding_dim)
