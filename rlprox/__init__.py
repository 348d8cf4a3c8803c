"""rlprox: policy-optimization training on one accelerate engine."""

__version__ = "0.1.0"

__all__ = ["load_policy"]


def __getattr__(name: str):
    # lazy: `import rlprox` (and the CLI) stays free of torch until a policy is loaded
    if name == "load_policy":
        from rlprox.policy import load_policy

        return load_policy
    raise AttributeError(f"module 'rlprox' has no attribute {name!r}")
