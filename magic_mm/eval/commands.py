"""CLI commands of the evaluation layer: ``eval``, ``convert …`` and ``bench``.

``convert captions|labels|caption-labels`` write MMEB *evaluation* tasks; ``convert
train-captions|train-labels|train-pdf|train-vqa`` write *training* sub-datasets (MMEB-train
layout) and ``convert imagenet-labels`` writes pseudo-labels for ``train-labels``.

Registered on the main app by ``register(app)`` (one line in ``magic_mm/cli.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from magic_mm.cli_options import DeviceOpt, DtypeOpt
from magic_mm.errors import UserError

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'magic-mm-tiny', a saved folder, or an InternVL folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

convert_app = typer.Typer(no_args_is_help=True, help=(
    "Turn datasets into MMEB-layout files: evaluation tasks (captions, labels, caption-labels) and "
    "training sub-datasets (train-captions, train-labels, train-pdf, train-vqa; see docs/converters.md)."))


def eval_command(
    tasks: Annotated[Path, typer.Option("--tasks", "-t", help="Tasks YAML (see tasks.yaml).")] = Path("tasks.yaml"),
    model: ModelOpt = "magic-mm-tiny",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for per-task JSON, summary.json, results.md.")] = Path("results"),
    compression: Annotated[str | None, typer.Option(help="Override the model's compression (none, bilinear:2, ...).")] = None,
    rerank: Annotated[bool, typer.Option("--rerank", help="Rerank each query's top 5 with magic_mm.MagicReranker.")] = False,
    mode: Annotated[str | None, typer.Option(help="Override every task's mode: local or global.")] = None,
    only: Annotated[list[str] | None, typer.Option("--task", help="Run only this task (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    ties: Annotated[str, typer.Option(help="Tie breaking: pessimistic, optimistic or index (MMEB's argmax).")] = "pessimistic",
    cache: Annotated[bool, typer.Option(help="Reuse and store embeddings in the per-model cache.")] = True,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache root (default: the magic-mm user cache).")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score a model on MMEB-layout tasks: hit@1 (MMEB), hit@k, recall@k, MRR, nDCG@5."""
    from magic_mm.eval.harness import EvalSettings, evaluate, markdown_table
    from magic_mm.eval.tasks import load_tasks

    specs = load_tasks(tasks, only, mode)
    settings = EvalSettings(model=model, compression=compression, batch_size=batch_size, cache_root=cache_dir,
                            use_cache=cache, ties=ties, rerank=rerank, show_progress=not (quiet or as_json),
                            dtype=dtype, device=device)  # type: ignore[arg-type]
    summary = evaluate(specs, settings, out_dir)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(markdown_table(summary))  # plain print: rich would re-wrap the Markdown lines
    out.print(f"embedded {summary['embedded_now']} new item(s); wrote {out_dir}/results.md, summary.json "
              f"and one JSON per task", highlight=False)


def _write_converted(converted: Any, out_path: Path) -> dict[str, Any]:
    """Write records with image paths made relative to the output file's folder, so the
    task file works without an ``image_root``."""
    from magic_mm.data.mmeb import write_task

    base = out_path.resolve().parent
    root = converted.image_root.resolve()

    def rel(name: str) -> str:
        return os.path.relpath(root / name, base) if name else ""

    records = [{**r, "qry_img_path": rel(r["qry_img_path"]), "tgt_img_path": [rel(p) for p in r["tgt_img_path"]]}
               for r in converted.records]
    write_task(records, out_path)
    return {"out": str(out_path), "rows": len(records),
            "candidates_per_query": len(records[0]["tgt_text"]) if records else 0}


def _report(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"wrote {summary['rows']} queries × {summary['candidates_per_query']} candidates to {summary['out']}",
              highlight=False)
    out.print(f"use it in a tasks YAML as:  - {{name: {Path(summary['out']).stem}, file: {summary['out']}}}",
              highlight=False)


