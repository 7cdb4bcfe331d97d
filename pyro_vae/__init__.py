"""pyro_vae: variational auto-encoders in Pyro, and a lab for their gradient estimators.

The package is layered (docs/architecture.md): ``models`` -> ``inference`` -> ``metrics`` ->
``training`` -> ``lab`` -> ``app``, each importing only the layers before it and the base
modules (``config``, ``errors``, ``registry``, ``data``). This file re-exports the public API.
"""

from . import inference, models  # noqa: F401 - fill the registries before anything reads them
from .app.train import train
from .config import Config, DataConfig, ModelConfig, RunConfig, TrainConfig
from .data import Dataset, Split, load_dataset, read_idx
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    PyroVAEError,
    TrainingError,
)
from .inference.accelerators import PathChoice
from .inference.estimators import Estimator
from .inference.program import inspect_program, log_weights, trace_program
from .lab import measure_gradient_variance, variance_experiment
from .metrics import (
    ElboTerms,
    LogLikelihood,
    active_units,
    anomaly_scores,
    elbo_per_image,
    elbo_terms,
    importance_log_likelihood,
    log_likelihood,
)
from .models import (
    VAE,
    BernoulliCode,
    CategoricalCode,
    Decoder,
    DiagonalLaplace,
    DiagonalNormal,
    DiscreteLearnedPrior,
    DiscreteUniformPrior,
    Encoder,
    FlowPrior,
    GuideFamily,
    LearnedGaussianPrior,
    Likelihood,
    MixturePrior,
    Prior,
    StandardNormalPrior,
    StudentTPrior,
    VampPrior,
    build_prior,
)
from .registry import (
    DATASETS,
    ENCODERS,
    ESTIMATORS,
    LIKELIHOODS,
    PRIORS,
    load_plugin,
    loaded_plugins,
)
from .training import TrainResult, fit, load_run

__version__ = "0.2.0"

__all__ = [
    "Config", "DataConfig", "ModelConfig", "TrainConfig", "RunConfig",
    "DATASETS", "Dataset", "Split", "load_dataset", "read_idx",
    "PyroVAEError", "ConfigError", "DataError", "CheckpointError", "TrainingError", "OutputError",
    "ESTIMATORS", "Estimator", "elbo_per_image",
    "ElboTerms", "LogLikelihood", "active_units", "anomaly_scores", "elbo_terms",
    "importance_log_likelihood", "log_likelihood",
    "VAE", "LIKELIHOODS", "Likelihood", "Encoder", "Decoder", "PRIORS", "Prior",
    "ENCODERS", "GuideFamily", "DiagonalNormal", "DiagonalLaplace",
    "StandardNormalPrior", "LearnedGaussianPrior", "MixturePrior", "VampPrior", "FlowPrior",
    "StudentTPrior", "build_prior",
    "BernoulliCode", "CategoricalCode", "DiscreteUniformPrior", "DiscreteLearnedPrior",
    "TrainResult", "fit", "train", "load_run",
    "measure_gradient_variance", "variance_experiment",
    "PathChoice", "trace_program", "log_weights", "inspect_program",
    "load_plugin", "loaded_plugins",
]
