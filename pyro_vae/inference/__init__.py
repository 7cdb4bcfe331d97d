"""The inference layer: gradient estimators, the program's generic definitions, accelerators
and mixed precision. Imports the model layer and below, never training, metrics or the app."""

from . import estimators  # noqa: F401 - fills the ESTIMATORS registry
from .estimators import IWAE_ELBO, Estimator, score_function, sticking_the_landing
from .program import (
    ElboParts,
    ProgramStructure,
    ProgramTraces,
    SiteInfo,
    elbo_parts,
    inspect_program,
    log_weights,
    param_scope,
    trace_program,
)

__all__ = ["Estimator", "IWAE_ELBO", "score_function", "sticking_the_landing", "ElboParts",
           "ProgramStructure", "ProgramTraces", "SiteInfo", "elbo_parts", "inspect_program",
           "log_weights", "param_scope", "trace_program"]