@convert_app.command("captions")
def convert_captions(
    data: Annotated[Path, typer.Argument(help="Image–caption folder (images/, captions.csv, splits.csv).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl or .parquet task file.")],
    direction: Annotated[str, typer.Option(help="t2i (caption → image) or i2t (image → caption).")] = "t2i",
    split: Annotated[str | None, typer.Option(help="Split to convert (from splits.csv); default: all images.")] = "test",
    candidates: Annotated[int | None, typer.Option(help="Candidates per query, positives included; default: the whole split.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for drawing negatives.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Image–caption CSVs → a text→image or image→text retrieval task (MMEB layout)."""
    from magic_mm.data.convert import caption_task

    _report(_write_converted(caption_task(data, split, direction, candidates, seed), out_path), as_json)  # type: ignore[arg-type]


@convert_app.command("labels")
def convert_labels(
    csv_path: Annotated[Path, typer.Argument(help="CSV with columns image,label.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl or .parquet task file.")],
    image_root: Annotated[Path | None, typer.Option(help="Folder the image paths are relative to (default: the CSV's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """An image–label CSV → a classification task whose candidates are the label names."""
    from magic_mm.data.convert import label_task

    _report(_write_converted(label_task(csv_path, image_root), out_path), as_json)


@convert_app.command("caption-labels")
def convert_caption_labels(
    data: Annotated[Path, typer.Argument(help="Image–caption folder (images/, captions.csv, splits.csv).")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl or .parquet classification task.")],
    split: Annotated[str | None, typer.Option(help="Split to label (from splits.csv).")] = "test",
    min_agree: Annotated[int, typer.Option(help="Captions that must mention a label's keyword.")] = 3,
    min_photos: Annotated[int, typer.Option(help="Drop labels with fewer photos than this.")] = 5,
    labels_csv: Annotated[Path | None, typer.Option("--labels-csv", help="Also write the image,label CSV here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Object labels agreed on by a photo's captions → a classification task (labels: dog, child, man, ...)."""
    import tempfile

    from magic_mm.data.convert import label_task
    from magic_mm.data.labels_from_captions import labels_from_captions, write_label_csv

    result = labels_from_captions(data, split, min_agree, min_photos)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = write_label_csv(result, labels_csv if labels_csv is not None else Path(tmp) / "labels.csv")
        summary = _write_converted(label_task(csv_path, Path(data) / "images"), out_path)
    summary.update({"photos_per_label": result.counts, "majority_baseline": result.majority_baseline,
                    "dropped_ambiguous": result.ambiguous, "dropped_unlabelled": result.unlabelled,
                    "dropped_rare_labels": result.rare})
    if labels_csv is not None:
        summary["labels_csv"] = str(labels_csv)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    _report(summary, False)
    counts = ", ".join(f"{label} {n}" for label, n in result.counts.items())
    rare = ", ".join(f"{label} {n}" for label, n in result.rare.items()) or "none"
    out.print(f"photos per label: {counts}; majority baseline {100 * result.majority_baseline:.1f}% "
              f"(always '{next(iter(result.counts))}'); dropped {result.ambiguous} ambiguous, "
              f"{result.unlabelled} unlabelled, rare labels: {rare}", highlight=False)


# -- training sub-datasets (MMEB-train layout) ------------------------------------------------------

TrainOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output .jsonl or .parquet sub-dataset (MMEB-train layout).")]
NameOpt = Annotated[str | None, typer.Option("--name", help="Sub-dataset name in the suggested mixture entry (default: the file's stem).")]
ImageRootOpt = Annotated[Path | None, typer.Option("--image-root", help="Folder the CSV's image paths are relative to (default: the CSV's).")]


def _report_train(train_set: Any, out_path: Path, name: str | None, as_json: bool) -> None:
    """Write a converted training set and print what was written and its mixture entry."""
    from magic_mm.data.train_convert import mixture_entry
    from magic_mm.data.train_layout import write_rows

    write_rows(train_set.rows, out_path)
    entry = mixture_entry(name or out_path.stem, out_path, train_set)
    negatives = sum(1 for row in train_set.rows if row["neg_text"] or row["neg_image_path"])
    summary = {"out": str(out_path), "rows": len(train_set.rows), "rows_with_negative": negatives,
               "kind": train_set.kind, **train_set.notes, "mixture_entry": entry}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"wrote {summary['rows']} {train_set.kind} training pairs ({negatives} with a hard negative) to "
              f"{out_path}; image paths are relative to {train_set.image_root}", highlight=False)
    out.print("add it to a mixture's datasets: as\n  - " + json.dumps(entry, ensure_ascii=False), highlight=False, soft_wrap=True)


@convert_app.command("train-captions")
def convert_train_captions(
    data: Annotated[Path, typer.Argument(help="Image–caption folder (images/, captions.csv, optional splits.csv).")],
    out_path: TrainOutOpt,
    direction: Annotated[str, typer.Option(help="t2i (caption → image), i2t (image → caption) or t2t (caption → another caption of the photo).")] = "t2i",
    split: Annotated[str | None, typer.Option(help="Split to convert (from splits.csv); default: all images.")] = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Image–caption folder → training pairs, one per caption."""
    from magic_mm.data.train_convert import caption_pairs

    _report_train(caption_pairs(data, direction, split), out_path, name, as_json)


@convert_app.command("train-labels")
def convert_train_labels(
    csv_path: Annotated[Path, typer.Argument(help="CSV with columns image,label (optional score, ignored).")],
    out_path: TrainOutOpt,
    image_root: ImageRootOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for drawing each row's negative label.")] = 0,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Image–label CSV → classification pairs: image vs. its label text, another label as the negative."""
    from magic_mm.data.train_convert import label_pairs

    _report_train(label_pairs(csv_path, image_root, seed), out_path, name, as_json)


@convert_app.command("train-pdf")
def convert_train_pdf(
    csv_path: Annotated[Path, typer.Argument(help="CSV with columns pdf,page,query (page numbered from 1).")],
    out_path: TrainOutOpt,
    pdf_root: Annotated[Path | None, typer.Option("--pdf-root", help="Folder the CSV's PDF paths are relative to (default: the CSV's).")] = None,
    pages_dir: Annotated[Path | None, typer.Option("--pages-dir", help="Where the rendered pages go; the sub-dataset's image root (default: <out>-pages/).")] = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """PDF pages with queries → document retrieval pairs (each page rendered once to PNG)."""
    from magic_mm.data.train_convert import pdf_pairs

    pages = pages_dir if pages_dir is not None else out_path.with_name(out_path.stem + "-pages")
    _report_train(pdf_pairs(csv_path, pdf_root, pages), out_path, name, as_json)


@convert_app.command("train-vqa")
def convert_train_vqa(
    csv_path: Annotated[Path, typer.Argument(help="CSV with columns image,question,answer.")],
    out_path: TrainOutOpt,
    image_root: ImageRootOpt = None,
    name: NameOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Image + question + answer CSV → VQA pairs: image and question vs. the answer."""
    from magic_mm.data.train_convert import vqa_pairs

    _report_train(vqa_pairs(csv_path, image_root), out_path, name, as_json)


@convert_app.command("imagenet-labels")
def convert_imagenet_labels(
    data: Annotated[Path, typer.Argument(help="Image–caption folder (use --split) or a folder of images.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output image,label,score CSV (for train-labels).")],
    split: Annotated[str | None, typer.Option(help="Split to label, for an image–caption folder.")] = None,
    min_probability: Annotated[float, typer.Option(min=0.0, max=1.0, help="Keep images whose top-1 probability reaches this.")] = 0.3,
    as_json: JsonOpt = False,
) -> None:
    """Pseudo-labels from EfficientNet-Lite0's ImageNet head → an image,label,score CSV for train-labels."""
    import csv
    from collections import Counter

    from magic_mm.data.pseudo_labels import image_names, pseudo_labels

    names, root = image_names(data, split)
    labels = pseudo_labels(names, root, min_probability)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["image", "label", "score"])
        writer.writerows((p.image, p.label, f"{p.probability:.4f}") for p in labels)
    counts = Counter(p.label for p in labels)
    summary = {"out": str(out_path), "image_root": str(root), "images": len(names), "labelled": len(labels),
               "labels": len(counts), "most_common": counts.most_common(10)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    top = ", ".join(f"{label} {n}" for label, n in summary["most_common"])
    out.print(f"labelled {len(labels)} of {len(names)} images (top-1 probability >= {min_probability}) with "
              f"{len(counts)} ImageNet classes; wrote {out_path} (images under {root}); most common: {top}",
              highlight=False)


def bench_command(
    model: ModelOpt = "magic-mm-tiny",
    compression: Annotated[str, typer.Option(help="Comma-separated variants; ratios are against 'none'.")] = "none,bilinear:2,bilinear:4,avgpool:2",
    reps: Annotated[int, typer.Option(min=1, help="Interleaved repetitions per variant.")] = 5,
    items: Annotated[int, typer.Option(min=1, help="Queries and candidates timed per repetition (batch 1).")] = 4,
    batch: Annotated[int, typer.Option(min=0, help="Batch size for the throughput run (0: skip).")] = 8,
    archs: Annotated[str, typer.Option(help="Random-init architectures to time too: internvl3-1b, internvl3-2b, clip-vit-b32.")] = "",
    arch_compression: Annotated[str, typer.Option(help="Variants for the InternVL architectures.")] = "none,bilinear:2",
    arch_reps: Annotated[int, typer.Option(min=1, help="Repetitions for the random architectures.")] = 3,
    arch_items: Annotated[int, typer.Option(min=1, help="Inputs timed per repetition for the random architectures.")] = 1,
    arch_batch: Annotated[int, typer.Option(min=0, help="Throughput batch for the random architectures (0: skip).")] = 0,
    tasks: Annotated[Path | None, typer.Option("--tasks", help="Tasks YAML: add each variant's quality score.")] = None,
    data: Annotated[Path, typer.Option(help="Image–caption folder the timed inputs come from.")] = Path("../shared/data/flickr8k-1k"),
    memory: Annotated[bool, typer.Option(help="Measure peak memory (one fresh process per variant).")] = True,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice).")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")] = None,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the JSON result to this file.")] = None,
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Time compression variants (and random-init architectures): tokens, latency, throughput, memory."""
    from magic_mm.eval.bench import BenchSettings, run_bench

    def split(text: str) -> list[str]:
        return [p.strip() for p in text.split(",") if p.strip()]

    settings = BenchSettings(model=model, compressions=split(compression), reps=reps, items=items, batch=batch,
                             archs=split(archs), arch_compressions=split(arch_compression), arch_reps=arch_reps, arch_items=arch_items,
                             arch_batch=arch_batch, data=data, memory=memory, threads=threads, dtype=dtype,
                             device=device)
    if not settings.compressions and not settings.archs:
        raise UserError("--compression: give at least one variant, e.g. none,bilinear:2 (or only --archs)")
    if plot is not None and not settings.compressions:
        raise UserError("--plot needs the model's variants; give --compression")
    result = run_bench(settings, tasks, show_progress=not (quiet or as_json))
    if plot is not None:
        from magic_mm.eval.plot import bench_plot

        result["plot"] = str(bench_plot(result, plot))
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(result, indent=2))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    machine = result["machine"]
    where = f"{machine['device']}{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}, {machine['dtype']}"
    if result["model"] is not None:
        out.print(bench_table(f"{model} on {where} (ratios vs {result['model']['baseline']})", result["model"]))
        out.print(split_table(f"{model}: where a candidate's time goes", result["model"]))
    for arch, res in result["architectures"].items():
        out.print(bench_table(f"{arch}, random init, on {where} (ratios vs {res['baseline']})", res))
        if any(r.get("split") for r in res["variants"].values()):
            out.print(split_table(f"{arch}: where a candidate's time goes", res))
    if plot is not None:
        out.print(f"plot written to {plot}", highlight=False)


def bench_table(title: str, res: dict[str, Any]) -> Table:
    def ms(stats: dict[str, float] | None) -> str:
        return "—" if not stats else f"{stats['median']:.1f} / {stats['p95']:.1f}"

    def ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}×"

    rows = res["variants"]
    quality = any("quality" in r for r in rows.values())
    table = Table(title=title)
    for col in ["variant", "visual tokens", "LM seq (query/cand)", "query ms p50/p95", "cand ms p50/p95",
                f"cands/s @{res['batch']}", "peak RSS MiB", "tokens ×", "cand ms ×", "throughput ×", "memory ×"] + (
            ["quality"] if quality else []):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, r in rows.items():
        mem = r["memory"]["peak_mib"] if r.get("memory") else None
        thr = r["throughput_per_s"]["median"] if r.get("throughput_per_s") else None
        if r.get("skipped"):
            table.add_row(name, f"skipped: {r['skipped']}")
            continue
        cells = [name, str(r["visual_tokens"]), f"{r['query_seq_len']} / {r['candidate_seq_len']}",
                 ms(r["query_ms"]), ms(r["candidate_ms"]), "—" if thr is None else f"{thr:.2f}",
                 "—" if mem is None else f"{mem:.0f}", ratio(r["ratios"]["visual_tokens"]),
                 ratio(r["ratios"]["candidate_ms"]), ratio(r["ratios"]["throughput"]), ratio(r["ratios"]["peak_memory"])]
        if quality:
            cells.append(f"{100 * r['quality']['score']:.1f}" if "quality" in r else "—")
        table.add_row(*cells)
    return table


def split_table(title: str, res: dict[str, Any]) -> Table:
    """Vision encoder vs LM: ms per candidate, share, GFLOP and GFLOP/s against the matmul peak."""
    peak = res.get("peak_gflops_per_s") or {}
    table = Table(title=f"{title} (matmul peak GFLOP/s: "
                        + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()) + ")")
    for col in ("variant", "run", "ms / cand", "vision ms", "LM ms", "other ms", "vision GFLOP", "LM GFLOP",
                "vision GFLOP/s (of peak)", "LM GFLOP/s (of peak)"):
        table.add_column(col, justify="left" if col in ("variant", "run") else "right")

    def rate(part: dict[str, Any], name: str) -> str:
        value, share = part[f"{name}_gflops_per_s"], part[f"{name}_of_peak"]
        if value is None:
            return "—"
        return f"{value:.1f}" + ("" if share is None else f" ({share:.0%})")

    for name, row in res["variants"].items():
        split = row.get("split")
        if not split:
            continue
        for label, part in split.items():
            if not label.startswith("batch_"):
                continue
            table.add_row(name, f"{label.replace('_', ' ')} ({split['dtype']})", f"{part['total_ms']:.1f}",
                          f"{part['vision_ms']:.1f}", f"{part['lm_ms']:.1f}", f"{part['other_ms']:.1f}",
                          f"{part['vision_gflop']:.2f}", f"{part['lm_gflop']:.2f}", rate(part, "vision"),
                          rate(part, "lm"))
    return table


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.add_typer(convert_app, name="convert")
    app.command("bench")(bench_command)
