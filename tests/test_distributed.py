"""Training on two processes (real ``torchrun``, gloo on CPU) equals one process on the same global batch.

Two launches: ``magic-mm train stage2 --stop-after 3`` (GradCache on, so gathering composes
with it), then a worker that trains stage 1 and the reranker and runs the same stage-2
command again, which resumes.  The one-process references run in this process.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from distributed_worker import GRADS_FILE, first_step_grads
from magic_mm.train import distributed
from magic_mm.train.config import load_config
from magic_mm.train.registry import TRAINERS

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def test_shards_are_contiguous_and_cover_everything():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [e - s for s, e in bounds]
            assert max(sizes) - min(sizes) <= 1
    # one process: the helpers are the identity
    x = torch.randn(3, 4, requires_grad=True)
    assert distributed.world() == 1 and list(distributed.shard([1, 2, 3])) == [1, 2, 3]
    torch.testing.assert_close(distributed.all_gather_with_grad(x), x)
    assert distributed.all_gather_with_grad(x).requires_grad


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MAGIC_MM_DTYPE": "float32"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def write_data(root: Path) -> None:
    """Eight noisy flat-colour images with two captions each, and distinct cached vision grids."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    grids = {}
    with (root / "captions.csv").open("w", newline="") as f, (root / "splits.csv").open("w", newline="") as g:
        caps, splits = csv.writer(f), csv.writer(g)
        caps.writerow(["image", "caption"])
        splits.writerow(["image", "split"])
        for name in COLOURS:
            pixels = rng.integers(0, 255, (48, 48, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{name}.jpg")
            caps.writerows([[f"{name}.jpg", f"a {name} square"], [f"{name}.jpg", f"all {name}"]])
            splits.writerow([f"{name}.jpg", "train"])
            grids[str(root / "images" / f"{name}.jpg")] = torch.randn(1, 4, 4, 1280, generator=generator)
    save_file(grids, root / "grids.safetensors")


def write_configs(folder: Path, data: Path, out: Path) -> None:
    common = {"model": "tiny-random-composed", "data": {"folder": str(data)},
              "vision_cache_file": str(data / "grids.safetensors"), "temperature": 0.1, "show_progress": False,
              "checkpoint_every": 2, "optim": {"lr": 1e-3, "connector_lr": 1e-3}}
    configs = {
        # symmetric: the query vectors are gathered too; batch 6 gives uneven candidate shares
        "stage2": {"steps": 3, "batch_size": 6, "symmetric": True,
                   "hard_negatives": {"steps": 2, "window": [1, 4], "count": 1}},
        "stage1": {"steps": 3, "batch_size": 4,
                   "stage1": {"text_instructions": [{"prompt": "Say hi.", "answer": "hi there"}]}},
        "reranker": {"steps": 2, "batch_size": 3, "reranker": {"negatives": [2, 3]}},  # shares of 2 and 1
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stage, extra in configs.items():
        raw = {"stage": stage, "output": str(out / stage), **common, **extra}
        (folder / f"{stage}.yaml").write_text(yaml.safe_dump(raw))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    write_data(root / "data")
    write_configs(root / "one", root / "data", root / "one-out")
    write_configs(root / "two", root / "data", root / "two-out")
    for stage in ("stage2", "stage1", "reranker"):  # one process, in this process
        TRAINERS[stage](load_config(root / "one" / f"{stage}.yaml")).run()
    grads = first_step_grads(root / "one", root / "one")
    # two processes: stage 2 with GradCache, killed (stopped) after step 3 ...
    torchrun("-m", "magic_mm.cli", "train", "stage2", "--config", str(root / "two" / "stage2.yaml"),
             "--stop-after", "3", "--quiet", "--set", "grad_cache_chunk=2")
    stopped = read_log(root / "two-out" / "stage2")
    # ... then stage 1, the reranker, and the stage-2 command again, which resumes (without GradCache)
    torchrun(str(ROOT / "tests" / "distributed_worker.py"), str(root / "two"))
    return {"one": root / "one-out", "two": root / "two-out", "stopped": stopped,
            "grads": (grads, torch.load(root / "two" / GRADS_FILE))}


@pytest.mark.parametrize("stage", ["stage2", "stage1", "reranker"])
def test_summed_gradients_equal_the_one_process_gradients(runs, stage):
    """Not only the same direction (AdamW would hide a scale error): the same gradient."""
    one, two = (g[stage] for g in runs["grads"])
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6 * float(one[key].abs().max()) + 1e-9)


def assert_same_weights(one: Path, two: Path) -> None:
    a, b = load_file(one / "model" / "weights.safetensors"), load_file(two / "model" / "weights.safetensors")
    assert a.keys() == b.keys() and a
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert float(diff.mean()) < 1e-4, float(diff.mean())
    moved = torch.cat([a[k].float().flatten() for k in a])
    assert float(diff.max()) < 1e-3 * max(1.0, float(moved.abs().max()))


def test_stage2_two_processes_log_the_one_process_losses(runs):
    one, two = read_log(runs["one"] / "stage2"), read_log(runs["two"] / "stage2")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 5]  # none lost or repeated
    assert [r["candidates"] for r in two] == [r["candidates"] for r in one]  # the global batch's
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=1e-5)
    assert [r["hard_negative_phase"] for r in two] == [0, 0, 0, 1, 1]
    assert [r["step"] for r in runs["stopped"]] == [1, 2, 3]


