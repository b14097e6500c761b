"""README.md stays true: its test command is the one CI runs, and its API example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next(line.split("#")[0].strip() for line in lines if line.startswith("python -m pytest"))


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n# tests[^\n]*\n(.*?)```", readme, re.S)
    assert block, "README.md must hold the test command in a ```bash block starting with '# tests'"
    assert _ci_test_command() in block.group(1).splitlines()


def test_readme_python_example_runs(minilm_dir):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["out"].last_hidden_state.shape[-1] == 384
