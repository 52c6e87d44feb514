"""The MLLM judges against real models: ``openai`` against a real OpenAI-compatible server
(``transformers serve``, started here on a model folder saved here), ``hf`` on tiny random
transformers VLMs of each family, each compared with a direct transformers forward."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from magic_mm.errors import UserError
from magic_mm.train.judge import ABSENT, OpenAIJudge, Verdict, calibrated_threshold, openai_yes_no

VENV_BIN = Path(sys.executable).parent

# Text candidates, as stage 3 asks about them (the template's {query} and {candidate} filled in).
QUESTION = "Does the candidate match the query? Query: {query}\nCandidate: {candidate}\nAnswer yes or no."
PAIRS = [  # (query, candidate, matches)
    ("a red square", "a red square", True),
    ("a red square", "a blue circle", False),
    ("two dogs on a beach", "two dogs on a beach", True),
    ("two dogs on a beach", "a plate of pasta", False),
    ("a man riding a bike", "a man riding a bike", True),
    ("a man riding a bike", "a cat asleep on a sofa", False),
    ("children in a pool", "children in a pool", True),
    ("children in a pool", "a red square", False),
]
CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def question(query: str, candidate: str) -> str:
    return QUESTION.format(query=query, candidate=candidate)


def sent_text(query: str, candidate: str) -> str:
    """The text OpenAIJudge sends about one pair (a text-only model's server joins the parts)."""
    body = OpenAIJudge("http://unused", "unused", "UNUSED").request_body(question(query, candidate), None)
    return " ".join(part["text"] for part in body["messages"][0]["content"])


def chat_ids(tokenizer, text: str) -> torch.Tensor:  # noqa: ANN001
    """The prompt the server builds for one user message (its chat template, generation prompt on)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


# -- openai: a real server ------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_folder(tmp_path_factory) -> Path:
    """A tiny random Llama chat model (byte tokenizer, with "Yes" and "No" as whole tokens) whose
    output layer is solved so that it answers the judge's question about each of PAIRS correctly: its
    "Yes" row is the least-squares w with w·h = ±5 on the prompts' last hidden states h, its "No" row
    is −w, every other row 0. So its answers differ by pair, and are always Yes or No."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from magic_mm.model.tiny import byte_tokenizer

    tokenizer = copy.deepcopy(byte_tokenizer())
    tokenizer.add_tokens(["Yes", "No"])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hidden = torch.stack([model.model(chat_ids(tokenizer, sent_text(q, c))).last_hidden_state[0, -1]
                              for q, c, _ in PAIRS])
        signs = torch.tensor([5.0 if m else -5.0 for _, _, m in PAIRS])
        w = torch.linalg.pinv(hidden) @ signs
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("Yes")] = w
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("No")] = -w
    folder = tmp_path_factory.mktemp("served") / "tiny-judge"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(served_folder):
    """``transformers serve FOLDER`` on a free local port; yields its base URL (…/v1)."""
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = served_folder.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(VENV_BIN / "transformers"), "serve", str(served_folder), "--port", str(port),
                                 "--host", "127.0.0.1", "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_openai_judge_reads_the_served_models_answer(server, served_folder):
    """Each verdict is the answer the same model gives in-process (greedy first token after the
    same chat template): Yes → (0, ABSENT), No → (ABSENT, 0). transformers serve ignores
    `logprobs`, so the judge reads the answer's text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = OpenAIJudge(server, str(served_folder), "MAGIC_MM_TEST_NO_KEY")
    tokenizer = AutoTokenizer.from_pretrained(served_folder)
    model = AutoModelForCausalLM.from_pretrained(served_folder).eval()
    said = []
    for q, c, _ in PAIRS:
        with torch.no_grad():
            logits = model(chat_ids(tokenizer, sent_text(q, c))).logits[0, -1]
        token = tokenizer.convert_ids_to_tokens(int(logits.argmax()))
        said.append(token)
        expected = {"Yes": (0.0, ABSENT), "No": (ABSENT, 0.0)}.get(token, (ABSENT, ABSENT))
        assert judge.logits(question(q, c), None) == expected, (q, c, token)
    assert set(said) == {"Yes", "No"}  # the model answers both ways, so a swapped or one-sided judge fails
    verdicts = [Verdict(*judge.logits(question(q, c), None)) for q, c, _ in PAIRS]
    assert [v.relevant for v in verdicts] == [m for _, _, m in PAIRS]  # the solved answers: every pair right


def test_openai_judge_sends_the_key_and_is_refused_a_wrong_model_name(server, served_folder, monkeypatch):
    import magic_mm.train.judge as judge_module

    sent = []
    real_urlopen = urllib.request.urlopen

    def recording(request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent.append(request)
        return real_urlopen(request, *args, **kwargs)  # still the real server

    monkeypatch.setattr(judge_module.urllib.request, "urlopen", recording)
    monkeypatch.setenv("MAGIC_MM_TEST_JUDGE_KEY", "sk-local-test")
    keyed = OpenAIJudge(server, str(served_folder), "MAGIC_MM_TEST_JUDGE_KEY")
    keyed.logits(question(*PAIRS[0][:2]), None)
    assert sent[-1].get_header("Authorization") == "Bearer sk-local-test"
    assert sent[-1].full_url == server + "/chat/completions"
    monkeypatch.delenv("MAGIC_MM_TEST_JUDGE_KEY")
    OpenAIJudge(server, str(served_folder), "MAGIC_MM_TEST_JUDGE_KEY").logits(question(*PAIRS[0][:2]), None)
    assert sent[-1].get_header("Authorization") is None
    # The server is pinned to its folder: another model name is an HTTP 400, shown with the server's words.
    with pytest.raises(UserError, match=r"HTTP 400: .*pinned.*stage3\.judge\.model"):
        OpenAIJudge(server, "some-other-model", "MAGIC_MM_TEST_JUDGE_KEY").logits("a question", None)


def test_openai_judge_errors_are_user_errors(server, served_folder):
    with pytest.raises(UserError, match=r"HTTP 404"):  # the base URL without /v1
        OpenAIJudge(server.removesuffix("/v1"), str(served_folder), "X").logits("a question", None)
    with pytest.raises(UserError, match="request failed .*stage3.judge.url"):  # nothing listens there
        OpenAIJudge(f"http://127.0.0.1:{free_port()}/v1", "m", "X").logits("a question", None)


def test_an_answer_that_is_neither_yes_nor_no_keeps_margins_finite():
    """A reply with neither word (a text answer like "The", or log-probs without them) is a tie at
    ABSENT, not -inf on both sides (a NaN margin that breaks the calibration's cuts)."""
    neither = openai_yes_no({"choices": [{"message": {"content": "The"}}]})
    listed = openai_yes_no({"choices": [{"message": {"content": "No"}, "logprobs": {"content": [{"top_logprobs": [
        {"token": "No", "logprob": -0.1}, {"token": "The", "logprob": -150.0}]}]}}]})
    assert neither == (ABSENT, ABSENT) and Verdict(*neither).margin == 0.0
    assert listed == (-151.0, -0.1)  # an unlisted answer sits below every listed one
    cut, accuracy = calibrated_threshold([Verdict(0.0, ABSENT), Verdict(*neither)], [Verdict(ABSENT, 0.0)])
    assert cut == -50.0 and accuracy == 1.0  # a number between the margins, not NaN


# -- hf: tiny random VLMs of each family ----------------------------------------------------
HF_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
               "PLACEHOLDER{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
# family variant → (its processor class, the image placeholder its chat template writes, the markers that
# must be single tokens, processor settings)
HF_FAMILIES = {
    "qwen2_vl": ("Qwen2VLProcessor", "<|vision_start|><|image_pad|><|vision_end|>",
                 ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], {}),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "<|vision_start|><|image_pad|><|vision_end|>",
                   ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], {}),
    "qwen3_vl": ("Qwen3VLProcessor", "<|vision_start|><|image_pad|><|vision_end|>",
                 ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"], {}),
    "idefics3": ("Idefics3Processor", "<image>",
                 ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], {"image_seq_len": 16}),
    "internvl": ("InternVLProcessor", "<IMG_CONTEXT>", ["<video>"], {"image_seq_length": 16}),
}
# InternVL's tokenizer names its image markers (the byte tokenizer has <img>, </img> and <IMG_CONTEXT>).
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def tiny_vlm(variant: str):  # noqa: ANN201
    """The family's tiny random config (magic_mm's own, as family_checks builds it) with the image
    markers as single tokens, as in the real checkpoints; returns (model, tokenizer, image processor)."""
    import transformers

    from magic_mm.model.backbones import idefics3, qwen_vl
    from magic_mm.model.tiny import byte_tokenizer_with

    tokenizer = byte_tokenizer_with(HF_FAMILIES[variant][2])
    if variant in qwen_vl.VARIANTS:
        config = qwen_vl.tiny_config(variant)
        config.text_config.vocab_size = len(tokenizer)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
        for name, value in ids.items():
            setattr(config, name, value)
        model_class = qwen_vl.VARIANTS[variant].model_class
        image_processor = qwen_vl._processor(None, config, qwen_vl.VARIANTS[variant], {}, default_max_pixels=224 * 224)
    elif variant == "internvl":
        from magic_mm.model.backbones.internvl import tiny_internvl

        config = tiny_internvl()[0].config  # 112-px tiles of 14-px patches, pixel shuffle 0.5: 16 tokens a tile
        config.text_config.vocab_size = len(tokenizer)
        model_class = "InternVLForConditionalGeneration"
        image_processor = transformers.GotOcr2ImageProcessorPil(size={"height": 112, "width": 112},
                                                                crop_to_patches=False)
    else:
        config, settings = idefics3.tiny_config(variant)
        config.text_config.vocab_size = len(tokenizer)
        config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        model_class = idefics3.VARIANTS[variant].model_class
        image_processor = idefics3._processor(variant, None, settings, {})
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval(), tokenizer, image_processor


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def hf_folder(request, tmp_path_factory):
    """A checkpoint folder as a hub VLM has one: weights, tokenizer, image processor, chat template and
    processor settings (written file by file: these processors cannot be built here, where their video
    processors' torchvision is missing)."""
    import json

    variant = request.param
    model, tokenizer, image_processor = tiny_vlm(variant)
    folder = tmp_path_factory.mktemp("hf") / variant
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    if variant == "internvl":
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        settings["extra_special_tokens"] = INTERNVL_TOKENS
        (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "chat_template.jinja").write_text(HF_TEMPLATE.replace("PLACEHOLDER", HF_FAMILIES[variant][1]))
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": HF_FAMILIES[variant][0],
                                                              **HF_FAMILIES[variant][3]}))
    return variant, folder, model, tokenizer


