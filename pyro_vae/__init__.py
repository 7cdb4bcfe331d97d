"""pyro_vae: variational auto-encoders in Pyro, and a lab for their gradient estimators."""

from .config import Config, DataConfig, ModelConfig, TrainConfig
from .data import DATASETS, Dataset, Split, load_dataset, read_idx
from .errors import CheckpointError, ConfigError, DataError, PyroVAEError, TrainingError
from .estimators import ESTIMATORS, Estimator
from .evaluate import (
                       ElboTerms,
                       LogLikelihood,
                       active_units,
                       anomaly_scores,
                       elbo_per_image,
                       elbo_terms,
                       importance_log_likelihood,
                       log_likelihood,
)
from .model import VAE
from .networks import LIKELIHOODS, Decoder, Encoder, Likelihood
from .priors import (
                       PRIORS,
                       FlowPrior,
                       LearnedGaussianPrior,
                       MixturePrior,
                       Prior,
                       StandardNormalPrior,
                       StudentTPrior,
                       VampPrior,
                       build_prior,
)
from .train import TrainResult, fit, load_run, train
from .variance import measure_gradient_variance, variance_experiment

__version__ = "0.1.0"

__all__ = [
    "Config", "DataConfig", "ModelConfig", "TrainConfig",
    "DATASETS", "Dataset", "Split", "load_dataset", "read_idx",
    "PyroVAEError", "ConfigError", "DataError", "CheckpointError", "TrainingError",
    "ESTIMATORS", "Estimator", "elbo_per_image",
    "ElboTerms", "LogLikelihood", "active_units", "anomaly_scores", "elbo_terms",
    "importance_log_likelihood", "log_likelihood",
    "VAE", "LIKELIHOODS", "Likelihood", "Encoder", "Decoder", "PRIORS", "Prior",
    "StandardNormalPrior", "LearnedGaussianPrior", "MixturePrior", "VampPrior", "FlowPrior",
    "StudentTPrior", "build_prior",
    "TrainResult", "fit", "train", "load_run",
    "measure_gradient_variance", "variance_experiment",
]
