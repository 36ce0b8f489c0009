"""The model registry: promotion with a hold-out gate, fetch by stage or alias, serving."""

import warnings

# Stages are deprecated in MLflow 3 but our clients fetch by stage; aliases are kept in step with them.
warnings.filterwarnings("ignore", message=".*[Mm]odel registry stages.*", category=FutureWarning)

from registry.fetch import fetch_model  # noqa: E402

__all__ = ["fetch_model"]
