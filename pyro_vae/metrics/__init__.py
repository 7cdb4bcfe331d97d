"""The metrics layer: measurements of a trained VAE, tensors in and numbers out, no files.

Every number is read off the traces of the VAE's Pyro program
(:mod:`pyro_vae.inference.program`); accelerators speed some up where the program has their
structure (:mod:`pyro_vae.inference.accelerators`).
"""

from .anomaly import SCORE_METHODS, anomaly_scores, auroc
from .elbo import ElboTerms, bits_per_dim, elbo_per_image, elbo_terms
from .latent import active_units, interpolate, latent_activity, manifold, pca, tsne
from .loglik import LogLikelihood, importance_log_likelihood, log_likelihood

__all__ = ["ElboTerms", "elbo_per_image", "elbo_terms", "bits_per_dim", "LogLikelihood",
           "importance_log_likelihood", "log_likelihood", "latent_activity", "active_units",
           "interpolate", "manifold", "pca", "tsne", "anomaly_scores", "auroc", "SCORE_METHODS"]
