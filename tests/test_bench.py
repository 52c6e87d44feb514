"""The efficiency benchmark's mechanics (never its timings) and the PIL plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from magic_mm.data.captions import read_captioned_images
from magic_mm.errors import ModelFolderError
from magic_mm.eval.bench import add_ratios, gqa_sdpa_flop, memory_job, summarise, time_job
from magic_mm.eval.plot import bench_plot
from magic_mm.model.backbones import composed
from tests.conftest import REPO

JOB = {"target": {"kind": "embedder", "model": "tiny-random-composed"}, "variants": ["none", "bilinear:2"],
       "reps": 2, "items": 2, "batch": 2, "data": "/nonexistent", "threads": None}


def test_time_job_interleaves_variants_and_counts_tokens():
    raw = time_job(JOB)
    assert list(raw) == ["none", "bilinear:2"]
    none, s2 = raw["none"], raw["bilinear:2"]
    # tiny-random-composed: 128-px input → 4×4 grid; bilinear:2 → 2×2.
    assert (none["visual_tokens"], s2["visual_tokens"]) == (16, 4)
    assert none["candidate_seq_len"] - s2["candidate_seq_len"] == 12  # only the visual tokens shrink
    assert none["query_seq_len"] == s2["query_seq_len"]  # a text query has no image
    for r in raw.values():
        assert len(r["query_ms"]) == len(r["candidate_ms"]) == 4 and len(r["throughput"]) == 2
        assert all(v > 0 for v in r["query_ms"] + r["candidate_ms"] + r["throughput"])


def test_memory_job_reports_a_peak_above_the_loaded_size():
    mem = memory_job({**JOB, "variants": ["bilinear:2"]})
    assert mem["peak_mib"] >= mem["rss_loaded_mib"] > 0 and mem["batch"] == 2


def fake_row(tokens, cand, thr, peak):
    raw = {"visual_tokens": tokens, "query_seq_len": 10, "candidate_seq_len": tokens + 10,
           "query_ms": [5.0, 5.0], "candidate_ms": cand, "throughput": thr}
    return summarise(raw, {"peak_mib": peak, "rss_loaded_mib": 1.0, "batch": 2})


def test_ratios_against_none():
    rows = {"bilinear:2": fake_row(4, [10.0, 30.0, 20.0], [4.0], 150.0), "none": fake_row(16, [40.0], [2.0], 200.0)}
    assert add_ratios(rows) == "none"
    r = rows["bilinear:2"]
    assert r["candidate_ms"]["median"] == 20.0 and r["candidate_ms"]["p95"] == pytest.approx(29.0)
    assert r["ratios"] == {"visual_tokens": 0.25, "candidate_seq_len": 0.538, "query_ms": 1.0,
                           "candidate_ms": 0.5, "throughput": 2.0, "peak_memory": 0.75}
    only = {"avgpool:2": fake_row(4, [10.0], [], 100.0)}
    assert add_ratios(only) == "avgpool:2" and only["avgpool:2"]["ratios"]["throughput"] is None


def test_plot_writes_a_png(tmp_path):
    rows = {"none": fake_row(16, [40.0], [2.0], 200.0), "bilinear:2": fake_row(4, [20.0], [4.0], 150.0)}
    add_ratios(rows)
    result = {"machine": {"device": "cpu", "cpus": 2},
              "model": {"target": {"model": "m"}, "reps": 1, "variants": rows}}
    path = bench_plot(result, tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.size == (1120, 450)
        assert len(set(img.getdata())) > 5  # something was drawn
    for r in rows.values():
        r["quality"] = {"score": 0.5, "tasks": {}, "metric": ["hit@1"]}
    bench_plot(result, tmp_path / "q.png")


@pytest.mark.parametrize("args, message", [
    (["--compression", "bilinear:two"], "bad compression argument"),
    (["--archs", "gpt-9"], "unknown; choose from"),
    (["--compression", ","], "at least one variant"),
    (["--compression", "", "--archs", "clip-vit-b32", "--plot", "x.png"], "--plot needs"),
])
def test_bench_bad_arguments(run_cli, args, message):
    code, _, err = run_cli("bench", "--model", "tiny-random-composed", *args)
    assert code == 2 and message in err


def test_bench_command_end_to_end(run_cli, tmp_path):
    code, out, err = run_cli("bench", "--model", "tiny-random-composed", "--compression", "none,bilinear:2",
                             "--reps", "1", "--items", "1", "--batch", "2", "--no-memory", "--json",
                             "--plot", tmp_path / "b.png", "--data", tmp_path)
    assert code == 0, err
    res = json.loads(out)
    assert set(res["model"]["variants"]) == {"none", "bilinear:2"}
    assert res["model"]["variants"]["bilinear:2"]["ratios"]["visual_tokens"] == 0.25
    assert (tmp_path / "b.png").is_file()


def test_an_architecture_without_room_is_skipped_not_fatal(monkeypatch):
    import magic_mm.eval.bench as bench
    from magic_mm.eval.commands import bench_table

    def no_room(needed, label, timeout_s=0.0):
        raise bench.NotEnoughMemory(f"{label}: needs about 9.8 GiB of free memory")

    monkeypatch.setattr(bench, "wait_for_memory", no_room)
    job = {**JOB, "target": {"kind": "internvl-random", "arch": "internvl3-2b"}}
    raw = bench.time_job(job)
    mem = bench.memory_job({**job, "variants": ["none"]})
    assert mem["peak_mib"] is None and "9.8 GiB" in mem["skipped"]
    rows = {v: bench.summarise(raw[v], mem) for v in raw}
    bench.add_ratios(rows)
    assert rows["none"]["skipped"].startswith("internvl3-2b") and rows["none"]["ratios"]["candidate_ms"] is None
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(bench_table("t", {"variants": rows, "batch": 0}))
    assert "skipped: internvl3-2b" in console.export_text()


def test_time_job_splits_a_candidate_between_vision_and_lm():
    raw = time_job({**JOB, "variants": ["bilinear:2"], "reps": 1, "items": 1, "dtype": "float32"})
    row = raw["bilinear:2"]
    peak = row["peak_gflops_per_s"]
    # bf16's peak only where the CPU runs bf16 natively (without its kernels it is no ceiling)
    from magic_mm.model.dtypes import cpu_runs_bf16

    assert set(peak) == ({"float32", "bfloat16"} if cpu_runs_bf16() else {"float32"})
    assert all(v > 0 for v in peak.values())
    split = row["split"]
    assert split["dtype"] == "float32" and split["peak_gflops_per_s"] == peak["float32"]
    assert set(split) == {"dtype", "peak_gflops_per_s", "batch_1", "batch_2"}
    one, two = split["batch_1"], split["batch_2"]
    assert (one["candidates_per_call"], two["candidates_per_call"]) == (1, 2)
    for part in (one, two):
        assert part["vision_ms"] > 0 and part["lm_ms"] > 0 and part["other_ms"] >= 0
        assert part["vision_ms"] + part["lm_ms"] <= part["total_ms"] * 1.05  # parts of the whole
        assert 0 < part["vision_share"] < 1 and 0 < part["lm_share"] < 1
        # FLOPs per candidate do not depend on the batch (right padding adds none for images).
        assert part["vision_gflop"] == one["vision_gflop"] > 0 and part["lm_gflop"] > 0
        assert part["vision_gflops_per_s"] > 0 and part["lm_gflops_per_s"] > 0
        assert part["vision_of_peak"] == pytest.approx(part["vision_gflops_per_s"] / peak["float32"], rel=0.01, abs=1e-4)
    # 128-px tiny EfficientNet: 3 GFLOP at 448 px scales by (128/448)², about 0.25 GFLOP.
    assert 0.1 < one["vision_gflop"] < 0.5


def test_bench_table_shows_the_split(run_cli, tmp_path):
    code, out, err = run_cli("bench", "--model", "tiny-random-composed", "--compression", "bilinear:2",
                             "--reps", "1", "--items", "1", "--batch", "2", "--no-memory", "--dtype", "float32",
                             "--data", str(tmp_path))
    assert code == 0, err
    assert "where a candidate's time goes" in out and "matmul peak GFLOP/s" in out
    assert "cpu, float32" in out


@pytest.mark.parametrize("kv_heads", [16, 2])
def test_attention_flops_count_grouped_query_heads(kv_heads):
    """InternVL3's LMs share key/value heads across query heads; torch before 2.13 refused to count
    those fused attention calls (the first GPU bench died on it). Equal heads and grouped heads
    cost the same: each query head still attends over every key."""
    from torch.utils.flop_counter import sdpa_flop_count

    query, key = (2, 16, 58, 128), (2, kv_heads, 70, 128)
    assert gqa_sdpa_flop(query, key, key) == 2 * (2 * 2 * 16 * 58 * 70 * 128)
    assert gqa_sdpa_flop(query, key, key) == sdpa_flop_count(query, key, key)  # torch 2.13's own count


def test_the_gpu_peak_is_timed_on_a_product_large_enough_to_fill_a_gpu():
    from magic_mm.eval.bench import PEAK_SHAPES, peak_shapes

    assert peak_shapes("cpu") == PEAK_SHAPES  # 2-core CPUs: a second per 8192³ product would be wasted
    assert max(m * k * n for m, k, n in peak_shapes("cuda")) >= 8192**3
    assert set(PEAK_SHAPES) <= set(peak_shapes("cuda:0"))


def test_gpu_pack_carries_a_tokenizer_that_bench_finds_without_the_gguf_package(tmp_path, monkeypatch, flickr_dir):
    """A GPU machine gets the repo and benchmarks/gpu_pack.py's folder, not the 94 MB SmolLM2 GGUF:
    the random InternVL shapes must still tokenize text exactly as here."""
    flickr = flickr_dir
    out = tmp_path / "gpu"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_pack.py"), "--out", str(out),
                           "--photos", "2", "--data", str(flickr)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert f"MAGIC_MM_CACHE={out}/cache" in done.stdout and "--device cuda" in done.stdout
    assert sorted(p.name for p in (out / "data" / "images").iterdir()) == sorted(
        i.image for i in read_captioned_images(flickr)[:2])
    assert len(read_captioned_images(out / "data")) == 2  # bench --data reads it

    real = composed.smollm2_tokenizer()
    monkeypatch.setenv("MAGIC_MM_CACHE", str(out / "cache"))

    def package_missing():
        raise ModelFolderError("the SmolLM2 weights package is not installed")

    monkeypatch.setattr(composed, "smollm2_gguf_path", package_missing)
    text = "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert composed.smollm2_tokenizer()(text)["input_ids"] == real(text)["input_ids"]
    monkeypatch.setenv("MAGIC_MM_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelFolderError, match="not installed"):
        composed.smollm2_tokenizer()