def test_hf_judge_logits_equal_a_direct_forward(hf_folder, tmp_path):
    """HFJudge's (yes, no) are the logits of "Yes"'s and "No"'s first tokens after the chat prompt
    (image, question, generation prompt), as the same model's own forward gives them."""
    from conftest import make_image
    from magic_mm.train.judge import HFJudge, image_text_processor

    variant, folder, model, tokenizer = hf_folder
    image = make_image(150, 100, seed=1)
    image.save(tmp_path / "photo.png")
    judge = HFJudge(str(folder))
    processor = image_text_processor(str(folder))
    yes, no = tokenizer.convert_tokens_to_ids("Y"), tokenizer.convert_tokens_to_ids("N")
    ask = "Does the image match the query? Query: a cat\nAnswer yes or no."
    for picture in (image, None):
        head = HF_FAMILIES[variant][1] if picture is not None else ""
        prompt = f"<s>user\n{head}{ask}</s>\n<s>assistant\n"
        inputs = processor(text=prompt, images=[picture] if picture is not None else None, return_tensors="pt")
        with torch.no_grad():
            row = model(**inputs).logits[0, -1]
        got = judge.logits(ask, tmp_path / "photo.png" if picture is not None else None)
        assert got == pytest.approx((float(row[yes]), float(row[no])), abs=1e-5), variant
    with_image = judge.logits(ask, tmp_path / "photo.png")
    assert abs(with_image[0] - judge.logits(ask, None)[0]) > 1e-4  # the picture reaches the model
