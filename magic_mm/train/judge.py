"""The stage-3 judge: is a retrieved candidate relevant to the query?

The judge answers yes or no; a candidate is relevant when logit(yes) > logit(no).
Four kinds, one interface (``Judge.logits``):

- ``self``: the project's own stage-1 model (a folder written by save_pretrained);
- ``hf``: any local transformers vision-language model folder with a chat template;
- ``openai``: an OpenAI-compatible ``/chat/completions`` endpoint given by URL, read
  through its top log-probabilities of the first answer token;
- ``captions``: no MLLM; the candidate photo's other human captions, compared with the
  query by a sentence encoder (``reference_judge.py``), for caption data.

Verdicts are cached in a JSONL file keyed by judge, query and candidate, so a
rerun never asks again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from magic_mm.errors import UserError
from magic_mm.model.backbones.base import VisionGrid
from magic_mm.model.inputs import load_image
from magic_mm.train.config import JudgeConfig


@dataclass
class Verdict:
    yes: float  # logit (or log-probability) of "yes"
    no: float

    @property
    def margin(self) -> float:
        return self.yes - self.no

    @property
    def relevant(self) -> bool:
        return self.yes > self.no


def decide(yes: float, no: float) -> bool:
    """The paper's rule: relevant iff logit(yes) > logit(no) (a tie is not relevant)."""
    return Verdict(yes, no).relevant


def calibrated_threshold(matched: list[Verdict], mismatched: list[Verdict]) -> tuple[float, float]:
    """The cut on logit(yes) − logit(no) that best separates known matching pairs from known
    mismatching ones, and the share of those pairs it gets right.

    A small judge (like a briefly trained stage-1 model) can say "yes" to everything while
    still ranking matches above mismatches; its bias, not its ranking, breaks the paper's
    rule (cut at 0).  Ties between cuts go to the one nearest 0.
    """
    if not matched or not mismatched:
        raise ValueError("calibration needs matching and mismatching pairs")
    margins = sorted({v.margin for v in matched + mismatched})
    cuts = [margins[0] - 1.0] + [(a + b) / 2 for a, b in zip(margins, margins[1:])] + [margins[-1] + 1.0]

    def correct(cut: float) -> int:
        return sum(v.margin > cut for v in matched) + sum(v.margin <= cut for v in mismatched)

    best = max(cuts, key=lambda cut: (correct(cut), -abs(cut)))
    return best, correct(best) / (len(matched) + len(mismatched))


class Judge:
    name: str = "judge"

    def logits(self, question: str, image: Path | None) -> tuple[float, float]:
        """(yes, no) scores for one question about one candidate image."""
        raise NotImplementedError

    def logits_many(self, question: str, images: list[Path | None]) -> list[tuple[float, float]]:
        """(yes, no) for one question about each image; judges that can batch override this."""
        return [self.logits(question, image) for image in images]


class SelfJudge(Judge):
    """The project's own stage-1 model, read through its yes/no next-token logits."""

    def __init__(self, folder: str) -> None:
        from magic_mm.model.embedder import MagicEmbedder

        self.model = MagicEmbedder.from_pretrained(folder)
        self.name = f"self:{folder}"
        # The trainer's cached vision grids (same frozen encoder), so the judge skips the encoder.
        self.grids: dict[str, VisionGrid] = {}

    def logits(self, question: str, image: Path | None) -> tuple[float, float]:
        return self.logits_many(question, [image])[0]

    def logits_many(self, question: str, images: list[Path | None]) -> list[tuple[float, float]]:
        """One padded batch when every image has a cached grid (the stage-3 case), else one by one."""
        from magic_mm.model.generative import GenExample, yes_no_logits

        def example(picture: Any) -> GenExample:
            head = [picture, "\n"] if picture is not None else []
            return GenExample([*head, question + "\nAnswer: "])

        with torch.no_grad():
            if images and all(i is not None and str(i) in self.grids for i in images):
                out = yes_no_logits(self.model, [example(self.grids[str(i)]) for i in images])
            else:
                out = torch.cat([yes_no_logits(self.model, [example(load_image(i) if i is not None else None)])
                                 for i in images])
        return [(float(y), float(n)) for y, n in out]


class HFJudge(Judge):
    """A local transformers image-text-to-text model (e.g. a SmolVLM or InternVL folder)."""

    def __init__(self, folder: str) -> None:
        from transformers import AutoModelForImageTextToText

        if not Path(folder).is_dir():
            raise UserError(f"stage3.judge.model {folder!r}: no such folder; give a local HF VLM folder")
        self.processor = image_text_processor(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.name = f"hf:{folder}"
        tok = self.processor.tokenizer
        self.yes_id = tok("Yes", add_special_tokens=False)["input_ids"][0]
        self.no_id = tok("No", add_special_tokens=False)["input_ids"][0]

    def logits(self, question: str, image: Path | None) -> tuple[float, float]:
        content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
        content.append({"type": "text", "text": question})
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True)
        images = [load_image(image)] if image is not None else None
        inputs = self.processor(text=prompt, images=images, return_tensors="pt")
        with torch.no_grad():
            out = self.model(**inputs).logits[0, -1]
        return float(out[self.yes_id]), float(out[self.no_id])


