"""GPU readiness check: the CUDA tests, the epoch benchmark, log p(x) and the variance lab.

    python scripts/gpu_check.py --out gpu_check.json          # on a GPU machine, ~3-5 minutes
    python scripts/gpu_check.py --device cpu --quick          # tiny sizes, any machine, ~30 s

Four steps, each timed and each in its own try/except, so that one failure shows in the table
and does not hide the rest:

1. ``cuda-tests``: ``pytest -q -p no:cacheprovider tests/test_cuda.py`` in a subprocess
   (passed / failed / skipped / xfailed counts; without CUDA every test skips);
2. ``epoch-benchmark``: pyro_vae's ``Trainer`` (784-400-50, batch 256, float32, and bf16 on
   cuda) against the plain PyTorch VAE of ``scripts/benchmark.py`` on the same device, one
   warm-up epoch then ``--epochs`` timed epochs of each, interleaved; full Fashion-MNIST when
   it loads, else the embedded mnist-5k (the table says which). Seconds per epoch (median)
   and the ratio pyro_vae / plain;
3. ``log-likelihood``: ``importance_log_likelihood``, K = 5000 on 1,000 test images, of the
   model trained in step 2 (images/s and the estimate);
4. ``variance-lab``: ``measure_gradient_variance`` of reparam, score and score-avg-baseline at
   the trained weights on a fixed minibatch of 256, R = 1000 draws; seconds and the encoder
   variance ratio score / reparam.

Prints one Markdown table at the end (paste it into docs/performance.md) and, with ``--out``,
writes the same as JSON. Exit status 0 when every step ran (skipped tests count as run), 1
otherwise, 2 when ``--device cuda`` is asked for and torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # benchmark.py: the plain PyTorch reference
sys.path.insert(1, str(ROOT))  # the package, also when it is not installed

STEPS = ("cuda-tests", "epoch-benchmark", "log-likelihood", "variance-lab")
ESTIMATORS = ("reparam", "score", "score-avg-baseline")
_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line, with the seconds since the check started."""
    print(f"[gpu_check {time.perf_counter() - _START:6.1f} s] {message}", flush=True)


@dataclass
class StepResult:
    step: str
    ok: bool
    result: str
    seconds: float
    notes: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class StepFailed(Exception):
    """A step that ran to its end but found a failure (e.g. a failing test)."""

    def __init__(self, result: str, notes: str = "", data: dict[str, Any] | None = None):
        super().__init__(result)
        self.result, self.notes, self.data = result, notes, data or {}


