"""Usage errors as a user's shell meets them: the installed ``magic-mm`` script in a subprocess.

Every sub-command (walked from the app, so new ones are covered without editing this file)
gets an unknown option, a missing required parameter and a value that does not parse.
Each must exit 2 with click's short usage message, one ``Error:`` line naming the option,
and no traceback, whatever click the installed typer brings (typer 0.29 vendors its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer.main

from magic_mm.cli import app

SCRIPT = Path(sys.executable).with_name("magic-mm")


def leaf_commands(command, path=()):
    """(words, click command) for every runnable sub-command, e.g. (("train", "stage2"), cmd)."""
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from leaf_commands(sub, (*path, name))
    else:
        yield path, command


def is_number_option(param) -> bool:
    # Older typers hand click a click.INT/FLOAT; typer 0.29 keeps the Python annotation.
    click_type = getattr(getattr(param, "type", None), "name", None)
    descriptor = getattr(param, "type_descriptor", None)
    return bool(param.opts and param.opts[0].startswith("--")) and (
        click_type in ("integer", "float") or getattr(descriptor, "annotation", None) in (int, float)
    )


def cases():
    """(id, argv, words the single Error line must contain)."""
    for words, command in leaf_commands(typer.main.get_command(app)):
        name = " ".join(words)
        yield f"{name}: unknown option", [*words, "--no-such-option"], ["No such option: --no-such-option"]
        required = [p for p in command.params if p.required]
        if required:
            first = required[0]
            shown = first.opts[0] if first.opts and first.opts[0].startswith("-") else first.name
            yield f"{name}: missing {shown}", list(words), ["missing", shown]
        numbers = [p for p in command.params if is_number_option(p)]
        if numbers:
            option = numbers[0].opts[0]
            yield f"{name}: {option} abc", [*words, option, "abc"], ["Invalid value", option]


CASES = list(cases())


def run_script(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def results():
    # One subprocess per case; threads overlap their interpreter start-ups.
    with ThreadPoolExecutor(4) as pool:
        return dict(zip((c[0] for c in CASES), pool.map(run_script, (c[1] for c in CASES))))


def test_the_walk_finds_every_kind_of_case():
    ids = [c[0] for c in CASES]
    assert "index: unknown option" in ids and "train stage2: unknown option" in ids
    assert any(i.startswith("index: missing") for i in ids)
    assert any(i.startswith("train stage3: missing --config") for i in ids)
    assert "serve: --port abc" in ids


@pytest.mark.parametrize(("case", "argv", "words"), CASES, ids=[c[0] for c in CASES])
def test_usage_error_exits_2_with_one_error_line_and_no_traceback(results, case, argv, words):
    done = results[case]
    assert done.returncode == 2, (argv, done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = done.stderr.splitlines()
    assert lines[0].startswith("Usage: magic-mm " + " ".join(argv[: len(case.split(":")[0].split())]))
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr
    for word in words:  # case-blind: typer 0.29 writes an argument as 'paths', older ones 'PATHS'
        assert word.lower() in errors[0].lower(), (word, errors[0])


def test_close_misspelling_gets_a_suggestion():
    done = run_script(["index", "photos", "--db", "x.lance", "--prun"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "No such option: --prun" in done.stderr and "--prune" in done.stderr


def test_no_arguments_prints_help_not_a_traceback():
    done = run_script([])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Commands" in done.stdout + done.stderr
