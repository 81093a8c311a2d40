"""Pruning: a SkipPlan applied to a model, written as a self-contained folder (nemotron-nas form when possible)."""

from .reload import PrunedModel, kv_cache_bytes, load_pruned, read_manifest
from .writer import MANIFEST_NAME, NEMOTRON_NAS, OWN_MODEL_TYPE, ffn_mult_for, prune

__all__ = [
    "MANIFEST_NAME",
    "NEMOTRON_NAS",
    "OWN_MODEL_TYPE",
    "PrunedModel",
    "ffn_mult_for",
    "kv_cache_bytes",
    "load_pruned",
    "prune",
    "read_manifest",
]
