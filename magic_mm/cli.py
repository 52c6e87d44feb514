"""The ``magic-mm`` command: one sub-command per job.

Mistakes a user can make raise ``UserError``; ``main`` prints those as one line
on stderr, without a traceback, and exits with status 2.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from magic_mm.cli_options import DeviceOpt, DtypeOpt, load_embedder
from magic_mm.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multimodal LLMs as fast universal embedders (text, images, image+text, pages).")
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'magic-mm-tiny', a saved folder, or an InternVL folder.")]
CompressionOpt = Annotated[
    str | None, typer.Option(help="Override compression: none, bilinear:2, avgpool:2, bilinear:7x7, ...")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        if width < 1 or height < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"--image-size {text!r}: write WIDTHxHEIGHT, e.g. 448x448") from None
    return width, height


@app.command()
def info(
    model: ModelOpt = "magic-mm-tiny",
    compression: CompressionOpt = None,
    image_size: Annotated[str, typer.Option(help="Image size WxH for the token counts.")] = "448x448",
    as_json: JsonOpt = False,
) -> None:
    """Show the model, its parts, dimensions and visual tokens per image."""
    embedder = load_embedder(model, compression)
    data = embedder.info(parse_size(image_size))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table(title=f"{data['model']} ({data['family']})", show_header=False)
    for part, desc in data["parts"].items():
        table.add_row(part, f"{desc['name']} · {desc['parameters']:,} parameters")
    table.add_row("lora", "none" if data["lora"] is None else f"rank {data['lora']['rank']}")
    table.add_row("trained parameters", f"{data['trained_parameters']:,}")
    table.add_row("embedding dim", str(data["embedding_dim"]))
    table.add_row("compression", data["compression"])
    width, height = data["image_size"]
    for name, count in data["visual_tokens"].items():
        table.add_row(f"visual tokens ({name})", f"{count} per {width}×{height} image ({data['tiles_per_image']} tile(s))")
    out.print(table)


@app.command()
def embed(
    files: Annotated[list[Path] | None, typer.Argument(help="Image files to embed.")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="Text(s); paired with FILES if as many.")] = None,
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .npy or .parquet file.")] = Path("embeddings.npy"),
    model: ModelOpt = "magic-mm-tiny",
    compression: CompressionOpt = None,
    role: Annotated[str, typer.Option(help="Prompt side: query or candidate.")] = "candidate",
    instruction: Annotated[str | None, typer.Option(help="Instruction; default from the model config.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    dim: Annotated[int | None, typer.Option(help="Keep the first DIM components (Matryoshka).")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Report and skip bad inputs instead of stopping.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Embed image files, texts, or image+text pairs into a .npy or .parquet file.

    Rows follow the inputs' order.  With --skip-bad a bad input is reported and
    left out, and the file records which input each row is, so rows never shift
    silently (the .npy gets a NAME.npy.json sidecar).
    """
    from magic_mm.model.inputs import MMInput

    files, texts = files or [], text or []
    if out_path.suffix not in (".npy", ".parquet"):
        raise UserError(f"--out {out_path}: use a .npy or .parquet file name")
    if files and texts and len(files) != len(texts):
        raise UserError(
            f"got {len(files)} files and {len(texts)} --text values; give as many texts as files "
            "to pair them, or embed them in separate runs"
        )
    if not files and not texts:
        raise UserError("nothing to embed; pass image files and/or --text")
    if files and texts:
        items = [MMInput(image=f, text=t, name=str(f)) for f, t in zip(files, texts)]
    elif files:
        items = [MMInput(image=f, name=str(f)) for f in files]
    else:
        items = [MMInput(text=t) for t in texts]

    embedder = load_embedder(model, compression, dtype=dtype, device=device)
    from magic_mm.progress import progress

    vectors, kept, skipped = [], [], []
    with progress(len(items), not quiet, "embedding") as advance:
        for start in range(0, len(items), batch_size):
            good = []
            for offset, item in enumerate(items[start : start + batch_size]):
                try:
                    good.append((item, embedder.prepare([item], start + offset)[0]))
                except UserError as exc:
                    if not skip_bad:
                        raise UserError(f"{exc} (pass --skip-bad to skip bad inputs)") from None
                    skipped.append({"input": item.describe(), "error": str(exc)})
            if good:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    vectors.append(embedder.encode([p for _, p in good], instruction=instruction, role=role,
                                                   batch_size=batch_size, dim=dim))
                for w in caught:
                    err.print(f"[yellow]warning:[/] {w.message}")
                kept.extend(good)
            advance(min(batch_size, len(items) - start))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim or embedder.embedding_dim), np.float32)
    rows = [{"input": item.describe(), "text": item.text,
             "image": str(item.image) if item.image is not None else None} for item, _ in kept]
    write_embeddings(out_path, matrix, rows, skipped, embedder)
    summary = {"out": str(out_path), "rows": len(rows), "dim": int(matrix.shape[1]), "skipped": skipped,
               "model": embedder.config.name, "compression": str(embedder.compression), **embedder.placement}
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        out.print(f"wrote {len(rows)} × {matrix.shape[1]} embeddings to {out_path}")
        for s in skipped:
            err.print(f"[yellow]skipped[/] {s['error']}")


