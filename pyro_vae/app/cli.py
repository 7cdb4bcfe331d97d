"""The ``pyro-vae`` command line: argparse lives here and nowhere else.

Every config field is a flag (``--latent-dim 20``); ``--config FILE.toml`` sets a base and flags
override it. A user mistake prints one line, ``pyro-vae: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

from ..config import Config, config_fields
from ..errors import PyroVAEError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; unset flags stay out of the namespace (argparse.SUPPRESS)."""
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file; "
                        "flags given here override it")
    for section, f in config_fields():
        if not f.metadata.get("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        help_text = f.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
        help_text += f" [default: {default}]"
        kwargs = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS, "help": help_text}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list):
            parser.add_argument(flag, type=int, nargs="+", metavar="N", **kwargs)
        else:
            parser.add_argument(flag, type=type(default), metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """The config file (if any, else ``base`` or the defaults) overridden by the flags given on
    the command line."""
    if base is not None:
        cfg = base
    else:
        cfg = Config.load(args.config) if getattr(args, "config", None) else Config()
    overrides: dict[str, dict] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    return Config.from_dict(overrides, base=cfg).validate()


# -- train ----------------------------------------------------------------------------------------
def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="RUN_DIR",
                   help="run folder: config.toml, metrics.jsonl, checkpoint.pt, figures")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR with its "
                   "saved config; flags may change only what may differ between a run and its "
                   "continuation (--epochs, --threads, --device, --progress, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures at the end")
    add_config_flags(p)


def _resume_config(args: argparse.Namespace) -> Config:
    """``--resume``: the run's own config.toml, with the flags given here applied on top. Only
    settings that may change between a run and its continuation are accepted (a flag that
    repeats the saved value is fine)."""
    from pathlib import Path

    from ..errors import CheckpointError, ConfigError
    from ..registry import require_plugins
    from ..training.runs import CHECKPOINT_FILE, CONFIG_FILE, RESUMABLE_KEYS

    path = Path(args.out) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {args.out} holds no {CHECKPOINT_FILE} and "
                              f"{CONFIG_FILE}")
    saved = Config.load(path)
    require_plugins(saved.run.plugins, f"run {args.out}")
    base = Config.load(args.config, base=saved) if getattr(args, "config", None) else saved
    cfg = config_from_args(args, base=base)
    for key in [k for k in vars(args) if "." in k]:
        section, name = key.split(".", 1)
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if (section, name) not in RESUMABLE_KEYS and old != new:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} cannot change when resuming (the run has {old!r}, "
                              f"{flag} asks for {new!r}); drop it, or start a new run")
    return cfg


def _run_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = _resume_config(args) if args.resume and not args.overwrite else config_from_args(args)
    if args.quiet:
        cfg.train.progress = False
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                   figures=not args.no_figures)
    if result.interrupted:
        import signal

        name = signal.Signals(result.stop_signal).name if result.stop_signal else "interrupted"
        print(f"pyro-vae: stopped by {name}: position saved in {args.out}; continue with "
              f"pyro-vae train --out {args.out} --resume", file=sys.stderr)
        return 128 + (result.stop_signal or signal.SIGINT)
    last = result.metrics[-1] if result.metrics else {}
    if last:
        train = (f"train ELBO {last['train_elbo']:.2f}" if "train_elbo" in last
                 else f"train {last.get('objective', 'objective')} "
                      f"{last.get('train_objective', float('nan')):.2f}")
        print(f"epoch {last['epoch']}: {train}, test ELBO "
              f"{last['test_elbo']:.2f} nats/image; outputs in {args.out}")
    return 0


# -- evaluate, sample, score (issue 5) ------------------------------------------------------------
#: The CLI spells bfloat16 as in ``train --precision``; evaluate.py's API takes torch's name.
_EVAL_PRECISION = {"float32": "float32", "bf16": "bfloat16"}


def _add_run_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by train")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw [default: 0]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to compute; auto picks cuda when available [default: auto]")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")