class Check:
    """The state shared by the steps: device, data, the model trained in the benchmark."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.raw = None  # the dataset, grey levels
        self.data_cfg = None
        self.data_notes: list[str] = []
        self.trainer = None  # pyro_vae's float32 trainer of the benchmark, once trained

    # -- helpers --------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        cpu = platform.processor() or platform.machine()
        return f"{cpu} CPU, {torch.get_num_threads()} threads"

    def load_data(self):
        """Full Fashion-MNIST if it loads here (quick: never), else the embedded mnist-5k."""
        if self.raw is not None:
            return self.raw
        from pyro_vae import load_dataset
        from pyro_vae.config import DataConfig
        from pyro_vae.errors import PyroVAEError

        args = self.args
        if args.dataset == "auto":
            names = ["mnist-5k"] if args.quick else ["fashion-mnist", "mnist-5k"]
        else:
            names = [args.dataset]
        for name in names:
            cfg = DataConfig(dataset=name, train_limit=args.train_limit,
                             data_dir=args.data_dir if name != "mnist-5k" else "")
            log(f"loading {name}" + (f" (first {args.train_limit} training images)"
                                     if args.train_limit else ""))
            try:
                with _socket_timeout(15):  # torchvision may try to download it
                    self.raw = load_dataset(cfg)
            except PyroVAEError as e:
                if name == names[-1]:
                    raise
                self.data_notes.append(f"{name} not available ({_short(e, 90)})")
                log(f"  {name} not available: {_short(e, 200)}")
                continue
            self.data_cfg = cfg
            return self.raw
        raise AssertionError("unreachable")

    def config(self, precision: str = "float32"):
        from pyro_vae import Config

        cfg = Config()
        cfg.data = self.data_cfg
        cfg.train.batch_size = self.args.batch_size
        cfg.train.seed = self.args.seed
        cfg.train.progress = False
        cfg.train.device = self.args.device
        cfg.train.precision = precision
        return cfg.validate()

    def measurement_model(self) -> tuple[Any, torch.Tensor, str]:
        """(vae, binarized test images on the device, note): the benchmark's trained model, or
        a freshly initialised one when the benchmark did not get that far."""
        if self.trainer is not None:
            return self.trainer.vae, self.trainer.dataset.test.images, ""
        from pyro_vae import VAE
        from pyro_vae.data import prepare_observations

        raw = self.load_data()
        cfg = self.config()
        torch.manual_seed(self.args.seed)
        vae = VAE.from_config(cfg, raw.image_shape).to(self.device)
        test = prepare_observations(raw, cfg.data, seed=self.args.seed).test.images
        return vae, test.to(self.device), "untrained weights (the benchmark did not train)"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _short(e: BaseException | str, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- step 1: the CUDA tests --------------------------------------------------------------------
_COUNT = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)")


def step_cuda_tests(check: Check) -> tuple[str, str, dict[str, Any]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEsxX",
           "tests/test_cuda.py"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log("running " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=check.args.test_timeout)
    output = proc.stdout + proc.stderr
    for line in output.strip().splitlines():
        print(f"    {line}", flush=True)
    summary = next((line for line in reversed(output.splitlines()) if _COUNT.search(line)), "")
    counts: dict[str, int] = {}
    for number, kind in _COUNT.findall(summary):
        counts["errors" if kind.startswith("error") else kind] = int(number)
    result = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"pytest exit {proc.returncode}"
    reasons = sorted({line.rsplit(": ", 1)[-1] for line in output.splitlines()
                      if line.startswith("SKIPPED")})
    special = [line.split(" - ")[0].replace("tests/test_cuda.py::", "")
               for line in output.splitlines() if line.startswith(("FAILED", "ERROR", "XFAIL"))]
    notes = "; ".join([*(f"skipped: {r}" for r in reasons), *special])
    data = {"counts": counts, "returncode": proc.returncode, "command": " ".join(cmd[1:])}
    if proc.returncode != 0 or counts.get("failed") or counts.get("errors"):
        raise StepFailed(result, notes, data)
    return result, notes, data


# -- step 2: the epoch benchmark ---------------------------------------------------------------
def step_epoch_benchmark(check: Check) -> tuple[str, str, dict[str, Any]]:
    from benchmark import plain_trainer

    from pyro_vae.data import binarize_batch
    from pyro_vae.metrics import elbo_per_image
    from pyro_vae.training.trainer import Trainer, epoch_order

    args, device = check.args, check.device
    raw = check.load_data()
    precisions = ["float32", "bf16"] if device.type == "cuda" else ["float32"]
    trainers = {}
    for precision in precisions:
        log(f"building pyro_vae's Trainer ({precision}, device {args.device})")
        trainers[f"pyro_vae-{precision}"] = Trainer(check.config(precision), raw)
    first = trainers["pyro_vae-float32"]
    train, test = first.dataset.train.images, first.dataset.test.images  # on the device
    n, batch = len(train), args.batch_size
    steps: dict[str, Callable[[torch.Tensor], Any]] = {k: t.step for k, t in trainers.items()}
    plain_elbo = {}
    for precision in precisions:
        torch.manual_seed(args.seed)
        steps[f"plain-{precision}"], plain_elbo[precision] = plain_trainer(
            n, precision == "bf16", device)
    hidden = "-".join(str(h) for h in first.cfg.model.hidden_dims)
    shape = f"784-{hidden}-{first.cfg.model.latent_dim}"
    log(f"{raw.name}: {n} training images, {shape}, batch {batch}, {n // batch} steps per "
        f"epoch, 1 warm-up + {args.epochs} timed epochs of each of {', '.join(steps)}")
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for epoch in range(args.epochs + 1):
        order = epoch_order(n, args.seed, epoch).to(device)
        line = []
        for name, step in steps.items():
            check.sync()
            start = time.perf_counter()
            for b in range(n // batch):
                step(binarize_batch(train[order[b * batch:(b + 1) * batch]], "dynamic"))
            check.sync()
            elapsed = time.perf_counter() - start
            if epoch > 0:
                seconds[name].append(elapsed)
            line.append(f"{name} {elapsed:.3f} s")
        log(f"  epoch {epoch} ({'warm-up' if epoch == 0 else 'timed'}): " + ", ".join(line))
    median = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = median["pyro_vae-float32"] / median["plain-float32"]
    check.trainer = first
    elbo_ours = elbo_per_image(first.vae, test)
    elbo_plain = plain_elbo["float32"](test)
    result = (f"{median['pyro_vae-float32']:.3f} s/epoch vs plain "
              f"{median['plain-float32']:.3f}: {ratio:.2f}x")
    notes = [f"{raw.name} ({n} train images)", *check.data_notes, shape,
             f"batch {batch}", f"median of {args.epochs} timed epoch(s) after 1 warm-up",
             f"path {first.paths[0].path}"]
    data = {"dataset": raw.name, "train_images": n, "batch_size": batch, "model": shape,
            "timed_epochs": args.epochs, "seconds_per_epoch": median,
            "all_seconds": seconds, "ratio_float32": ratio, "path": first.paths[0].as_dict(),
            "test_elbo": {"pyro_vae-float32": elbo_ours, "plain-float32": elbo_plain}}
    if "pyro_vae-bf16" in median:
        data["ratio_bf16"] = median["pyro_vae-bf16"] / median["plain-bf16"]
        notes.append(f"bf16 {median['pyro_vae-bf16']:.3f} vs plain-bf16 "
                     f"{median['plain-bf16']:.3f} s/epoch ({data['ratio_bf16']:.2f}x)")
    notes.append(f"test ELBO after {args.epochs + 1} epochs {elbo_ours:.1f} (plain "
                 f"{elbo_plain:.1f})")
    return result, "; ".join(notes), data


# -- step 3: importance-sampled log-likelihood ---------------------------------------------------
def step_log_likelihood(check: Check) -> tuple[str, str, dict[str, Any]]:
    from pyro_vae import importance_log_likelihood
    from pyro_vae.inference.accelerators.bernoulli_mlp import AUTO_COMPILE_SAMPLES

    args = check.args
    vae, test, model_note = check.measurement_model()
    x = test[:args.loglik_images]
    n, k = x.shape[0], args.loglik_samples
    compiled = n * k >= AUTO_COMPILE_SAMPLES  # the package's own default (compile=None)
    log(f"log-likelihood: K = {k} on {n} test images"
        + (" (the fused kernel is compiled first)" if compiled else ""))
    check.sync()
    start = time.perf_counter()
    ll = importance_log_likelihood(vae, x, num_samples=k, seed=args.seed)
    check.sync()
    seconds = time.perf_counter() - start
    result = (f"{ll.mean():.2f} nats/image (MC s.e. {ll.mc_stderr():.3f}), "
              f"{n / seconds:.1f} images/s")
    notes = [f"K={k}, {n} test images", f"path {ll.path.path}" if ll.path else "",
             "time includes torch.compile" if compiled else "", model_note]
    data = {"num_samples": k, "images": n, "seconds": seconds, "images_per_second": n / seconds,
            "mean": ll.mean(), "mc_stderr": ll.mc_stderr(), "compile": compiled,
            "path": ll.path.as_dict() if ll.path else None}
    return result, "; ".join(s for s in notes if s), data


# -- step 4: the variance lab -------------------------------------------------------------------
@contextlib.contextmanager
def _bootstrap_intervals_on_cpu(device: torch.device, notes: list[str]):
    """Work around lab.variance._interval failing on a GPU (torch.quantile with its q on the
    CPU and the samples on the GPU): hand it CPU tensors. Applied only if the bug is there."""
    from pyro_vae.lab import variance

    original = variance._interval
    try:
        original(torch.zeros(4, dtype=torch.float64, device=device))
        broken = None
    except RuntimeError as e:
        broken = _short(e, 90)
    if broken is None:
        yield
        return
    notes.append(f"worked around a package bug: lab.variance._interval fails on "
                 f"{device.type} tensors ({broken})")
    log(f"  {notes[-1]}")
    variance._interval = lambda samples, level=0.95: original(samples.cpu(), level)
    try:
        yield
    finally:
        variance._interval = original


def step_variance_lab(check: Check) -> tuple[str, str, dict[str, Any]]:
    from pyro_vae import measure_gradient_variance
    from pyro_vae.lab.experiment import fixed_minibatch

    args = check.args
    vae, _, model_note = check.measurement_model()
    raw = check.load_data()
    cfg = check.trainer.cfg if check.trainer is not None else check.config()
    x = fixed_minibatch(raw, cfg, args.variance_batch, seed=args.seed).to(check.device)
    train_scale = len(raw.train.images) / cfg.train.batch_size
    r = args.variance_draws
    log(f"variance lab: {', '.join(ESTIMATORS)}, R = {r} draws (and {r} oracle draws), "
        f"minibatch {x.shape[0]}")
    notes: list[str] = []
    with _bootstrap_intervals_on_cpu(check.device, notes):
        check.sync()
        start = time.perf_counter()
        out = measure_gradient_variance(vae, x, list(ESTIMATORS), num_draws=r, oracle_draws=r,
                                        train_scale=train_scale, seed=args.seed)
        check.sync()
        seconds = time.perf_counter() - start
    est = out["estimators"]
    ratios = {name: est[name]["groups"]["encoder"]["ratio_to_reparam"] for name in ESTIMATORS}
    result = (f"encoder variance score/reparam {ratios['score']:.3g}x, "
              f"score-avg-baseline/reparam {ratios['score-avg-baseline']:.3g}x")
    paths = ", ".join(f"{name} {est[name]['path']}" for name in ESTIMATORS)
    per_draw = ", ".join(f"{1e3 * est[name]['seconds_per_draw']:.2f}" for name in ESTIMATORS)
    notes = [f"R={r}, batch {x.shape[0]}", f"paths: {paths}",
             f"ms/draw {per_draw}", f"oracle {out['oracle_seconds']:.1f} s",
             f"compile {out['compile_seconds']:.1f} s", *notes, model_note]
    data = {"num_draws": r, "batch_size": int(x.shape[0]), "seconds": seconds,
            "encoder_ratio_to_reparam": ratios,
            "encoder_trace": {n: est[n]["groups"]["encoder"]["trace"] for n in ESTIMATORS},
            "decoder_trace": {n: est[n]["groups"]["decoder"]["trace"] for n in ESTIMATORS},
            "seconds_per_draw": {n: est[n]["seconds_per_draw"] for n in ESTIMATORS},
            "paths": {n: est[n]["path"] for n in ESTIMATORS},
            "oracle_seconds": out["oracle_seconds"], "compile_seconds": out["compile_seconds"]}
    return result, "; ".join(s for s in notes if s), data


# -- driver -----------------------------------------------------------------------------------
STEP_FUNCTIONS = {"cuda-tests": step_cuda_tests, "epoch-benchmark": step_epoch_benchmark,
                  "log-likelihood": step_log_likelihood, "variance-lab": step_variance_lab}


def run_step(name: str, check: Check) -> StepResult:
    if name in check.args.skip:
        log(f"step {name}: skipped (--skip)")
        return StepResult(name, True, "not run (--skip)", 0.0)
    log(f"step {name}")
    start = time.perf_counter()
    try:
        result, notes, data = STEP_FUNCTIONS[name](check)
        ok = True
    except StepFailed as e:
        ok, result, notes, data = False, f"FAILED: {e.result}", e.notes, e.data
    except Exception as e:  # noqa: BLE001 - one step's failure must not hide the others
        traceback.print_exc()
        ok, result, notes, data = False, f"FAILED: {type(e).__name__}: {_short(e)}", "", {}
    seconds = time.perf_counter() - start
    log(f"step {name} {'done' if ok else 'FAILED'} in {seconds:.1f} s: {result}")
    return StepResult(name, ok, result, seconds, notes, data)


def table(results: list[StepResult]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "/").replace("\n", " ")

    lines = ["| step | result | seconds | notes |", "|---|---|---:|---|"]
    lines += [f"| {r.step} | {cell(r.result)} | {r.seconds:.1f} | {cell(r.notes)} |"
              for r in results]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where to run the benchmark and the measurements")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (512 training images of mnist-5k, batch 64, 1 timed "
                        "epoch, K = 50 on 20 images, R = 20 on 32 images): checks the script")
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist",
                                                              "mnist-5k"],
                        help="auto: full Fashion-MNIST if it loads here, else mnist-5k")
    parser.add_argument("--data-dir", default="", help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--epochs", type=int, help="timed epochs after the warm-up "
                        "(default 3, quick 1)")
    parser.add_argument("--batch-size", type=int, help="training batch (default 256, quick 64)")
    parser.add_argument("--train-limit", type=int,
                        help="use the first N training images (default all, quick 512)")
    parser.add_argument("--loglik-samples", type=int, help="K (default 5000, quick 50)")
    parser.add_argument("--loglik-images", type=int, help="test images (default 1000, quick 20)")
    parser.add_argument("--variance-draws", type=int, help="R (default 1000, quick 20)")
    parser.add_argument("--variance-batch", type=int, help="minibatch (default 256, quick 32)")
    parser.add_argument("--test-timeout", type=float, default=300.0,
                        help="seconds allowed for the CUDA tests")
    parser.add_argument("--skip", action="append", default=[], choices=STEPS,
                        help="leave a step out (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = {"epochs": (3, 1), "batch_size": (256, 64), "train_limit": (0, 512),
                "loglik_samples": (5000, 50), "loglik_images": (1000, 20),
                "variance_draws": (1000, 20), "variance_batch": (256, 32)}
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device cuda but torch {torch.__version__} sees no CUDA device; "
              f"run it on a GPU machine, or with --device cpu", file=sys.stderr)
        return 2
    check = Check(args)
    name = check.device_name()
    log(f"device {args.device} ({name}), torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if args.device == "cuda" else "")
        + (", quick sizes" if args.quick else ""))
    results = [run_step(step, check) for step in STEPS]
    ok = all(r.ok for r in results)
    total = time.perf_counter() - _START
    print(f"\nGPU readiness check on {args.device} ({name}), torch {torch.__version__}"
          f"{', quick sizes' if args.quick else ''}: {'all steps ran' if ok else 'FAILURES'}, "
          f"{total:.0f} s\n")
    print(table(results), flush=True)
    if args.out is not None:
        report = {"device": args.device, "device_name": name, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "quick": args.quick, "ok": ok,
                  "total_seconds": total, "argv": sys.argv[1:] if argv is None else list(argv),
                  "steps": [asdict(r) for r in results]}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
