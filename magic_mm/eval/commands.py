"""CLI commands of the evaluation layer: ``eval``, ``convert captions|labels`` and ``bench``.

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

from magic_mm.errors import UserError

out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'magic-mm-tiny', a saved folder, or an InternVL folder.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]

convert_app = typer.Typer(no_args_is_help=True, help="Turn datasets into MMEB-layout task files.")


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
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Score a model on MMEB-layout tasks: hit@1 (MMEB), hit@k, recall@k, MRR, nDCG@5."""
    from magic_mm.eval.harness import EvalSettings, evaluate, markdown_table
    from magic_mm.eval.tasks import load_tasks

    specs = load_tasks(tasks, only, mode)
    settings = EvalSettings(model=model, compression=compression, batch_size=batch_size, cache_root=cache_dir,
                            use_cache=cache, ties=ties, rerank=rerank, show_progress=not (quiet or as_json))  # type: ignore[arg-type]
    summary = evaluate(specs, settings, out_dir)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    out.print(markdown_table(summary), highlight=False)
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


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.add_typer(convert_app, name="convert")
