"""README.md stays true: its test command is the one CI runs, with the pinned references, and its API example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next(line.split("#")[0].strip() for line in lines if line.startswith("python -m pytest"))


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n# tests[^\n]*\n(.*?)```", readme, re.S)
    assert block, "README.md must hold the test command in a ```bash block starting with '# tests'"
    assert _ci_test_command() in block.group(1).splitlines()


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_ci_and_readme_install_from_the_constraints_file():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n# tests[^\n]*\n(.*?)```", readme, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    for where, text in ((".ci/run", ci), ("README.md's test block", block)):
        export = text.find('export PIP_CONSTRAINT="$PWD/constraints.txt"')
        assert export != -1, f"{where} must export PIP_CONSTRAINT=$PWD/constraints.txt"
        assert export < text.find("pip install"), f"{where} must export PIP_CONSTRAINT before its first pip install"

    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt:{n}: {line!r} is not NAME==VERSION"
            pins[_requirement_name(name)] = version
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = project["build-system"]["requires"] + project["project"]["dependencies"]
    wanted += [spec for extra in project["project"]["optional-dependencies"].values() for spec in extra]
    unpinned = sorted({_requirement_name(spec) for spec in wanted} - set(pins))
    assert not unpinned, f"constraints.txt pins no version of {unpinned} (pyproject.toml asks for them)"
    assert pins["torch"] == "2.13.0", "constraints.txt must pin the CPU torch wheel on disk"
    for reference in ("transformers", "tokenizers", "datasets", "accelerate", "deepspeed", "triton", "kernels"):
        assert reference in pins, f"constraints.txt must pin the test reference {reference}"


def test_readme_python_example_runs(minilm_dir):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].last_hidden_state.shape[-1] == 384
