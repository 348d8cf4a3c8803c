"""rlprox: policy-optimization training on one accelerate engine."""

__version__ = "0.1.0"
