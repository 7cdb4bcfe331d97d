"""The lab: gradient-variance measurement of the estimators, and the experiment around it."""

from .experiment import variance_experiment, variance_rows
from .variance import gradient_draws, measure_gradient_variance, oracle_gradient

__all__ = ["measure_gradient_variance", "gradient_draws", "oracle_gradient",
           "variance_experiment", "variance_rows"]
