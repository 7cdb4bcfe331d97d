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
    from pyro_vae.registry import DATASETS, ENCODERS, ESTIMATORS, LIKELIHOODS, PRIORS

    # the package's own entries only: another test may have loaded a plugin into this process
    hidden = []
    for registry in (DATASETS, ENCODERS, ESTIMATORS, LIKELIHOODS, PRIORS):
        for name in [n for n in registry if registry.source(n) is not None]:
            hidden.append((registry, name, registry[name], registry.source(name)))
            dict.__delitem__(registry, name)
    try:
        table = _load_script("make_usage_table").table()
    finally:
        for registry, name, value, source in hidden:
            dict.__setitem__(registry, name, value)
            registry._sources[name] = source
    text = (ROOT / "docs" / "usage.md").read_text()
    assert table in text, "docs/usage.md is stale: run python scripts/make_usage_table.py --write"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- test-command.*?```bash\n(.*?)\n```", readme, re.S)
    assert block and "pytest" in block.group(1)
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"```bash\n", quickstart)) == 2  # exactly two commands
    assert "test-command" in (ROOT / ".ci" / "run").read_text()
