"""Configuration: small dataclasses with defaults, read from and written to TOML.

A config has three sections, ``[data]``, ``[model]`` and ``[train]``, one dataclass each. Every
field becomes a command-line flag of the same name in kebab case (``latent_dim`` ->
``--latent-dim``), so adding a field here is all it takes to expose a new option. TOML is parsed
as data (``tomllib``), never evaluated.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .errors import ConfigError
from .files import atomic_write_text, describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def option(default: Any, help: str, *, choices: Callable[[], list[str]] | list[str] | None = None,
           check: Callable[[Any], bool] | None = None, need: str = "", cli: bool = True,
           item: type = int) -> Any:
    """A dataclass field with the metadata the CLI and the validator read.

    Args:
        default: default value (a scalar or tuple).
        help: one-line description shown by ``--help``.
        choices: the valid values, or a function returning them (for registries filled later).
        check: predicate a valid value satisfies; ``need`` says in words what it requires.
        cli: whether to expose the field as a command-line flag.
        item: the element type of a list field.
    """
    factory = (lambda: default) if isinstance(default, (list, dict)) else None
    meta = {"help": help, "choices": choices, "check": check, "need": need, "cli": cli,
            "item": item}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: Kinds of latent code (``model.latent``).
LATENT_KINDS = ["gaussian", "bernoulli", "categorical"]
#: For a discrete ``model.latent``: the guide family and prior that replace the Gaussian
#: defaults (``diagonal-normal``, ``standard-normal``) when those were left unchanged.
DISCRETE_DEFAULTS = {"bernoulli": ("bernoulli", "discrete-uniform"),
                     "categorical": ("categorical", "discrete-uniform")}


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: float) -> bool:
    return 0.0 <= v < 1.0


def _dataset_names() -> list[str]:
    return sorted(registry.DATASETS)


def _prior_names() -> list[str]:
    return sorted(registry.PRIORS)


def _encoder_names() -> list[str]:
    return sorted(registry.ENCODERS)


def _estimator_names() -> list[str]:
    return sorted(registry.ESTIMATORS)


def _likelihood_names() -> list[str]:
    return sorted(registry.LIKELIHOODS)


@dataclass
class DataConfig:
    """Which images to load and how to turn them into observations x."""

    dataset: str = option("mnist-5k", "dataset name; mnist-5k is embedded and needs no network",
                          choices=_dataset_names)
    data_dir: str = option("", "folder with the dataset's IDX files (gzipped or not); for "
                               "torchvision datasets also the download folder")
    binarize: str = option("dynamic", "none: grey levels in [0,1]; static: threshold once; "
                                      "static-sample: one fixed Bernoulli draw; dynamic: a fresh "
                                      "Bernoulli draw every time an image is seen",
                           choices=["none", "static", "static-sample", "dynamic"])
    threshold: float = option(0.5, "pixel threshold for --binarize static",
                              check=_fraction, need="in [0, 1)")
    val_fraction: float = option(0.0, "fraction of the training images held out for validation",
                                 check=_fraction, need="in [0, 1)")
    train_limit: int = option(0, "use only the first N training images (0: all)",
                              check=_non_negative, need=">= 0")


@dataclass
class ModelConfig:
    """The networks, the likelihood p(x|z) and the prior p(z)."""

    arch: str = option("mlp", "network family", choices=["mlp", "conv"])
    latent: str = option("gaussian", "kind of code z: gaussian (continuous), bernoulli "
                                     "(--latent-dim binary units) or categorical (--latent-dim "
                                     "one-hot groups of --categories); a discrete kind replaces "
                                     "the Gaussian defaults of --encoder and --prior by its own",
                         choices=LATENT_KINDS)
    latent_dim: int = option(50, "dimension of z (binary units, or one-hot groups, of a "
                                 "discrete code)", check=_positive, need="> 0")
    categories: int = option(10, "categories K of each group of --latent categorical",
                             check=lambda v: v >= 2, need=">= 2")
    hidden_dims: list[int] = option([400], "hidden layer sizes of the MLP (encoder; the decoder "
                                           "mirrors them), or of the conv nets' dense layer",
                                    check=lambda v: len(v) > 0 and all(h > 0 for h in v),
                                    need="a non-empty list of positive integers")
    activation: str = option("softplus", "hidden activation",
                             choices=["softplus", "relu", "elu", "tanh", "silu", "leaky-relu"])
    encoder: str = option("diagonal-normal", "guide family q(z|x) the encoder network outputs",
                          choices=_encoder_names)
    likelihood: str = option("bernoulli", "observation model p(x|z)", choices=_likelihood_names)
    gaussian_scale: float = option(0.1, "standard deviation of the gaussian likelihood "
                                        "(its initial value when learned)",
                                   check=_positive, need="> 0")
    learn_gaussian_scale: bool = option(False, "learn a per-pixel gaussian scale")
    prior: str = option("standard-normal", "prior p(z)", choices=_prior_names)
    prior_components: int = option(50, "mixture components of --prior mixture; pseudo-inputs of "
                                       "--prior vamp", check=_positive, need="> 0")
    prior_flow_depth: int = option(2, "autoregressive layers of --prior flow", check=_positive,
                                   need="> 0")
    prior_flow_hidden: int = option(0, "hidden units of each --prior flow layer's network "
                                       "(0: 3 * latent_dim + 1)", check=_non_negative,
                                    need=">= 0")
    prior_df: float = option(3.0, "degrees of freedom of --prior student-t", check=_positive,
                             need="> 0")


@dataclass
class TrainConfig:
    """The optimisation: objective, estimator, optimizer, schedule, bookkeeping."""

    estimator: str = option("reparam", "gradient estimator of the ELBO", choices=_estimator_names)
    num_particles: int = option(0, "samples of z per data point in each gradient estimate (0: "
                                   "the estimator's default, 1, or 5 for iwae and dreg)",
                                check=_non_negative, need=">= 0")
    epochs: int = option(10, "number of passes over the training set", check=_positive,
                         need="> 0")
    beta: float = option(1.0, "weight of the KL term (a poutine.scale on the latent sites); "
                              "reported ELBOs stay the true ELBO", check=_positive, need="> 0")
    kl_warmup_epochs: int = option(0, "raise the KL weight linearly from near 0 to --beta over "
                                      "this many epochs (0: no warm-up)",
                                   check=_non_negative, need=">= 0")
    batch_size: int = option(128, "images per minibatch", check=_positive, need="> 0")
    lr: float = option(1e-3, "Adam learning rate", check=_positive, need="> 0")
    lr_schedule: str = option("constant", "learning-rate schedule over the epochs: constant, "
                                          "cosine (to 0 at --epochs), or step (x --lr-gamma "
                                          "every --lr-step-epochs)",
                              choices=["constant", "cosine", "step"])
    lr_step_epochs: int = option(10, "epochs between steps of --lr-schedule step",
                                 check=_positive, need="> 0")
    lr_gamma: float = option(0.5, "factor of each step of --lr-schedule step",
                             check=_positive, need="> 0")
    early_stop_patience: int = option(0, "stop when the validation ELBO has not improved for "
                                         "this many epochs (0: off; needs --val-fraction)",
                                      check=_non_negative, need=">= 0")
    encoder_lr_scale: float = option(0.0, "the encoder's Adam rate is lr times this (0: the "
                                          "estimator's default: 0.1 for score, 1 otherwise)",
                                     check=_non_negative, need=">= 0")
    seed: int = option(0, "random seed (data order, binarization, z draws, initialisation)",
                       check=_non_negative, need=">= 0")
    device: str = option("auto", "auto picks cuda when available",
                         choices=["auto", "cpu", "cuda"])
    eval_batch_size: int = option(1000, "images per batch when evaluating", check=_positive,
                                  need="> 0")
    grad_clip: float = option(0.0, "clip the global gradient norm to this value (0: off)",
                              check=_non_negative, need=">= 0")
    max_bad_steps: int = option(10, "stop after this many steps with a non-finite loss or "
                                    "gradient (each is skipped)", check=_positive, need="> 0")
    tensorboard: bool = option(False, "also write TensorBoard events to RUN_DIR/tensorboard "
                                      "(needs pip install 'pyro-vae[tensorboard]')")
    tensorboard_images_every: int = option(5, "epochs between the sample and reconstruction "
                                              "images written with --tensorboard (0: none)",
                                           check=_non_negative, need=">= 0")
    progress: bool = option(True, "show a progress bar (only when stderr is a terminal)")
    fast_path: bool = option(True, "compute the reparametrized ELBO without Pyro's tracing "
                                   "where that gives Trace_ELBO's gradients (see "
                                   "docs/performance.md); --no-fast-path forces plain Pyro")
    precision: str = option("float32", "bf16: matrix products in bfloat16 under autocast, "
                                       "densities and sums in float32",
                            choices=["float32", "bf16"])
    temperature: float = option(1.0, "temperature of the Concrete relaxation of the "
                                     "gumbel-softmax and straight-through estimators and of "
                                     "rebar's control variate (at the first step, when "
                                     "annealed)", check=_positive, need="> 0")
    temperature_final: float = option(0.0, "anneal the temperature geometrically from "
                                           "--temperature to this value at the last step "
                                           "(0: constant)", check=_non_negative, need=">= 0")
    relaxed_density: str = option("discrete", "how gumbel-softmax, straight-through and "
                                              "rebar's control variate score a relaxed "
                                              "code: discrete (the units' "
                                              "log-probabilities, linear in the code) or "
                                              "concrete (the Concrete densities; relaxed "
                                              "objective of Maddison et al.)",
                                  choices=["discrete", "concrete"])
    threads: int = option(0, "CPU threads for torch (0: torch's default, one per core); on a "
                             "machine shared with other jobs 1 is often much faster",
                          check=_non_negative, need=">= 0")


@dataclass
class RunConfig:
    """What a run was built from, recorded by the trainer (not flags): the plugin modules that
    registered its parts and the class of each part, so that a run is never loaded into other
    classes than it was trained with (:func:`pyro_vae.training.runs.check_parts`)."""

    plugins: list[str] = option([], "plugin modules the run's parts come from", cli=False,
                                item=str)
    encoder_class: str = option("", "class of the encoder (module.qualname)", cli=False)
    decoder_class: str = option("", "class of the decoder", cli=False)
    prior_class: str = option("", "class of the prior", cli=False)
    guide_family_class: str = option("", "class of the encoder's guide family, if any",
                                     cli=False)


@dataclass
class Config:
    """A complete run configuration."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], base: Config | None = None) -> Config:
        """Build a config from nested dicts (as read from TOML) over ``base`` (or defaults).

        Raises:
            ConfigError: on an unknown section or key, or a value of the wrong type.
        """
        cfg = dataclasses.replace(base) if base is not None else cls()
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for name, values in d.items():
            if name not in sections:
                raise ConfigError(f"unknown config section [{name}]; valid sections: "
                                  f"{', '.join(sections)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section [{name}] must be a table, got {values!r}")
            section = dataclasses.replace(getattr(cfg, name))
            known = {f.name: f for f in dataclasses.fields(section)}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(f"unknown config key {name}.{key}; valid keys in [{name}]: "
                                      f"{', '.join(known)}")
                setattr(section, key, _coerce(f"{name}.{key}", value, known[key]))
            setattr(cfg, name, section)
        return cfg

    @classmethod
    def load(cls, path: str | Path, base: Config | None = None) -> Config:
        """Read a TOML config file.

        Raises:
            ConfigError: if the file is missing, is not valid TOML, or has bad keys or values.
        """
        path = Path(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder; pass a TOML file") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {describe(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start} is "
                              f"0x{e.object[e.start]:02x}); pass a TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        try:
            return cls.from_dict(raw, base)
        except ConfigError as e:  # name the file: its keys are what the message names
            raise ConfigError(f"config file {path}: {e}") from None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the config as TOML, atomically (:mod:`pyro_vae.files`)."""
        atomic_write_text(path, self.to_toml())

    def validate(self) -> Config:
        """Check every value and the combinations between them; return self.

        Raises:
            ConfigError: naming the first bad value.
        """
        for section_name in ("data", "model", "train", "run"):
            section = getattr(self, section_name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                flag = f"{section_name}.{f.name}"
                choices = f.metadata.get("choices")
                extensible = callable(choices)  # a registry: plugins may add names
                if callable(choices):
                    choices = choices()
                if choices is not None and value not in choices:
                    hint = ("; a name from your own module needs its plugin loaded first "
                            "(pyro-vae --plugin MODULE, or pyro_vae.load_plugin)"
                            if extensible else "")
                    raise ConfigError(f"unknown {f.name.replace('_', ' ')} {value!r} ({flag}); "
                                      f"choose one of: {', '.join(choices)}{hint}")
                check = f.metadata.get("check")
                if check is not None and not check(value):
                    raise ConfigError(f"{flag} = {value!r} is invalid: must be "
                                      f"{f.metadata['need']}")
        self._validate_combinations()
        return self

    def _validate_combinations(self) -> None:
        self._apply_latent_defaults()
        if self.train.early_stop_patience and not self.data.val_fraction:
            raise ConfigError("train.early_stop_patience needs a validation split: set "
                              "data.val_fraction, e.g. 0.1")
        # the parts' kind of code first: an estimator's refusal presumes the right parts
        self._check_latent_kind()
        registry.ESTIMATORS[self.train.estimator].check_config(self)
        registry.LIKELIHOODS[self.model.likelihood].check_config(self)
        registry.PRIORS[self.model.prior].check_config(self)
        registry.ENCODERS[self.model.encoder].check_config(self)
        if self.train.device == "cuda":
            import torch
            if not torch.cuda.is_available():
                raise ConfigError("train.device = 'cuda' but no CUDA device is available; "
                                  "use train.device=\"cpu\" or \"auto\"")


    def _apply_latent_defaults(self) -> None:
        """A discrete ``model.latent`` with the Gaussian default guide family and prior gets its
        own defaults instead (recorded in the config, so a saved run names them)."""
        defaults = DISCRETE_DEFAULTS.get(self.model.latent)
        if defaults is None:
            return
        if self.model.encoder == "diagonal-normal":
            self.model.encoder = defaults[0]
        if self.model.prior == "standard-normal":
            self.model.prior = defaults[1]

    def _check_latent_kind(self) -> None:
        """Guide family and prior must produce the kind of code ``model.latent`` names: each
        part declares the kinds it supports in its ``latent_kinds`` attribute."""
        kind = self.model.latent
        for what, reg, name in (("encoder", registry.ENCODERS, self.model.encoder),
                                ("prior", registry.PRIORS, self.model.prior)):
            kinds = getattr(reg[name], "latent_kinds", ("gaussian",))
            if kind not in kinds:
                raise ConfigError(f"{what} {name} makes a {'/'.join(kinds)} code, not the "
                                  f"{kind} code of model.latent = {kind!r}; use --latent "
                                  f"{kinds[0]} or another --{what}")


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Check a TOML value against the field's type; ints are accepted for floats."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    want = type(default)
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
    elif want is list:
        item = f.metadata.get("item", int)
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool)
                                             for v in value)
        if ok:
            value = list(value)
    else:
        ok = isinstance(value, want)
    if not ok:
        items = f" of {f.metadata.get('item', int).__name__}" if want is list else ""
        raise ConfigError(f"{name} must be of type {want.__name__}{items}, got {value!r}")
    return value


def dump_toml(d: dict[str, dict[str, Any]]) -> str:
    """Write a two-level dict of scalars and lists of scalars as TOML."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []
    for section, values in d.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in values.items() if v is not None)
        lines.append("")
    return "\n".join(lines)


def config_fields() -> list[tuple[str, dataclasses.Field]]:
    """All (section, field) pairs, in declaration order; the CLI builds its flags from these."""
    return [(s.name, f) for s in dataclasses.fields(Config)
            for f in dataclasses.fields(s.default_factory())]
