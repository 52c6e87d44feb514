"""``magic-mm train stage1|stage2|stage3|reranker --config cfg.yaml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(no_args_is_help=True, help="Train a stage of the recipe from a YAML config.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML training config.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config key, e.g. --set compression=none --set optim.lr=1e-4 (repeatable).")]
StopOpt = Annotated[int | None, typer.Option(
    "--stop-after", min=1, help="Stop after this global step (checkpoint saved); the same command resumes.")]


def trainer_for(stage: str, config_path: Path, quiet: bool = False, overrides: list[str] | None = None):  # noqa: ANN201
    from magic_mm.train.config import load_config, parse_overrides
    from magic_mm.train.registry import TRAINERS

    config = load_config(config_path, expect_stage=stage, overrides=parse_overrides(overrides or []))
    if quiet:
        config.show_progress = False
    return TRAINERS[stage](config)


def _run(stage: str, config: Path, as_json: bool, quiet: bool, stop_after: int | None, overrides: list[str] | None) -> None:
    from magic_mm.train import distributed
    from magic_mm.train.loop import LOG_FILE, StopTraining

    trainer = trainer_for(stage, config, quiet or as_json, overrides)
    try:
        folder: Path | None = trainer.run(stop_after=stop_after)
    except StopTraining:
        trainer.save_checkpoint()  # the step finished, so this is an exact resume point
        folder = None
    main = distributed.is_main()
    distributed.close()
    if not main:
        return  # one process reports (under torchrun every rank runs this command)
    log = trainer.out / LOG_FILE
    last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() and log.read_text().strip() else {}
    summary = {"stage": stage, "model": str(folder) if folder else None, "steps": trainer.step,
               "total_steps": trainer.total_steps, "finished": folder is not None, "last": last}
    if as_json:
        print(json.dumps(summary, indent=2))
    elif folder is None:
        typer.echo(f"{stage}: stopped after step {trainer.step} of {trainer.total_steps} (loss {last.get('loss')}); "
                   f"checkpoint in {trainer.out}; run the same command again to resume")
    else:
        typer.echo(f"{stage}: {trainer.step} steps, final loss {last.get('loss')}, model saved to {folder}")


@train_app.command("stage1")
def stage1(config: ConfigOpt, as_json: JsonOpt = False, quiet: QuietOpt = False, stop_after: StopOpt = None,
           overrides: SetOpt = None) -> None:
    """Generative restoration: next-token loss on answers (captions, text instructions)."""
    _run("stage1", config, as_json, quiet, stop_after, overrides)


@train_app.command("stage2")
def stage2(config: ConfigOpt, as_json: JsonOpt = False, quiet: QuietOpt = False, stop_after: StopOpt = None,
           overrides: SetOpt = None) -> None:
    """Contrastive InfoNCE: in-batch negatives, then global hard-negative mining."""
    _run("stage2", config, as_json, quiet, stop_after, overrides)


@train_app.command("stage3")
def stage3(config: ConfigOpt, as_json: JsonOpt = False, quiet: QuietOpt = False, stop_after: StopOpt = None,
           overrides: SetOpt = None) -> None:
    """Task-aware fine-tuning with judge-filtered hard negatives."""
    _run("stage3", config, as_json, quiet, stop_after, overrides)


@train_app.command("reranker")
def reranker(config: ConfigOpt, as_json: JsonOpt = False, quiet: QuietOpt = False, stop_after: StopOpt = None,
           overrides: SetOpt = None) -> None:
    """Train MagicReranker (pointwise yes/no + listwise index loss)."""
    _run("reranker", config, as_json, quiet, stop_after, overrides)


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
