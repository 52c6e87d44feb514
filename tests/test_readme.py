"""The README's Python example runs as written (against the real default model)."""

import re
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.real_weights


def test_python_api_example_runs(monkeypatch, tmp_path, flickr_dir):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # The example uses paths relative to the repository root and writes ./my-model.
    code = code.replace('"../shared/', f'"{flickr_dir.parent.parent}/')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["cands"].shape == (2, 576)
    assert namespace["small"].shape == (1, 128)
    assert (Path(tmp_path) / "my-model" / "weights.safetensors").is_file()
