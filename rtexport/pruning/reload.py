"""Reading a pruned folder back: the manifest check, the model + tokenizer, and KV-cache accounting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactMismatch
from ..fsutil import read_artifact
from ..models.loading import parse_dtype, resolve_device
from .writer import MANIFEST_NAME, PRUNED_FORMAT


@dataclass
class PrunedModel:
    model: Any
    tokenizer: Any
    manifest: dict[str, Any]
    directory: Path

    @property
    def kv_layers(self) -> list[int]:
        return list(self.manifest["kv_layers"])


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """``rtexport_prune.json`` of a pruned folder, checked to be one (a clear error for anything else)."""
    directory = Path(directory)
    if not (directory / MANIFEST_NAME).is_file():
        raise ArtifactMismatch(f"{directory} is not a pruned model folder (no {MANIFEST_NAME})")
    manifest = read_artifact(directory / MANIFEST_NAME, what="pruned-model manifest", format=PRUNED_FORMAT)
    missing = [name for name in manifest.get("files", {}) if not (directory / name).is_file()]
    if missing:
        raise ArtifactMismatch(f"{directory} is incomplete: missing {', '.join(missing)}")
    return manifest


def load_pruned(
    directory: str | Path, *, dtype: str | torch.dtype | None = None, device: str | None = "cpu"
) -> PrunedModel:
    """Load a pruned folder the way its users do (``trust_remote_code=True``, the folder's own modeling code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    manifest = read_manifest(directory)
    torch_dtype = parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=True, dtype=torch_dtype or "auto")
    model.to(resolve_device(device)).eval()
    tokenizer = None
    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        # AutoTokenizer reads config.json first, whose auto_map needs the same trust as the model
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=True)
    return PrunedModel(model=model, tokenizer=tokenizer, manifest=manifest, directory=directory)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of a KV cache (a transformers Cache or legacy tuples)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    else:
        pairs = [tuple(entry[:2]) for entry in cache]
    total = 0
    for pair in pairs:
        for t in pair:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