def write_embeddings(path: Path, matrix: np.ndarray, rows: list[dict], skipped: list[dict], embedder: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": embedder.config.name, "compression": str(embedder.compression)}
    if path.suffix == ".npy":
        np.save(path, matrix)
        sidecar = path.with_name(path.name + ".json")
        sidecar.write_text(json.dumps({**meta, "rows": rows, "skipped": skipped}, indent=2))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "input": [r["input"] for r in rows],
        "image": [r["image"] for r in rows],
        "text": [r["text"] for r in rows],
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1]),
    })
    pq.write_table(table.replace_schema_metadata({k: str(v) for k, v in meta.items()}), path)


@app.command()
def demo(
    data: Annotated[Path, typer.Option(help="Image-caption folder (images/, captions.csv, splits.csv).")] = Path(
        "../shared/data/flickr8k-1k"),
    split: str = "val",
    queries: Annotated[int, typer.Option(min=1, help="Captions to show.")] = 5,
    k: Annotated[int, typer.Option(min=1, help="Images shown per caption.")] = 3,
    model: ModelOpt = "magic-mm-tiny",
    compression: CompressionOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Embed a split's images and captions, then show the best images for a few captions."""
    from magic_mm.data.captions import read_captioned_images

    items = read_captioned_images(data, split)
    embedder = load_embedder(model, compression, dtype=dtype, device=device)
    image_vecs = embedder.encode([i.path for i in items], role="candidate", batch_size=batch_size,
                                 show_progress=not as_json)
    captions = [(c, n) for n, i in enumerate(items) for c in i.captions]
    text_vecs = embedder.encode([c for c, _ in captions], role="query", batch_size=batch_size,
                                show_progress=not as_json)
    scores = embedder.similarity(text_vecs, image_vecs)
    owner = np.array([n for _, n in captions])
    order = np.argsort(-scores, axis=1, kind="stable")
    rank_of_truth = np.argmax(order == owner[:, None], axis=1)
    recall = {f"recall@{r}": float(np.mean(rank_of_truth < r)) for r in (1, 5, 10)}
    # One caption from each of the first `queries` images, so the examples differ.
    shown = [next(j for j, (_, n) in enumerate(captions) if n == i) for i in range(min(queries, len(items)))]
    examples = [{
        "caption": captions[j][0], "image": items[captions[j][1]].image,
        "top": [{"image": items[int(c)].image, "score": round(float(scores[j, c]), 4),
                 "match": int(c) == captions[j][1]} for c in order[j, :k]],
    } for j in shown]
    result = {"model": embedder.config.name, "compression": str(embedder.compression), **embedder.placement,
              "visual_tokens_per_image": embedder.backbone.visual_tokens(448, 448),
              "split": split, "images": len(items), "captions": len(captions),
              "text_to_image": recall, "examples": examples}
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for ex in examples:
        out.print(f"\n[bold]“{ex['caption']}”[/]  (its own image: {ex['image']})", highlight=False)
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column("image")
        table.add_column("score", justify="right")
        for rank, hit in enumerate(ex["top"], 1):
            table.add_row(str(rank), hit["image"] + (" ✓" if hit["match"] else ""), f"{hit['score']:.4f}")
        out.print(table)
    out.print(
        f"{result['model']} · compression {result['compression']} · "
        f"{result['visual_tokens_per_image']} visual tokens per image · "
        f"{len(captions)} {split} captions vs {len(items)} images: "
        + ", ".join(f"{name} {value:.1%}" for name, value in recall.items())
    )


from magic_mm.eval.commands import register as _register_eval  # noqa: E402  (eval, convert, bench)

_register_eval(app)
from magic_mm.train.commands import register as _register_train; _register_train(app)  # noqa: E402,E702  (train …)
from magic_mm.serve.commands import register as _register_serve; _register_serve(app)  # noqa: E402,E702  (index, search, serve)


def _usage_error_types() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(usage errors, aborts, exits) of every click the installed typer may raise.

    typer 0.29 vendors click as ``typer._click`` and raises that copy's classes, which are
    not subclasses of the ``click`` package's; older typers raise the ``click`` package's.
    """
    usage: list[type[Exception]] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # typer < 0.29
        pass
    else:
        usage.append(vendored.ClickException)
    return tuple(usage), (click.exceptions.Abort, typer.Abort), (click.exceptions.Exit, typer.Exit)


def main() -> None:
    usage_errors, aborts, exits = _usage_error_types()
    try:
        app(standalone_mode=False)
    except UserError as exc:
        # escape: messages quote user input and commands such as "pip install 'magic-mm[ray]'"
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except usage_errors as exc:
        exc.show()  # click's own "Usage: …  Error: No such option: --k (Possible options: --k1)"
        sys.exit(exc.exit_code)
    except aborts:
        err.print("aborted")
        sys.exit(130)
    except exits as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