def _add_evaluate(p: argparse.ArgumentParser) -> None:
    _add_run_common(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="which images [default: test]")
    p.add_argument("--num-samples", type=int, default=5000,
                   help="importance samples K per image for log p(x) [default: 5000]")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step [default: 8]")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="importance samples per image per step [default: 8192 on the fused "
                   "MLP/Bernoulli path, 1024 otherwise]")
    p.add_argument("--num-particles", type=int, default=10,
                   help="z draws per image for the ELBO terms, as in train [default: 10]")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="matmul precision of the decoder layers, as in train [default: float32]")
    p.add_argument("--workers", type=int, default=1,
                   help="processes sharing the log-likelihood, one thread each; the estimates "
                   "do not change (2 on a 2-core CPU for K = 5000) [default: 1]")
    p.add_argument("--out", default=None, help="JSON file [default: RUN_DIR/evaluation.json]")


def _run_evaluate(args: argparse.Namespace) -> int:
    from .commands import evaluate_run, format_evaluation

    result = evaluate_run(args.run_dir, args.split, args.num_samples, args.limit,
                          args.batch_size, args.chunk_size, args.num_particles, args.seed,
                          _EVAL_PRECISION[args.precision], out=args.out, overwrite=args.overwrite,
                          device=args.device, workers=args.workers, progress=not args.quiet)
    print(format_evaluation(result))
    return 0


def _add_sample(p: argparse.ArgumentParser) -> None:
    _add_run_common(p)
    p.add_argument("--num-images", type=int, default=64,
                   help="images decoded from prior draws [default: 64]")
    p.add_argument("--num-pairs", type=int, default=8,
                   help="interpolated pairs of test images [default: 8]")
    p.add_argument("--steps", type=int, default=10, help="points per interpolation [default: 10]")
    p.add_argument("--projection", default="pca", choices=["pca", "tsne"],
                   help="2-D view of latents above 2-D: PCA of all test encodings, or t-SNE of "
                   "the first 2000 (scikit-learn) [default: pca]")
    p.add_argument("--out", default=None, help="output folder [default: RUN_DIR/samples]")


def _run_sample(args: argparse.Namespace) -> int:
    from .commands import sample_run

    paths = sample_run(args.run_dir, args.out, args.seed, args.num_images, args.num_pairs,
                       args.steps, overwrite=args.overwrite, device=args.device,
                       projection=args.projection)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_score(p: argparse.ArgumentParser) -> None:
    _add_run_common(p)
    p.add_argument("--split", default="test", choices=["test", "val", "train"],
                   help="which images of the run's dataset [default: test]")
    p.add_argument("--images", default=None, metavar="FOLDER",
                   help="score the PNG/JPEG files of this folder instead of a split")
    p.add_argument("--method", default="nll", choices=["nll", "elbo"],
                   help="nll: -log p(x) by importance sampling; elbo: -ELBO [default: nll]")
    p.add_argument("--num-samples", type=int, default=None,
                   help="importance samples K per image for --method nll [default: 1000]")
    p.add_argument("--num-particles", type=int, default=10,
                   help="z draws per image for --method elbo, as in train [default: 10]")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--precision", default="float32", choices=["float32", "bf16"],
                   help="matmul precision of the decoder layers, as in train [default: float32]")
    p.add_argument("--out", default=None,
                   help="CSV file [default: RUN_DIR/scores-SPLIT-METHOD.csv]")


def _run_score(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .commands import score_run

    if args.method == "elbo" and args.num_samples is not None:
        raise ConfigError("--num-samples is the importance samples of --method nll; for "
                          "--method elbo give the z draws per image with --num-particles")
    k = 1000 if args.num_samples is None else args.num_samples
    draws = k if args.method == "nll" else args.num_particles
    out = score_run(args.run_dir, args.split, args.images, args.method, draws,
                    args.limit, args.seed, precision=_EVAL_PRECISION[args.precision], out=args.out,
                    overwrite=args.overwrite, device=args.device)
    print(f"wrote {out}")
    return 0


# -- variance (issue 3) ---------------------------------------------------------------------------
def _add_variance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: variance.json, variance.csv and the figures")
    p.add_argument("--runs", nargs="+", default=[], metavar="RUN_DIR",
                   help="measure these runs' checkpoints instead of training a reference run")
    p.add_argument("--estimators", nargs="+", default=["reparam", "score", "score-avg-baseline"],
                   metavar="NAME", help="estimators to measure [default: reparam score "
                   "score-avg-baseline]")
    p.add_argument("--checkpoints", nargs="+", type=int, default=[0, 100, 500, 1000],
                   metavar="STEP", help="steps of the reference run to measure at "
                   "[default: 0 100 500 1000]")
    p.add_argument("--draws", type=int, default=1000, help="gradient draws R per estimator "
                   "[default: 1000]")
    p.add_argument("--oracle-draws", type=int, default=1000,
                   help="gradient evaluations of the oracle mean gradient (reparametrized; "
                   "closed-form KL and antithetic pairs where the model allows) [default: 1000]")
    p.add_argument("--measure-batch", type=int, default=256,
                   help="size of the fixed minibatch [default: 256]")
    p.add_argument("--latent-dims", nargs="+", type=int, default=[], metavar="D",
                   help="sweep: one reference run per latent dimension")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[], metavar="B",
                   help="sweep: measure on a fixed minibatch of each size")
    p.add_argument("--curve-steps", type=int, default=0,
                   help="also train each estimator this many steps for ELBO curves [default: 0]")
    p.add_argument("--draw-precision", default="auto", choices=["auto", "bf16", "float32"],
                   help="matrix products of the gradient draws and the oracle; bf16 changes "
                   "per-draw gradients by 0.1-0.4%% and the variances by far less than their "
                   "intervals (docs/estimators.md); auto: bf16 where this CPU runs bf16 "
                   "products faster than float32 (measured; recorded in variance.json), "
                   "float32 otherwise [default: auto]")
    p.add_argument("--overwrite", action="store_true", help="replace outputs in DIR")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    add_config_flags(p)  # --precision is the reference run's training precision


def _run_variance(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..data import load_dataset
    from ..errors import CheckpointError, ConfigError
    from ..files import atomic_write_text, make_folder, new_outputs
    from ..lab.experiment import variance_experiment, variance_rows

    out = Path(args.out)
    if (out / "variance.json").exists() and not args.overwrite:
        raise CheckpointError(f"{out} already holds variance.json; pass --overwrite or choose "
                              f"another --out")
    from ..training.runs import check_writable

    check_writable(out, "--out")  # before anything is trained or measured
    for flag, values in (("--draws", [args.draws]), ("--oracle-draws", [args.oracle_draws]),
                         ("--measure-batch", [args.measure_batch]),
                         ("--latent-dims", args.latent_dims), ("--batch-sizes", args.batch_sizes)):
        bad = [v for v in values if v < (2 if flag == "--draws" else 1)]
        if bad:
            raise ConfigError(f"{flag} {bad[0]} is invalid: must be a positive integer"
                              f"{' >= 2' if flag == '--draws' else ''}")
    cfg = config_from_args(args)
    runs = []
    for run_dir in args.runs:
        from ..training.runs import load_run

        run_cfg, vae, state = load_run(run_dir)
        runs.append((str(run_dir), state["position"]["global_step"], run_cfg, vae,
                     state.get("param_store_extras", {})))
    if runs:
        # How to measure may be set here; what was trained is the runs' own business.
        measuring = {"train.precision", "train.threads", "train.progress", "train.device",
                     "train.tensorboard"}
        given = sorted(k for k in vars(args) if "." in k and k not in measuring)
        given += ["config"] if args.config else []
        if given:
            flags = ", ".join("--" + k.split(".")[-1].replace("_", "-") for k in given)
            raise ConfigError(f"--runs measures each run with its own saved config; drop {flags}")
        datasets = {(r[2].data.dataset, r[2].data.data_dir, r[2].data.binarize) for r in runs}
        if len(datasets) > 1:
            raise ConfigError(f"--runs must share one dataset and binarization, got "
                              f"{sorted(datasets)}")
        cfg = runs[0][2]
        for key in measuring & set(vars(args)):
            setattr(cfg.train, key.split(".")[1], getattr(args, key))
    from ..runtime import apply_threads

    apply_threads(cfg.train.threads)
    dataset = load_dataset(cfg.data)
    experiment = variance_experiment(
        cfg, dataset, args.estimators, checkpoints=args.checkpoints, num_draws=args.draws,
        oracle_draws=args.oracle_draws, measure_batch=args.measure_batch,
        latent_dims=args.latent_dims, batch_sizes=args.batch_sizes,
        curve_steps=args.curve_steps, seed=cfg.train.seed, precision=args.draw_precision,
        runs=runs,
        log=lambda message: print(message, file=sys.stderr) if cfg.train.progress else None)
    with new_outputs([], out, own_folder=True):
        make_folder(out)
        rows = variance_rows(experiment)
        atomic_write_text(out / "variance.json", json.dumps(experiment, indent=1))
        header = list(rows[0]) if rows else []
        atomic_write_text(out / "variance.csv", "".join(
            ",".join(str(r[k]) for k in header) + "\n"
            for r in [dict(zip(header, header)), *rows]))
        if not args.no_figures:
            from .plots import write_variance_figures

            write_variance_figures(out, experiment)
    if cfg.train.tensorboard:
        _variance_to_tensorboard(out, experiment)
    t = experiment["timing"]
    print(f"measured {len(experiment['measurements'])} checkpoint(s) x "
          f"{len(args.estimators)} estimator(s), R = {args.draws}: measurement "
          f"{t['measurement_s']:.1f} s, reference training {t['reference_training_s']:.1f} s; "
          f"outputs in {out}")
    for m in experiment["measurements"]:
        for name, res in m["estimators"].items():
            enc, dec = res["groups"]["encoder"], res["groups"]["decoder"]
            bias = (f", error vs exact {enc['relative_error']:.3f} (noise "
                    f"{enc['noise_floor']:.3f})" if "relative_error" in enc else "")
            print(f"  step {m['step']:>6} {name:<20} encoder var x{enc['ratio_to_reparam']:.3g} "
                  f"(SNR {enc['snr']:.3g}, cos {enc['cosine']:.3f}{bias}); decoder var "
                  f"x{dec['ratio_to_reparam']:.3g}")
    return 0


def _variance_to_tensorboard(out, experiment: dict) -> None:
    """The variance curves as TensorBoard scalars, against the reference run's step: per
    estimator and group, the variance ratio to reparam, the SNR and the cosine to the oracle;
    and the training curves of ``--curve-steps``."""
    from ..training.tensorboard import FOLDER, summary_writer

    writer = summary_writer(out / FOLDER)
    for m in experiment["measurements"]:
        run = f"{m['run']}-d{m['latent_dim']}-b{m['batch_size']}"
        for name, res in m["estimators"].items():
            for group in ("encoder", "decoder"):
                s = res["groups"][group]
                writer.add_scalar(f"{run}/{group}/variance_ratio/{name}",
                                  s["ratio_to_reparam"], m["step"])
                writer.add_scalar(f"{run}/{group}/snr/{name}", s["snr"], m["step"])
                writer.add_scalar(f"{run}/{group}/cosine/{name}", s["cosine"], m["step"])
    for name, curve in experiment["curves"].items():
        for step, elbo in zip(curve["step"], curve["elbo"], strict=True):
            writer.add_scalar(f"curves/train_elbo/{name}", elbo, step)
    writer.close()


#: Subcommand name -> (help, add_arguments, run). Add a subcommand with one entry.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "train": ("train a VAE with SVI", _add_train, _run_train),
    "variance": ("gradient-estimator variance at checkpoints of a training run",
                 _add_variance, _run_variance),
    "evaluate": ("test ELBO, importance-sampled log p(x), active units", _add_evaluate,
                 _run_evaluate),
    "sample": ("figures: prior samples, reconstructions, interpolations, latent space",
               _add_sample, _run_sample),
    "score": ("anomaly scores of a split or an image folder, to CSV", _add_score, _run_score),
}


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """Options every command takes, before or after the command name."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--plugin", action="append", metavar="MODULE",
                        default=[] if top else argparse.SUPPRESS,
                        help="import MODULE first; it may register priors, encoders, "
                        "likelihoods or estimators (repeatable; installed packages' "
                        "pyro_vae.plugins entry points load on their own)")
    parser.add_argument("--verbose", action="store_true", default=False if top else default,
                        help="print which computation path (accelerator or generic Pyro) each "
                        "computation takes, and why")
    parser.add_argument("--quiet", action="store_true", default=False if top else default,
                        help="no progress bars or progress lines; only results and errors")
    parser.add_argument("--memory-limit", metavar="SIZE", default="auto" if top else default,
                        help="refuse computations whose memory estimate exceeds SIZE (16G, "
                        "512M); auto (default): the memory available; off: no check")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="pyro-vae", description="Variational auto-encoders in Pyro.")
    parser.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    _add_global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_global_options(p, top=False)
        add(p)
    return parser


def _command_list() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: pyro-vae [--plugin MODULE] [--verbose] COMMAND [options]", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (help_text, _, _) in COMMANDS.items()]
    lines += ["", "pyro-vae COMMAND --help lists a command's options; pyro-vae --version prints "
              "the version."]
    return "\n".join(lines)


def _plugins_in(argv: list[str]) -> list[str]:
    """The ``--plugin`` values of a command line, read before the parser is built: the
    registries they fill decide the choices of ``--prior``, ``--encoder`` and the others."""
    modules = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            modules.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            modules.append(arg.split("=", 1)[1])
    return modules


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """The command line's stderr: progress lines (unless --quiet), path choices (--verbose),
    warnings of the package; none of torch's messages a user cannot act on."""
    import logging

    from ..inference.accelerators import LOG as PATHS
    from ..progress import LOG as PROGRESS

    class _Stderr(logging.StreamHandler):
        """Writes to whatever sys.stderr is when a record comes (main() may run many times
        in one process, e.g. in tests, each with its own stderr)."""

        def emit(self, record: logging.LogRecord) -> None:
            self.stream = sys.stderr
            super().emit(record)

    for logger, prefix, on in ((PATHS, "pyro-vae: path: ", verbose),
                               (PROGRESS, "pyro-vae: ", not quiet)):
        for old in [h for h in logger.handlers if type(h).__name__ == "_Stderr"]:
            logger.removeHandler(old)
        if on:
            handler = _Stderr(sys.stderr)
            handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
    # "No CUDA runtime is found, using CUDA_HOME=..." when torch.compile builds a CPU kernel
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


#: Python argument names of the run-level functions (evaluate_run, sample_run, score_run,
#: variance_experiment) that the commands expose as flags of the same name.
_COMMAND_ARGUMENTS = ("num_samples", "num_particles", "batch_size", "chunk_size", "workers",
                      "num_images", "num_pairs", "steps", "limit", "num_draws", "oracle_draws",
                      "measure_batch", "checkpoints", "threshold", "precision", "projection",
                      "split", "method")


def for_the_command_line(message: str) -> str:
    """An error message of the Python API with its argument names turned into flags:
    ``train.lr`` -> ``--lr``, ``data.binarize="none"`` -> ``--binarize none``,
    ``overwrite=True`` -> ``--overwrite``, ``run_dir`` -> ``--out`` (train), ``num_samples``
    -> ``--num-samples``."""
    import re

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if message.startswith("config file "):  # about a file's keys: keep the TOML names
        return message

    message = re.sub(r"\b(?:data|model|train)\.(\w+)=\"?([\w.+-]+)\"?",
                     lambda m: f"{flag(m.group(1))} {m.group(2)}", message)
    message = re.sub(r"\b(?:data|model|train)\.(\w+) = ", lambda m: f"{flag(m.group(1))} ",
                     message)
    message = re.sub(r"\b(?:data|model|train)\.(\w+)\b", lambda m: flag(m.group(1)), message)
    message = re.sub(r"\b(resume|overwrite)=True\b", lambda m: flag(m.group(1)), message)
    message = re.sub(r"\banother run_dir\b", "another --out", message)
    names = "|".join(_COMMAND_ARGUMENTS)
    message = re.sub(rf"(?<![\w.-])({names}) = ", lambda m: f"{flag(m.group(1))} ", message)
    return re.sub(rf"(?<![\w.-])({names})(?= must| =|\b is\b)",
                  lambda m: flag(m.group(1)), message)


def main(argv: list[str] | None = None) -> int:
    from ..registry import load_entry_point_plugins, load_plugin

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare pyro-vae: what it can do, one line each
        print(_command_list())
        return 0
    try:
        load_entry_point_plugins()
        for module in _plugins_in(argv):
            load_plugin(module)
    except PyroVAEError as e:
        print(f"pyro-vae: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    from ..runtime import reuse_freed_memory, set_memory_limit

    reuse_freed_memory()
    _setup_logging(args.verbose, args.quiet)
    try:
        set_memory_limit(args.memory_limit)
        return COMMANDS[args.command][2](args)
    except PyroVAEError as e:
        print(f"pyro-vae: error: {for_the_command_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # an OS fault no check can foresee, such as a disk filling up mid-run
        from ..files import output_error

        where = e.filename if e.filename is not None else "a file"
        print(f"pyro-vae: error: {output_error(where, e, 'use')}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
