"""Optional LoRA adapters trained together with the routers (peft, injected in place; no wrapper class)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactMismatch, MissingDependency

LORA_WEIGHTS = "lora.safetensors"


def _peft():
    try:
        import peft
    except ImportError:
        raise MissingDependency("--lora needs peft: pip install 'rtexport[lora]'") from None
    return peft


def add_lora(
    model: torch.nn.Module, adapter: Any, r: int, alpha: int, targets: list[str] | None, seed: int
) -> tuple[dict[str, torch.nn.Parameter], dict[str, Any]]:
    """Inject LoRA into ``model``'s attention (default) projections; return its trainable parameters and config."""
    peft = _peft()
    targets = list(targets or adapter.attn_projections)
    info = {"r": r, "alpha": alpha, "target_modules": targets, "peft": peft.__version__}
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(config, model)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in params.values():
        p.requires_grad_(True)
    return params, info


def save_lora(params: dict[str, torch.nn.Parameter], directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    fd, tmp = tempfile.mkstemp(prefix=".lora.", suffix=".tmp", dir=directory)
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp)
    os.replace(tmp, directory / LORA_WEIGHTS)
    return directory / LORA_WEIGHTS


def load_lora(model: torch.nn.Module, adapter: Any, info: dict[str, Any], directory: str | Path) -> None:
    from safetensors.torch import load_file

    path = Path(directory) / LORA_WEIGHTS
    if not path.is_file():
        raise ArtifactMismatch(f"{directory}: router config names LoRA adapters but {LORA_WEIGHTS} is missing")
    params, _ = add_lora(model, adapter, info["r"], info["alpha"], info["target_modules"], 0)
    state = load_file(str(path))
    if set(state) != set(params):
        raise ArtifactMismatch(f"{path} does not match the model's LoRA modules")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
            params[k].requires_grad_(False)
