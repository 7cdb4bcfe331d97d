"""The model layer: networks, likelihoods, guide families, priors and the VAE's Pyro program.

Imports only :mod:`pyro_vae.config`, :mod:`pyro_vae.errors` and :mod:`pyro_vae.registry`.
"""

from .encoders import (
    BernoulliCode,
    CategoricalCode,
    DiagonalLaplace,
    DiagonalNormal,
    GuideFamily,
    build_guide_family,
)
from .likelihoods import (
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    GaussianLikelihood,
    Likelihood,
)
from .networks import ConvDecoder, ConvEncoder, Decoder, Encoder, build_networks
from .priors import (
    DiscreteLearnedPrior,
    DiscreteUniformPrior,
    FlowPrior,
    LearnedGaussianPrior,
    MixturePrior,
    Prior,
    StandardNormalPrior,
    StudentTPrior,
    VampPrior,
    build_prior,
)
from .vae import VAE

__all__ = [
    "GuideFamily", "DiagonalNormal", "DiagonalLaplace", "build_guide_family",
    "Likelihood", "BernoulliLikelihood", "ContinuousBernoulliLikelihood", "GaussianLikelihood",
    "Encoder", "Decoder", "ConvEncoder", "ConvDecoder", "build_networks",
    "Prior", "StandardNormalPrior", "LearnedGaussianPrior", "MixturePrior", "VampPrior",
    "FlowPrior", "StudentTPrior", "build_prior", "VAE",
    "BernoulliCode", "CategoricalCode", "DiscreteUniformPrior", "DiscreteLearnedPrior",
]
