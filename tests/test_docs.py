"""Docs that must stay matched to the code."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_usage_lists_every_option_as_the_code_defines_it():
    text = (ROOT / "docs" / "usage.md").read_text()
    table = _load_script("make_usage_table").table()
    assert table in text, "docs/usage.md is stale: run python scripts/make_usage_table.py --write"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command.*?```bash\n(.*?)\n```", readme, re.S)
    assert block and "pytest" in block.group(1)
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```bash\n", quickstart)) == 2  # exactly two commands
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
