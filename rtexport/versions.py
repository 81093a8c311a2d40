"""Versions and device description recorded in every artifact."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

PACKAGES = ("rtexport", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "safetensors", "peft")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def device_description(device: Any = None) -> dict[str, Any]:
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return {
            "type": "cuda",
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
