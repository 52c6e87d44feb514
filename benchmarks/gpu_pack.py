"""Lay out what the GPU check needs beside the repo, for a session that is lent a GPU machine.

The device machine gets a copy of the working tree (64 MiB at most, the repo is about 51) and
nothing else: no ../shared data, and no SmolLM2 GGUF package (94 MB), whose tokenizer the
random-init InternVL3 shapes use for realistic text lengths. This writes, under --out (default
.gpu/, which it adds to .git/info/exclude so that only `carry` sends it):

- cache/smollm2-135m-instruct-tokenizer/: the tokenizer alone (about 3.5 MB), found through
  $MAGIC_MM_CACHE by ``magic_mm.eval.bench.bpe_tokenizer``;
- data/: --photos flickr8k photos with their captions.csv, for ``bench --data``.

It then prints the one device command: `magic-mm bench` of the InternVL3-2B shape at s = 1
and s = 2 in bf16, timed per candidate at batch 1 with CUDA synchronisation.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_pack.py [--photos 16]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
from pathlib import Path

from magic_mm.data.captions import read_captioned_images
from magic_mm.eval.bench import bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "flickr8k-1k"
TOKENIZER_FOLDER = "smollm2-135m-instruct-tokenizer"  # matched by bpe_tokenizer's smollm2-135m-instruct-* glob

DEVICE_COMMAND = (
    "export MAGIC_MM_CACHE={out}/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; nvidia-smi -L; "
    "python3 -m magic_mm.cli bench --archs internvl3-2b --compression '' --arch-compression none,bilinear:2 "
    "--arch-items 4 --arch-reps 3 --arch-batch 16 --data {out}/data --device cuda "
    "--save $OUT/bench_internvl3_2b.json 2>&1 | tee $OUT/bench.log"
)


def pack(out: Path, photos: int, data: Path) -> int:
    """Write the tokenizer and ``photos`` captioned photos under ``out``; the bytes written."""
    if out.exists():
        shutil.rmtree(out)
    bpe_tokenizer().save_pretrained(out / "cache" / TOKENIZER_FOLDER)
    items = read_captioned_images(data)[:photos]
    (out / "data" / "images").mkdir(parents=True)
    with (out / "data" / "captions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for item in items:
            shutil.copyfile(item.path, out / "data" / "images" / item.image)
            writer.writerows([item.image, caption] for caption in item.captions)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def exclude_from_git(out: Path) -> None:
    """Ignore ``out`` locally, so the device call sends it only when ``carry`` names it."""
    try:
        relative = out.resolve().relative_to(REPO)
    except ValueError:
        return  # outside the repo: nothing to ignore
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
    args = parser.parse_args()
    if args.photos < 1:
        parser.error("--photos: at least 1")
    size = pack(args.out, args.photos, args.data)
    exclude_from_git(args.out)
    try:
        carry = args.out.resolve().relative_to(REPO).as_posix()
    except ValueError:
        carry = str(args.out)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB): the tokenizer and {args.photos} photos")
    print(f"device run, from the repo root, with carry [{carry!r}] and timeout_s 600:")
    print(DEVICE_COMMAND.format(out=carry))


if __name__ == "__main__":
    main()
