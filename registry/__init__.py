"""The model registry: promotion with a hold-out gate, fetch by stage or alias, serving."""

import warnings

# Stages are deprecated in MLflow 3 but our clients fetch by stage; aliases are kept in step with them.
warnings.filterwarnings("ignore", message=".*[Mm]odel registry stages.*", category=FutureWarning)

__all__ = ["fetch_model"]


def __getattr__(name: str):
    """``registry.fetch_model`` imported on first use: the CLI checks its arguments before MLflow is loaded."""
    if name == "fetch_model":
        from registry.fetch import fetch_model

        return fetch_model
    raise AttributeError(f"module 'registry' has no attribute {name!r}")
