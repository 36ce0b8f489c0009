"""The model registry: promotion with a hold-out gate, fetch by stage or alias, serving."""

from registry.fetch import fetch_model

__all__ = ["fetch_model"]