def test_stage2_two_processes_with_a_resume_end_with_the_one_process_weights(runs):
    assert_same_weights(runs["one"] / "stage2", runs["two"] / "stage2")
    negatives = [json.loads((runs[k] / "stage2" / "hard_negatives.json").read_text()) for k in ("one", "two")]
    assert negatives[0] == negatives[1]  # mined from a pool embedded in shares


@pytest.mark.parametrize("stage", ["stage1", "reranker"])
def test_sharded_generative_stages_equal_one_process(runs, stage):
    one, two = read_log(runs["one"] / stage), read_log(runs["two"] / stage)
    for key in ("loss", *(("pointwise", "listwise") if stage == "reranker" else ())):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-5)
    assert_same_weights(runs["one"] / stage, runs["two"] / stage)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    write_data(tmp_path / "data")
    write_configs(tmp_path / "cfg", tmp_path / "data", tmp_path / "out")
    grads = []
    for on in (False, True):
        config = load_config(tmp_path / "cfg" / "stage2.yaml",
                             overrides={"gradient_checkpointing": on, "output": str(tmp_path / f"gc-{on}")})
        trainer = TRAINERS["stage2"](config)
        assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.embedder.backbone.decoder.modules()) == on
        trainer.prepare_run()
        trainer.train_step(0)
        grads.append({k: p.grad for k, p in trainer.embedder.trained_parameters().items() if p.grad is not None})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-7)


def test_multi_gpu_recipe_configs_load():
    from accelerate.commands.config.config_args import ClusterConfig

    stages = {path.stem: load_config(path) for path in sorted((ROOT / "configs" / "internvl3").glob("*.yaml"))}
    assert set(stages) == {"stage1", "stage2", "stage3", "reranker", "stage2-mmeb"}
    mmeb = stages["stage2-mmeb"]  # the paper's setting: MMEB-train's 20 sub-datasets, each with its instructions
    assert len(mmeb.datasets) == 20 and all(d.query_instruction for d in mmeb.datasets)
    assert all(c.lora.rank == 16 and c.gradient_checkpointing for c in stages.values())
    assert stages["stage2"].temperature == 0.03 and stages["stage2"].hard_negatives.window == (50, 100)
    kinds = {path.name: str(ClusterConfig.from_yaml_file(path).distributed_type).split(".")[-1]
             for path in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert kinds == {"ddp-8gpu.yaml": "MULTI_GPU", "fsdp-8gpu-internvl3.yaml": "FSDP"}
