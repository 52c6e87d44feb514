"""The captions judge (``kind: captions``): a caption against a photo's other human captions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from magic_mm.data.captions import read_captioned_images
from magic_mm.errors import UserError
from magic_mm.model.sentence_encoder import SentenceEncoder, SentenceEncoderError
from magic_mm.train.config import JudgeConfig
from magic_mm.train.judge import make_judge
from magic_mm.train.reference_judge import DEFAULT_CUT, ReferenceCaptionJudge
from test_train import COLOURS, toy_config, toy_data, toy_grids, trainer  # noqa: F401  (fixtures)

FLICKR = "../shared/data/flickr8k-1k"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel

    from magic_mm.model.tiny import byte_tokenizer

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_query_is_left_out_and_the_best_other_caption_counts(toy_data, tiny_bert):  # noqa: F811
    judge = ReferenceCaptionJudge(toy_data, "Is it {query}?", encoder=tiny_bert, cut=0.25)
    photo = toy_data / "images" / "red.jpg"
    yes, no = judge.logits("Is it a red square?", photo)
    q, other = SentenceEncoder(tiny_bert).encode(["a red square", "all red"])
    assert yes == pytest.approx(float(q @ other), abs=1e-5)  # "all red", not the query itself (which gives 1)
    assert yes < 0.999 and no == 0.25
    # A candidate that is another photo compares against all of that photo's captions.
    yes_blue, _ = judge.logits("Is it a red square?", toy_data / "images" / "blue.jpg")
    blue = SentenceEncoder(tiny_bert).encode(["a blue square", "all blue"])
    assert yes_blue == pytest.approx(float((blue @ q).max()), abs=1e-5)


def test_real_minilm_tells_a_caption_s_own_photo_from_another():
    """Val captions against their own photo (query left out) and a random other photo, at the shipped cut."""
    items = read_captioned_images(FLICKR, "val")[:40]
    judge = ReferenceCaptionJudge(FLICKR, "{query}")
    rng = random.Random(0)
    right = total = 0
    for n, item in enumerate(items):
        caption = item.captions[0]
        other = rng.choice([i for m, i in enumerate(items) if m != n])
        right += (judge.similarity(caption, item.path) > DEFAULT_CUT) + (judge.similarity(caption, other.path) <= DEFAULT_CUT)
        total += 2
    assert right / total >= 0.85, right / total


def test_bad_inputs_name_the_input_and_the_fix(toy_data, tiny_bert, tmp_path):  # noqa: F811
    judge = ReferenceCaptionJudge(toy_data, "{query}", encoder=tiny_bert)
    with pytest.raises(UserError, match="elsewhere.jpg.*no reference captions"):
        judge.logits("a red square", tmp_path / "elsewhere.jpg")
    with pytest.raises(UserError, match="no photo"):
        judge.logits("a red square", None)
    with pytest.raises(UserError, match="does not follow the configured template"):
        ReferenceCaptionJudge(toy_data, "Q: {query}", encoder=tiny_bert).logits("a red square", toy_data / "images" / "red.jpg")
    with pytest.raises(UserError, match="exactly one \\{query\\}"):
        ReferenceCaptionJudge(toy_data, "Does {candidate} match?", encoder=tiny_bert)
    with pytest.raises(UserError, match="references is empty"):
        make_judge(JudgeConfig(kind="captions"))
    with pytest.raises(SentenceEncoderError, match="no sentence encoder here"):
        SentenceEncoder(str(tmp_path))


def test_stage3_with_the_captions_judge_keeps_verdicts_consistent(toy_data, toy_grids, tiny_bert, tmp_path):  # noqa: F811
    """A stage-3 run judged by captions: judged-relevant candidates clear the cut, negatives do not."""
    config = toy_config(toy_data, tmp_path / "s3", stage="stage3", steps=2, stage3={
        "retrieve_top": 3, "hard_negatives": 2,
        "judge": {"kind": "captions", "model": tiny_bert, "references": str(toy_data), "question": "{query}"}},
        hard_negatives={"queries_per_group": 1})
    t = trainer(config)
    t.run()
    judged = json.loads((tmp_path / "s3" / "judgements.json").read_text())[toy_data.name]
    cached = [json.loads(line) for line in (tmp_path / "s3" / "judge_cache.jsonl").read_text().splitlines()]
    assert len(cached) == len(judged) * 3
    check = ReferenceCaptionJudge(toy_data, "{query}", encoder=tiny_bert)
    similarity = {}
    for row in cached:  # what the run stored is what the judge computes, against the shipped cut
        similarity[row["question"], row["candidate"]] = row["yes"]
        assert row["yes"] == pytest.approx(check.similarity(row["question"], Path(row["candidate"])), abs=1e-5)
        assert row["no"] == DEFAULT_CUT
    rows = {row.index: row for row in t.data.readers[0]}
    for q, j in judged.items():
        query = rows[int(q)].query.text
        assert all(similarity[query, c["image"]] > DEFAULT_CUT for c in j["judged_relevant"])
        assert all(similarity[query, c["image"]] <= DEFAULT_CUT for c in j["negatives"])
