"""Model loading and per-architecture knowledge."""

from .adapters import ADAPTERS, ArchitectureAdapter, adapter_for, config_fingerprint, supported_model_types
from .loading import LoadedModel, ModelSource, load_model, resolve_embedded_default

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "adapter_for",
    "config_fingerprint",
    "supported_model_types",
    "LoadedModel",
    "ModelSource",
    "load_model",
    "resolve_embedded_default",
]
