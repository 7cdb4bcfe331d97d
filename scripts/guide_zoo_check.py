"""Train the Laplace and full-covariance guides from the CLI; check the library's numbers for them.

    python scripts/guide_zoo_check.py --out runs/guide-zoo [--epochs 5] [--quick]

For each guide family q(z|x) -- ``laplace`` (built in) and ``full-covariance`` (the plugin in
docs/examples/full_covariance.py) -- this script

1. trains a VAE with the command line, ``python -m pyro_vae --plugin full_covariance train
   --out OUT/<guide> --encoder <guide> --epochs E --latent-dim 16 --threads 1 --no-figures``
   (every other setting at its default; docs/examples on PYTHONPATH), and checks that the run's
   config.toml records the plugins its parts came from in ``[run] plugins``;
2. loads the run from Python (``pyro_vae.load_plugin`` + ``pyro_vae.load_run``) and compares, on
   the first N test images (binarized as in training), each library number with an estimate
   computed here from the guide's own distribution ``q = vae.encoder(x)`` with another seed:

   * log p(x): ``importance_log_likelihood`` against log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x),
     z_k ~ q, same K; the standard error of the difference is the larger of the one from both
     sides' per-image delta-method errors and the spread over images of the per-image
     differences (the delta method alone understates it for heavy-tailed weights);
   * ELBO terms: ``elbo_terms`` against E_q log p(x|z) and KL = E_q[log q(z|x) - log p(z)] from
     ``q.rsample``; standard errors from the per-image variances of the draws (a closed-form
     library KL has none);
   * gradient variance, on a fixed minibatch of B test images: ``measure_gradient_variance``
     for ``reparam`` and ``score`` against R draws of Pyro's own
     ``ESTIMATORS[name].make_elbo(cfg).loss_and_grads(vae.model, vae.guide, x)`` made here:
     trace of the encoder gradient's covariance, norm of its mean, and the cosine between the
     library's mean encoder gradient (``gradient_draws``) and this script's. The library must
     take its generic (Pyro per draw) path for these guides.

3. prints a table (library, independent, difference, standard error, within 3 SE?) and writes
   ``OUT/guide_zoo.json``. Existing outputs are replaced only with ``--overwrite``.

Exit status: 0 when every check passes (training, recorded plugins, generic paths, and the
log p(x) and ELBO-term comparisons within 3 standard errors); 1 when one fails; 2 for a usage
error. The variance verdicts are reported but do not decide the status: the score-function
estimator's squared gradient norms are heavy-tailed, so their standard errors are rough.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
PLUGIN = "full_covariance"
#: guide -> the plugins its run must record in config.toml's [run] plugins.
GUIDES = {"laplace": [], "full-covariance": [PLUGIN]}
ESTIMATOR_NAMES = ("reparam", "score")
RESULT_FILE = "guide_zoo.json"
#: Rows (samples x images) per step of this script's own sampling.
ROWS_PER_STEP = 8192
#: Quick settings (the test's): one epoch on 512 images with a 64-unit hidden layer.
QUICK_TRAIN = ["--train-limit", "512", "--hidden-dims", "64"]
#: Seed offset of the independent estimates, so that they never share noise with the library.
INDEPENDENT_SEED = 7919


def fail(message: str) -> int:
    print(f"guide_zoo_check: error: {message}", file=sys.stderr)
    return 2


# -- 1. training through the command line ---------------------------------------------------------
def train_command(args: argparse.Namespace, guide: str, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pyro_vae", "--plugin", PLUGIN, "--verbose", "train",
           "--out", str(run_dir), "--encoder", guide, "--epochs", str(args.epochs),
           "--latent-dim", str(args.latent_dim), "--threads", str(args.threads), "--no-figures",
           "--dataset", args.dataset]
    if args.quick:
        cmd += QUICK_TRAIN
    if args.overwrite:
        cmd.append("--overwrite")
    return cmd


def train_guide(args: argparse.Namespace, guide: str, run_dir: Path) -> dict[str, Any]:
    from pyro_vae import Config

    cmd = train_command(args, guide, run_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), str(ROOT)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"command": shlex.join(["python", *cmd[1:]]), "seconds": seconds,
                           "returncode": proc.returncode,
                           "paths": [line.split("path: ", 1)[1]
                                     for line in proc.stderr.splitlines()
                                     if line.startswith("pyro-vae: path: ")]}
    if proc.returncode != 0:
        out["stderr"] = proc.stderr[-2000:]
        return out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    last = metrics[-1] if metrics else {}
    out.update({"epochs": last.get("epoch"), "train_elbo": last.get("train_elbo"),
                "test_elbo": last.get("test_elbo")})
    recorded = list(Config.load(run_dir / "config.toml").run.plugins)
    out.update({"plugins_recorded": recorded, "plugins_expected": GUIDES[guide],
                "plugins_ok": recorded == GUIDES[guide]})
    return out


# -- 2a. log p(x) ---------------------------------------------------------------------------------
def compare(library: float, independent: float, se: float) -> dict[str, Any]:
    diff = library - independent
    return {"library": library, "independent": independent, "diff": diff, "se": se,
            "z": diff / se if se > 0 else (0.0 if diff == 0 else math.inf),
            "within_3se": bool(abs(diff) <= 3 * se)}


def _log_weights(vae: Any, x: torch.Tensor, z: torch.Tensor, q: Any) -> torch.Tensor:
    """log p(x|z) + log p(z) - log q(z|x), ``(K, images)``, from the distributions themselves."""
    return (vae.decoder(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)).double()


@torch.no_grad()
def independent_log_likelihood(vae: Any, x: torch.Tensor, k: int, seed: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image log (1/K) sum_k w_k with z_k ~ q(z|x), and delta-method standard errors."""
    estimates, stderrs = [], []
    step = max(1, ROWS_PER_STEP // k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for xb in x.split(step):
            q = vae.encoder(xb)
            lw = _log_weights(vae, xb, q.sample((k,)), q)                     # (K, b)
            lse1, lse2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
            estimates.append(lse1 - math.log(k))
            rel_var = torch.expm1(lse2 + math.log(k) - 2 * lse1).clamp_min(0) * k / (k - 1)
            stderrs.append((rel_var / k).sqrt())
    return torch.cat(estimates), torch.cat(stderrs)


def check_log_likelihood(vae: Any, x: torch.Tensor, k: int, seed: int) -> dict[str, Any]:
    from pyro_vae import importance_log_likelihood

    start = time.perf_counter()
    lib = importance_log_likelihood(vae, x, num_samples=k, seed=seed)
    lib_seconds = time.perf_counter() - start
    est, se = independent_log_likelihood(vae, x, k, seed + INDEPENDENT_SEED)
    n = x.shape[0]
    se_lib = float(lib.stderr.double().pow(2).sum().sqrt() / n)
    se_ind = float(se.pow(2).sum().sqrt() / n)
    delta = math.hypot(se_lib, se_ind)
    # The delta method understates the error of a K-sample log-mean-exp when the weights are
    # heavy-tailed (here by about 1.7x per image at K = 1000 after 5 epochs). Both estimates
    # have the same distribution when the library is right, so the spread over images of the
    # per-image differences gives the standard error of their mean without that assumption.
    d = lib.estimate.double() - est
    paired = float(d.std() / math.sqrt(n)) if n > 1 else math.nan
    out = compare(lib.mean(), float(est.mean()), max(delta, paired) if n > 1 else delta)
    out.update({"num_samples": k, "library_se": se_lib, "independent_se": se_ind,
                "delta_method_se": delta, "paired_se": paired,
                "library_path": lib.path.as_dict() if lib.path is not None else None,
                "library_seconds": lib_seconds})
    return out


# -- 2b. ELBO terms -------------------------------------------------------------------------------
@torch.no_grad()
def independent_elbo_terms(vae: Any, x: torch.Tensor, p: int, seed: int) -> dict[str, torch.Tensor]:
    """Per-image means and variances over ``p`` draws z ~ q(z|x) (rsample) of log p(x|z),
    log q(z|x) - log p(z) and their difference (the ELBO's integrand)."""
    parts: dict[str, list[torch.Tensor]] = {}
    step = max(1, ROWS_PER_STEP // p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for xb in x.split(step):
            q = vae.encoder(xb)
            z = q.rsample((p,))                                                  # (P, b, D)
            recon = vae.decoder(z).log_prob(xb).double()
            kl = (q.log_prob(z) - vae.prior().log_prob(z)).double()
            for name, v in (("reconstruction", recon), ("kl", kl), ("elbo", recon - kl)):
                parts.setdefault(name, []).append(v.mean(0))
                parts.setdefault(name + "_var", []).append(v.var(0))
    return {k: torch.cat(v) for k, v in parts.items()}


def check_elbo_terms(vae: Any, x: torch.Tensor, p: int, seed: int) -> dict[str, Any]:
    from pyro_vae import elbo_terms

    lib = elbo_terms(vae, x, batch_size=max(1, ROWS_PER_STEP // p), num_particles=p, seed=seed)
    ind = independent_elbo_terms(vae, x, p, seed + INDEPENDENT_SEED)
    n = x.shape[0]

    def se(var: torch.Tensor) -> float:  # of a mean over images of per-image means of p draws
        return float((var.sum() / p).sqrt() / n)

    # The library's terms have the same distribution as ours when it is right, so the variances
    # of our draws give its Monte Carlo error too; a closed-form KL has none.
    se_lib = {"reconstruction": se(ind["reconstruction_var"]),
              "kl": 0.0 if lib.kl_closed_form else se(ind["kl_var"]),
              "elbo": se(ind["reconstruction_var"] if lib.kl_closed_form else ind["elbo_var"])}
    values = {"reconstruction": lib.reconstruction, "kl": lib.kl, "elbo": lib.elbo}
    out: dict[str, Any] = {"num_particles": p, "kl_closed_form": lib.kl_closed_form}
    for name, value in values.items():
        se_ind = se(ind[name + "_var"])
        out[name] = compare(float(value.double().mean()), float(ind[name].mean()),
                            math.hypot(se_lib[name], se_ind))
        out[name].update({"library_se": se_lib[name], "independent_se": se_ind})
    return out


# -- 2c. gradient variance ------------------------------------------------------------------------
class _Accumulator:
    """Mean and trace of the covariance of flattened gradient draws, in float64, shifted by the
    mean of the first ``pilot`` draws; keeps the per-draw squared deviations for a standard
    error of the trace."""

    def __init__(self, pilot: int):
        self.pilot = pilot
        self.pending: list[torch.Tensor] = []
        self.reference: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.sq: list[float] = []

    def add(self, g: torch.Tensor) -> None:
        if self.reference is None:
            self.pending.append(g.double())
            if len(self.pending) == self.pilot:
                self._start()
            return
        d = g.double() - self.reference
        self.total += d
        self.sq.append(float(d @ d))

    def _start(self) -> None:
        self.reference = torch.stack(self.pending).mean(0)
        self.total = torch.zeros_like(self.reference)
        pending, self.pending = self.pending, []
        for g in pending:
            self.add(g)

    def summary(self) -> dict[str, Any]:
        if self.reference is None:
            self._start()
        r = len(self.sq)
        shift = self.total / r
        mean = self.reference + shift
        sq = torch.tensor(self.sq, dtype=torch.float64)
        trace = float((sq.sum() - r * (shift @ shift)) / (r - 1))
        trace_se = float(sq.std() / math.sqrt(r) * r / (r - 1))
        return {"mean": mean, "trace": trace, "trace_se": trace_se,
                "mean_norm": float(mean.norm()), "num_draws": r}


def _encoder_names(vae: Any) -> list[str]:
    from pyro_vae.lab.variance import measured_parameters

    return [k for k in measured_parameters(vae) if k.split(".", 1)[0] == "encoder"]


def independent_draws(vae: Any, name: str, x: torch.Tensor, r: int, seed: int
                      ) -> dict[str, Any]:
    """R gradient draws of Pyro's own ELBO for estimator ``name``, one ``loss_and_grads`` each;
    the per-image encoder gradient (surrogate gradient / batch size)."""
    from pyro_vae import ESTIMATORS, Config

    estimator = ESTIMATORS[name]
    cfg = Config()
    cfg.train.num_particles = 1
    elbo = estimator.make_elbo(cfg)
    params = dict(vae.named_parameters())
    names = _encoder_names(vae)
    acc = _Accumulator(pilot=min(20, r))
    old = vae.estimator
    vae.estimator = estimator
    pyro.clear_param_store()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(r):
                vae.zero_grad(set_to_none=True)
                elbo.loss_and_grads(vae.model, vae.guide, x)
                acc.add(torch.cat([(params[k].grad if params[k].grad is not None
                                    else torch.zeros_like(params[k])).detach().reshape(-1)
                                   for k in names]) / x.shape[0])
    finally:
        vae.estimator = old
        vae.zero_grad(set_to_none=True)
        pyro.clear_param_store()
    return acc.summary()


def library_mean_gradient(vae: Any, name: str, x: torch.Tensor, r: int, seed: int
                          ) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """The mean encoder gradient over R draws of the library's ``gradient_draws``."""
    from pyro_vae.lab.variance import gradient_draws

    names = _encoder_names(vae)
    paths: list[Any] = []
    total, count = None, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for g in gradient_draws(vae, name, x, r, paths=paths):
            flat = torch.cat([g[k].detach().reshape(g[k].shape[0], -1) for k in names], 1)
            total = flat.double().sum(0) if total is None else total + flat.double().sum(0)
            count += flat.shape[0]
    return total / count, [p.as_dict() for p in paths]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / max(float(a.norm() * b.norm()), 1e-300))


def check_variance(vae: Any, x: torch.Tensor, r: int, seed: int) -> dict[str, Any]:
    from pyro_vae import measure_gradient_variance
    from pyro_vae.inference.accelerators import GENERIC

    start = time.perf_counter()
    lib = measure_gradient_variance(vae, x, list(ESTIMATOR_NAMES), num_draws=r, oracle_draws=r,
                                    seed=seed)
    lib_seconds = time.perf_counter() - start
    out: dict[str, Any] = {"batch_size": int(x.shape[0]), "num_draws": r,
                           "library_paths": lib["paths"], "library_seconds": lib_seconds,
                           "estimators": {}}
    draw_paths = []
    for i, name in enumerate(ESTIMATOR_NAMES):
        res = lib["estimators"][name]
        enc = res["groups"]["encoder"]
        start = time.perf_counter()
        ind = independent_draws(vae, name, x, r, seed + INDEPENDENT_SEED + i)
        ind_seconds = time.perf_counter() - start
        lib_mean, paths = library_mean_gradient(vae, name, x, r, seed + 2 * INDEPENDENT_SEED + i)
        draw_paths += paths
        lo, hi = enc["trace_ci"]
        se_lib = (hi - lo) / (2 * 1.959964)
        trace = compare(enc["trace"], ind["trace"], math.hypot(se_lib, ind["trace_se"]))
        trace.update({"library_ci": [lo, hi], "library_se": se_lib,
                      "independent_se": ind["trace_se"],
                      "ratio": enc["trace"] / max(ind["trace"], 1e-300)})
        # With R draws each mean is off the true one by noise of squared norm ~ trace / R; the
        # cosine between two such means is then about sqrt(m2 / (m2 + t1/R) * m2 / (m2 + t2/R)).
        m2 = max(float(ind["mean"] @ ind["mean"]) - ind["trace"] / r, 0.0)
        expected = math.sqrt(m2 / (m2 + enc["trace"] / r) * m2 / (m2 + ind["trace"] / r)) \
            if m2 > 0 else 0.0
        out["estimators"][name] = {
            "library_path": res["path"],
            "trace": trace,
            "mean_norm": {"library": enc["mean_norm"], "independent": ind["mean_norm"],
                          "library_gradient_draws": float(lib_mean.norm())},
            "library_snr": enc["snr"], "library_cosine_to_oracle": enc["cosine"],
            "mean_cosine": _cosine(lib_mean, ind["mean"]),
            "expected_cosine": expected,
            "independent_seconds": ind_seconds,
        }
    out["gradient_draws_paths"] = draw_paths
    everything = lib["paths"] + draw_paths
    out["generic"] = bool(everything) and all(p["path"] == GENERIC for p in everything) and all(
        e["library_path"] == GENERIC for e in out["estimators"].values())
    return out


# -- one guide ------------------------------------------------------------------------------------
def measure_guide(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    import pyro_vae
    from pyro_vae.app.commands import run_split

    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    pyro_vae.load_plugin(PLUGIN)
    cfg, vae, state = pyro_vae.load_run(run_dir)
    images, _ = run_split(cfg, "test", max(args.num_images, args.measure_batch),
                          tuple(state["image_shape"]))
    x, xb = images[:args.num_images], images[:args.measure_batch]
    out: dict[str, Any] = {"guide_family_class": cfg.run.guide_family_class}
    timings = {}
    for key, fn in (("log_likelihood", lambda: check_log_likelihood(vae, x, args.num_samples,
                                                                     args.seed)),
                    ("elbo_terms", lambda: check_elbo_terms(vae, x, args.particles, args.seed)),
                    ("variance", lambda: check_variance(vae, xb, args.draws, args.seed))):
        start = time.perf_counter()
        out[key] = fn()
        timings[key] = time.perf_counter() - start
    out["seconds"] = timings
    return out


# -- report ---------------------------------------------------------------------------------------
def checks_of(result: dict[str, Any]) -> dict[str, bool]:
    """Every check that decides the exit status, by name."""
    checks = {}
    for guide, g in result["guides"].items():
        t = g["train"]
        checks[f"{guide}: trained from the CLI"] = t["returncode"] == 0
        if t["returncode"] != 0:
            continue
        checks[f"{guide}: config.toml [run] plugins = {t['plugins_expected']}"] = t["plugins_ok"]
        checks[f"{guide}: variance lab took the generic path"] = g["variance"]["generic"]
        checks[f"{guide}: log p(x) within 3 SE"] = g["log_likelihood"]["within_3se"]
        for term in ("reconstruction", "kl", "elbo"):
            checks[f"{guide}: ELBO term {term} within 3 SE"] = g["elbo_terms"][term]["within_3se"]
    return checks


def _num(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e4 or (0 < abs(v) < 1e-2) else f"{v:.3f}"


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    head = (f"{'guide':<16}{'quantity':<30}{'library':>12}{'independent':>13}{'diff':>11}"
            f"{'SE':>10}  within 3 SE")
    lines = [f"nats/image on {s['num_images']} {s['dataset']} test images (log p(x): K = "
             f"{s['num_samples']}; ELBO terms: {s['particles']} draws per image); encoder "
             f"gradients on {s['measure_batch']} images, R = {s['draws']} draws", "",
             head, "-" * len(head)]
    for guide, g in result["guides"].items():
        if g["train"]["returncode"] != 0:
            lines.append(f"{guide:<16}training failed (status {g['train']['returncode']})")
            continue
        ll, et, var = g["log_likelihood"], g["elbo_terms"], g["variance"]
        kl_name = "KL (closed form)" if et["kl_closed_form"] else "KL (Monte Carlo)"
        rows = [(f"log p(x), K = {ll['num_samples']}", ll),
                ("ELBO", et["elbo"]), ("  E_q log p(x|z)", et["reconstruction"]),
                (f"  {kl_name}", et["kl"])]
        rows += [(f"enc. tr Cov, {name}", e["trace"]) for name, e in var["estimators"].items()]
        for i, (label, c) in enumerate(rows):
            lines.append(f"{guide if i == 0 else '':<16}{label:<30}{_num(c['library']):>12}"
                         f"{_num(c['independent']):>13}{_num(c['diff']):>11}{_num(c['se']):>10}"
                         f"  {'yes' if c['within_3se'] else 'NO'}")
    lines.append("log p(x) SE: the larger of the delta-method one ("
                 + ", ".join(f"{guide} {_num(g['log_likelihood']['delta_method_se'])}"
                             for guide, g in result["guides"].items() if "log_likelihood" in g)
                 + ") and the paired one over images; tr Cov SE: the library's bootstrap "
                 "interval and the spread of the script's per-draw squared deviations")
    lines += ["", f"{'guide':<16}{'estimator':<10}{'lib. path':<10}{'tr ratio':>9}  "
              f"{'library tr Cov 95% CI':<24}{'|E g| lib':>10}{'|E g| ind':>10}"
              f"{'cos(lib, ind)':>14}{'expected':>9}"]
    for guide, g in result["guides"].items():
        if g["train"]["returncode"] != 0:
            continue
        for i, (name, e) in enumerate(g["variance"]["estimators"].items()):
            ci = e["trace"]["library_ci"]
            lines.append(f"{guide if i == 0 else '':<16}{name:<10}{e['library_path']:<10}"
                         f"{e['trace']['ratio']:>9.3f}  "
                         f"{'[' + _num(ci[0]) + ', ' + _num(ci[1]) + ']':<24}"
                         f"{_num(e['mean_norm']['library']):>10}"
                         f"{_num(e['mean_norm']['independent']):>10}"
                         f"{e['mean_cosine']:>14.3f}{e['expected_cosine']:>9.3f}")
    lines += ["", "training (CLI):"]
    for guide, g in result["guides"].items():
        t = g["train"]
        if t["returncode"] == 0:
            lines.append(f"  {guide}: {t['epochs']} epoch(s) in {t['seconds']:.1f} s, test ELBO "
                         f"{t['test_elbo']:.2f}; [run] plugins = {t['plugins_recorded']}; "
                         f"{'; '.join(t['paths']) or 'no path reported'}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs") / "guide-zoo",
                   help="folder for the runs (OUT/<guide>) and guide_zoo.json "
                   "[default: runs/guide-zoo]")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs [default: 5; 1 with --quick]")
    p.add_argument("--quick", action="store_true",
                   help="tiny training for tests: 1 epoch on 512 images, hidden layer of 64")
    p.add_argument("--dataset", default="mnist-5k", help="[default: mnist-5k, embedded]")
    p.add_argument("--latent-dim", type=int, default=16, help="[default: 16]")
    p.add_argument("--num-images", type=int, default=200,
                   help="test images N for log p(x) and the ELBO terms [default: 200]")
    p.add_argument("--num-samples", type=int, default=1000,
                   help="importance samples K per image [default: 1000]")
    p.add_argument("--particles", type=int, default=100,
                   help="z draws per image for the ELBO terms, each side [default: 100]")
    p.add_argument("--draws", type=int, default=200,
                   help="gradient draws R per estimator, each side; also the oracle's "
                   "[default: 200]")
    p.add_argument("--measure-batch", type=int, default=32,
                   help="size B of the fixed minibatch of the gradient draws [default: 32]")
    p.add_argument("--seed", type=int, default=0, help="seed of the measurements [default: 0]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default: 1]")
    p.add_argument("--overwrite", action="store_true",
                   help="replace guide_zoo.json and the runs in --out")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for flag, value, least in (("--epochs", args.epochs, 1), ("--num-images", args.num_images, 1),
                               ("--num-samples", args.num_samples, 2),
                               ("--particles", args.particles, 2), ("--draws", args.draws, 2),
                               ("--measure-batch", args.measure_batch, 1),
                               ("--latent-dim", args.latent_dim, 1),
                               ("--threads", args.threads, 1)):
        if value < least:
            return fail(f"{flag} must be >= {least}, got {value}")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        return fail(f"{out} exists and is not a folder")
    if (out / RESULT_FILE).exists() and not args.overwrite:
        return fail(f"{out / RESULT_FILE} already exists; pass --overwrite to replace it or "
                    f"choose another --out")
    taken = [out / g for g in GUIDES if (out / g).is_dir() and any((out / g).iterdir())]
    if taken and not args.overwrite:
        return fail(f"{taken[0]} is not empty; pass --overwrite to replace the run there or "
                    f"choose another --out")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/guide_zoo_check.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result: dict[str, Any] = {"command": command.strip(), "settings": settings, "guides": {}}
    from pyro_vae.errors import PyroVAEError

    for guide in GUIDES:
        run_dir = out / guide
        print(f"{guide}: training from the CLI ({args.epochs} epoch(s))...", file=sys.stderr,
              flush=True)
        entry: dict[str, Any] = {"run_dir": str(run_dir), "train": train_guide(args, guide,
                                                                               run_dir)}
        result["guides"][guide] = entry
        if entry["train"]["returncode"] != 0:
            print(f"{guide}: training failed:\n{entry['train']['stderr']}", file=sys.stderr)
            continue
        print(f"{guide}: measuring...", file=sys.stderr, flush=True)
        try:
            entry.update(measure_guide(args, run_dir))
        except PyroVAEError as e:
            return fail(f"{guide}: {e}")
    checks = checks_of(result)
    result["checks"] = checks
    result["all_checks_pass"] = all(checks.values())
    result["seconds"] = time.perf_counter() - start
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    print(format_table(result))
    failed = [name for name, ok in checks.items() if not ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks pass"
          + (": FAILED " + "; ".join(failed) if failed else ""))
    print(f"total time {result['seconds']:.1f} s; wrote {out / RESULT_FILE}")
    return 0 if not failed else 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


if __name__ == "__main__":
    sys.exit(main())
