"""Model sources -> an architecture-neutral ModelSpec plus weights by role."""

from adaskip.model.spec import LoadedModel, ModelSpec
from adaskip.model.load import load_model

__all__ = ["LoadedModel", "ModelSpec", "load_model"]