def image_text_processor(folder: str) -> Any:
    """The folder's processor (``AutoProcessor``).  Where that fails only because its video processor
    needs torchvision (Qwen-VL, InternVL and SmolVLM processors have one; this project installs no
    torchvision), the same processor class is built from the folder's tokenizer, image processor and
    settings without a video processor, which an image judge never calls."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder)
    except (ImportError, ValueError) as exc:  # transformers raises either, naming torchvision
        if "torchvision" not in str(exc).lower():
            raise
    settings = json.loads((Path(folder) / "processor_config.json").read_text())
    base = getattr(transformers, settings.pop("processor_class"))

    class WithoutVideo(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    template = Path(folder) / "chat_template.jinja"
    return WithoutVideo(image_processor=AutoImageProcessor.from_pretrained(folder),
                        tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                        chat_template=template.read_text() if template.is_file() else None, **settings)


class OpenAIJudge(Judge):
    """An OpenAI-compatible chat endpoint; yes/no read from the first token's top log-probs
    (or, from a server that ignores ``logprobs``, from the answer's text; see ``openai_yes_no``)."""

    def __init__(self, url: str, model: str | None, api_key_env: str) -> None:
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model or "default"
        self.key = os.environ.get(api_key_env, "")
        self.name = f"openai:{url}:{self.model}"

    def request_body(self, question: str, image: Path | None) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": question + " Answer Yes or No."}]
        if image is not None:
            data = base64.b64encode(Path(image).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "logprobs": True, "top_logprobs": 20, "temperature": 0}

    def logits(self, question: str, image: Path | None) -> tuple[float, float]:
        body = self.request_body(question, image)
        request = urllib.request.Request(self.url, json.dumps(body).encode(), {
            "Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # the server answered with an error: show what it said
            said = exc.read().decode(errors="replace").strip()[:300] or str(exc.reason)
            raise UserError(f"judge endpoint {self.url}: HTTP {exc.code}: {said}; "
                            "check stage3.judge.url and stage3.judge.model") from None
        except (OSError, ValueError) as exc:  # no server there, a timeout, or a reply that is not JSON
            raise UserError(f"judge endpoint {self.url}: request failed ({exc}); check stage3.judge.url") from None
        if not isinstance(reply, dict) or not reply.get("choices"):
            raise UserError(f"judge endpoint {self.url}: the reply has no choices ({str(reply)[:200]})")
        return openai_yes_no(reply)


# The log-probability given to an answer a server did not list (or, read from the text, did not
# give).  Finite, so that margins stay numbers: with -inf on both sides a margin is NaN, and the
# calibration's cuts between margins are NaN too.
ABSENT = -100.0


def openai_yes_no(reply: dict[str, Any]) -> tuple[float, float]:
    """(yes, no) log-probabilities of the first answer token, from its top log-probabilities.

    An answer missing from that list gets ``ABSENT`` (or less, below every listed entry).  Without
    log-probabilities (``transformers serve`` accepts ``logprobs`` but ignores it) the answer's text
    decides: the word it starts with gets 0 (probability 1), the other ``ABSENT``.
    """
    choice = reply["choices"][0]
    tops = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
    floor = min([ABSENT] + [float(entry["logprob"]) - 1.0 for entry in tops])
    scores = {"yes": floor, "no": floor}
    for entry in tops:
        word = entry["token"].strip().lower()
        if word in scores:
            scores[word] = max(scores[word], float(entry["logprob"]))
    if scores == {"yes": floor, "no": floor}:  # no log-probs (or neither word among them): the text
        text = ((choice.get("message") or {}).get("content") or "").strip().lower()
        scores = {"yes": 0.0 if text.startswith("yes") else ABSENT, "no": 0.0 if text.startswith("no") else ABSENT}
    return scores["yes"], scores["no"]


def make_judge(config: JudgeConfig) -> Judge:
    if config.kind == "captions":
        from magic_mm.train.reference_judge import ReferenceCaptionJudge

        if not config.references:
            raise UserError("stage3.judge.kind is captions but stage3.judge.references is empty; "
                            "give the caption folder (images/ + captions.csv)")
        encoder = {"encoder": config.model} if config.model else {}  # default: MiniLM
        return ReferenceCaptionJudge(config.references, config.question, **encoder)
    if config.kind == "openai":
        if not config.url:
            raise UserError("stage3.judge.kind is openai but stage3.judge.url is empty; give the endpoint URL")
        return OpenAIJudge(config.url, config.model, config.api_key_env)
    if not config.model:
        raise UserError(f"stage3.judge.model is empty; give the {config.kind} judge's model folder")
    return SelfJudge(config.model) if config.kind == "self" else HFJudge(config.model)


class CachedJudge:
    """Asks ``judge`` only about pairs not already in ``file``; appends each new verdict."""

    def __init__(self, judge: Judge, file: Path) -> None:
        self.judge = judge
        self.file = file
        self.asked = 0
        self.verdicts: dict[str, Verdict] = {}
        if file.is_file():
            for line in file.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.verdicts[row["key"]] = Verdict(row["yes"], row["no"])

    def key(self, question: str, image: Path | None) -> str:
        raw = json.dumps([self.judge.name, question, str(image)])
        return hashlib.sha1(raw.encode()).hexdigest()

    def __call__(self, question: str, image: Path | None) -> Verdict:
        return self.many(question, [image])[0]

    def many(self, question: str, images: list[Path | None]) -> list[Verdict]:
        """Verdicts for one question about each image; only the unseen pairs reach the judge."""
        keys = [self.key(question, image) for image in images]
        todo = [keys.index(key) for key in dict.fromkeys(keys) if key not in self.verdicts]
        if todo:
            answers = self.judge.logits_many(question, [images[i] for i in todo])
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self.file.open("a") as fh:
                for i, (yes, no) in zip(todo, answers):
                    self.verdicts[keys[i]] = Verdict(yes, no)
                    fh.write(json.dumps({"key": keys[i], "yes": yes, "no": no, "question": question,
                                         "candidate": str(images[i])}) + "\n")
            self.asked += len(todo)
        return [self.verdicts[key] for key in keys]
