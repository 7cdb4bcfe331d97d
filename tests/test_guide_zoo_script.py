"""scripts/guide_zoo_check.py end to end, with tiny settings: both guides train from the CLI
through --plugin, the variance lab takes the generic path for them, and the library's log p(x)
and ELBO terms agree with the script's independent estimates within 3 standard errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "guide_zoo_check.py"
#: K = 1000 importance samples: the library's generic path draws whole blocks of 1024 per
#: image anyway, and with K this large the delta-method standard errors are reliable.
QUICK = ["--quick", "--num-images", "16", "--num-samples", "1000", "--particles", "100",
         "--draws", "20", "--measure-batch", "16"]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_guide_zoo_script_quick(tmp_path):
    out = tmp_path / "zoo"
    proc = run_script("--out", str(out), *QUICK)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "guide_zoo.json").read_text())
    assert set(result["guides"]) == {"laplace", "full-covariance"}
    assert result["all_checks_pass"], result["checks"]
    for guide, g in result["guides"].items():
        train = g["train"]
        assert train["returncode"] == 0
        assert "--plugin full_covariance" in train["command"]
        assert train["plugins_recorded"] == (["full_covariance"] if guide == "full-covariance"
                                             else [])
        assert any(p.startswith("training loss: generic") for p in train["paths"]), train
        # the library measured these guides through Pyro itself
        var = g["variance"]
        assert var["generic"]
        assert {p["path"] for p in var["library_paths"] + var["gradient_draws_paths"]} \
            == {"generic"}
        assert [e["library_path"] for e in var["estimators"].values()] == ["generic"] * 2
        # real statistical checks: library vs independent estimates, within 3 SE
        ll = g["log_likelihood"]
        assert ll["within_3se"] and ll["se"] > 0, ll
        assert ll["library_path"]["path"] == "generic"
        for term in ("reconstruction", "kl", "elbo"):
            assert g["elbo_terms"][term]["within_3se"], (guide, term, g["elbo_terms"][term])
        assert g["elbo_terms"]["kl_closed_form"] == (guide == "laplace")
        # reparametrized mean gradients: the library's and the script's point the same way
        assert var["estimators"]["reparam"]["mean_cosine"] > 0.8
    table = proc.stdout
    assert "log p(x), K = 1000" in table and "total time" in table
    # an existing guide_zoo.json is not replaced without --overwrite: one line, status 2
    proc = run_script("--out", str(out), *QUICK)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr
