"""The ``pyro-vae`` command line: argparse lives here and nowhere else.

Every config field is a flag (``--latent-dim 20``); ``--config FILE.toml`` sets a base and flags
override it. A user mistake prints one line, ``pyro-vae: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

from .config import Config, config_fields
from .errors import PyroVAEError

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


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (if any) overridden by the flags given on the command line."""
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
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in RUN_DIR")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures at the end")
    add_config_flags(p)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args)
    result = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                   figures=not args.no_figures)
    if result.interrupted:
        print(f"interrupted: checkpoint saved in {args.out}; continue with --resume",
              file=sys.stderr)
        return 130
    last = result.metrics[-1] if result.metrics else {}
    if last:
        print(f"epoch {last['epoch']}: train ELBO {last['train_elbo']:.2f}, test ELBO "
              f"{last['test_elbo']:.2f} nats/image; outputs in {args.out}")
    return 0


#: Subcommand name -> (help, add_arguments, run). Add a subcommand with one entry.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "train": ("train a VAE with SVI", _add_train, _run_train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyro-vae", description="Variational auto-encoders in Pyro.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help_text, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except PyroVAEError as e:
        print(f"pyro-vae: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
