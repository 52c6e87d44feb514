"""What a saved magic-mm model folder holds, and how names resolve to folders.

A folder is ``config.json`` (this dataclass) plus ``weights.safetensors`` with
only what the project trained: the connector and, if present, LoRA.  The base
parts (vision encoder, LM) are named in ``backbone`` and loaded from their own
packages or folders, so a saved model is megabytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from magic_mm.errors import ModelFolderError
from magic_mm.model.prompts import DEFAULT_INSTRUCTIONS

FORMAT = "magic-mm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
DEFAULT_MODEL_NAME = "magic-mm-tiny"
DEFAULT_MODEL_FOLDER = Path(__file__).resolve().parent.parent / "default_model"
# magic-mm-tiny's prompts, compression and shapes with random weights, for speed measurements on
# a machine that cannot hold its weights (a GPU machine gets the repo alone: docs/benchmarks.md).
RANDOM_DEFAULT_NAME = "random-magic-mm-tiny"
RANDOM_PARTS = {"vision": "efficientnet-lite0-random", "lm": "smollm2-135m-random"}


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class EmbedderConfig:
    family: str
    backbone: dict[str, Any]
    compression: str = "bilinear:2"
    instructions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INSTRUCTIONS))
    max_text_tokens: int = 512
    lora: LoraSettings | None = None
    name: str | None = None

    def to_json(self) -> str:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> EmbedderConfig:
        if data.get("format") != FORMAT:
            raise ModelFolderError(
                f"{source}: not a magic-mm model (config.json has no \"format\": \"magic-mm\"); "
                "pass a folder written by MagicEmbedder.save_pretrained, 'magic-mm-tiny', "
                "or a checkpoint folder (InternVL, Qwen-VL, Idefics3, SmolVLM)"
            )
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFolderError(
                f"{source}: written by a newer magic-mm (format {data['format_version']}); upgrade magic-mm"
            )
        known = {f for f in cls.__dataclass_fields__}
        fields = {k: v for k, v in data.items() if k in known}
        try:
            if fields.get("lora") is not None:
                fields["lora"] = LoraSettings(**fields["lora"])
            return cls(**fields)
        except TypeError as exc:
            raise ModelFolderError(f"{source}: config.json is malformed ({exc})") from None


def read_folder_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(
            f"{folder}: has no {CONFIG_FILE}; pass a folder written by save_pretrained, "
            f"a checkpoint folder (InternVL, Qwen-VL, Idefics3, SmolVLM), or '{DEFAULT_MODEL_NAME}'"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc}); restore or re-save the model") from None
