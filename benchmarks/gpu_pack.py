"""Lay out what the GPU check needs beside the repo, for a session that is lent a GPU machine.

The device machine gets a copy of the working tree (64 MiB at most, the repo is about 51) and
nothing else: no ../shared data, no SmolLM2 GGUF package (94 MB; magic-mm-tiny's LM weights and
its tokenizer come from it), and no FastAPI or uvicorn. This writes, under --out (default .gpu/,
which it adds to .git/info/exclude so that only `carry` sends it):

- cache/smollm2-135m-instruct-tokenizer/: the tokenizer alone (about 3.5 MB), found through
  $MAGIC_MM_CACHE by ``magic_mm.model.backbones.composed.smollm2_tokenizer``;
- data/: --photos flickr8k photos with their captions.csv (bench --data, serve_load --images);
- wheels/ (with --wheels): the server's packages the machine lacks, and typer and click, at the
  versions installed here, for CPython 3.12 (downloaded from the package registry).

It then prints the one device command. It runs `magic-mm bench` of the InternVL3-2B shape at s = 1
and s = 2 in bf16, timed per candidate at batch 1 with CUDA synchronisation. With --wheels it
then runs `serve_load.py` on `random-magic-mm-tiny` (magic-mm-tiny's shapes, random weights) on
the GPU in float32, for photos and for the mixed load, and in bf16 for photos.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_pack.py [--photos 16] [--wheels]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from magic_mm.data.captions import read_captioned_images
from magic_mm.model.backbones.composed import smollm2_tokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"
TOKENIZER_FOLDER = "smollm2-135m-instruct-tokenizer"  # matched by smollm2_tokenizer's glob
# What `magic-mm serve` needs that the device machine's image lacks (library/device/KINDS.md), and the
# CLI's typer and click at the versions the suite passed with (the image's may be newer than the bounds).
# fastapi 0.165 imports opentelemetry-api; pydantic 2.14 needs a typing-extensions newer than the image may hold.
SERVER_WHEELS = ("fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                 "opentelemetry-api", "typing-extensions", "uvicorn", "typer", "click")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Each step under its own `timeout`, so that one that hangs leaves the others their time; the whole
# command fits a 600 s device call with room to spare.
BENCH = ("timeout -k 5 300 python3 -m magic_mm.cli bench --archs internvl3-2b --compression '' "
         "--arch-compression none,bilinear:2 --arch-items 4 --arch-reps 3 --arch-batch 16 --data {out}/data "
         "--device cuda --save $OUT/bench_internvl3_2b.json 2>&1 | tee $OUT/bench.log")
# float32 for the equal-answer check (IEEE float32: exact_float32_on_gpus); bf16, the GPU default, for photos last.
SERVE_RUNS = (("image", "float32"), ("mixed", "float32"), ("image", "bfloat16"))
SERVE_LOAD = ("timeout -k 5 90 python3 benchmarks/serve_load.py --model random-magic-mm-tiny --device cuda "
              "--dtype {dtype} --mix {mix} --images {out}/data/images --rounds 5 --per-client 3 2>&1 "
              "| tee $OUT/serve_{mix}_{dtype}.log")


def device_command(out: str, with_server: bool) -> str:
    steps = [f"export MAGIC_MM_CACHE={out}/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD",
             "nvidia-smi -L",
             "python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'"]
    if with_server:
        steps.append(f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
                     f"{out}/wheels/*.whl")
    steps.append(BENCH.format(out=out))
    if with_server:
        steps += [SERVE_LOAD.format(out=out, mix=mix, dtype=dtype) for mix, dtype in SERVE_RUNS]
    return "; ".join(steps)


def pack(out: Path, photos: int, data: Path) -> None:
    """Write the tokenizer and ``photos`` captioned photos under ``out``."""
    if out.exists():
        shutil.rmtree(out)
    smollm2_tokenizer().save_pretrained(out / "cache" / TOKENIZER_FOLDER)
    items = read_captioned_images(data)[:photos]
    (out / "data" / "images").mkdir(parents=True)
    with (out / "data" / "captions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for item in items:
            shutil.copyfile(item.path, out / "data" / "images" / item.image)
            writer.writerows([item.image, caption] for caption in item.captions)


def download_server_wheels(folder: Path) -> None:
    """The server's wheels for the device machine's CPython 3.12, at this environment's versions."""
    platforms = [arg for name in WHEEL_PLATFORMS for arg in ("--platform", name)]
    pins = [f"{name}=={version(name)}" for name in SERVER_WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def inside_repo(out: Path) -> Path | None:
    """``out`` relative to the repo root (what ``carry`` names), or None if it lies outside."""
    try:
        return out.resolve().relative_to(REPO)
    except ValueError:
        return None


def exclude_from_git(relative: Path) -> None:
    """Ignore the repo's ``relative`` folder locally, so the device call sends it only when ``carry`` names it."""
    git_dir = subprocess.run(["git", "rev-parse", "--git-dir"], cwd=REPO, capture_output=True, text=True)
    if git_dir.returncode != 0:
        return
    exclude = (REPO / git_dir.stdout.strip() / "info" / "exclude")
    line = f"/{relative.as_posix()}/"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if line not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join([*lines, line]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu")
    parser.add_argument("--photos", type=int, default=16, help="captioned photos to carry (bench's --arch-batch)")
    parser.add_argument("--data", type=Path, default=DATA, help="image–caption folder to take them from")
    parser.add_argument("--wheels", action="store_true",
                        help="also download the server's wheels and add the GPU serve_load runs")
    args = parser.parse_args()
    if args.photos < 1:
        parser.error("--photos: at least 1")
    pack(args.out, args.photos, args.data)
    if args.wheels:
        download_server_wheels(args.out / "wheels")
    relative = inside_repo(args.out)
    if relative is not None:
        exclude_from_git(relative)
    carry = relative.as_posix() if relative is not None else str(args.out)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 2**20:.1f} MiB): the tokenizer, {args.photos} photos"
          + (" and the server's wheels" if args.wheels else ""))
    print(f"device run, from the repo root, with carry [{carry!r}] and timeout_s 600:")
    print(device_command(carry, args.wheels))


if __name__ == "__main__":
    main()
