"""Architecture adapters: the one place that knows where each model family keeps its layers and sub-blocks.

Nothing outside ``rtexport.models`` names a model family. Adding a family means adding one ``ArchitectureAdapter``
to ``ADAPTERS``; the tuner, the planner and the exporters only talk to the adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where a pre-norm decoder-only family keeps its parts (attribute paths relative to the CausalLM)."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary_emb: str = "model.rotary_emb"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # q/k/v/o projection names inside the attention module, gate/up/down inside the MLP
    attn_projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # per-head norms applied to q and k before the rotary embedding (used when ``qk_norm``)
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    # whether the attention has biases / per-head q,k norms (not expressible in the nemotron-nas form)
    attn_bias: bool = False
    qk_norm: bool = False
    is_moe: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- navigation -------------------------------------------------------------------------------------------
    @staticmethod
    def _get(root: nn.Module, path: str) -> Any:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._get(model, self.layers)

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def feed_forward(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def attention_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn_norm)

    def feed_forward_norm(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_norm)

    def rotary_embedding(self, model: nn.Module) -> nn.Module:
        return self._get(model, self.rotary_emb)

    @staticmethod
    def sliding_window(config: Any, layer_index: int) -> int | None:
        """The attention window of layer ``layer_index`` (``None``: full causal attention).

        Configs with ``layer_types`` window only their ``sliding_attention`` layers; configs without it window every
        layer when ``sliding_window`` is set.
        """
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        types = getattr(config, "layer_types", None)
        if types is not None:
            return int(window) if types[layer_index] == "sliding_attention" else None
        return int(window)

    @property
    def nemotron_nas_compatible(self) -> bool:
        """DeciLM/nemotron-nas layers are Llama layers: no attention bias, no q/k norm, dense MLP."""
        return not (self.attn_bias or self.qk_norm or self.is_moe)


ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(name="llama", model_types=("llama",)),
    ArchitectureAdapter(name="mistral", model_types=("mistral",)),
    ArchitectureAdapter(name="qwen2", model_types=("qwen2",), attn_bias=True),
    ArchitectureAdapter(name="qwen3", model_types=("qwen3",), qk_norm=True),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model or config; one clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if adapter.name == "qwen2" and getattr(config, "attention_bias", True) is False:
                return ArchitectureAdapter(name="qwen2", model_types=("qwen2",), attn_bias=False)
            if adapter.name == "llama" and getattr(config, "attention_bias", False):
                return ArchitectureAdapter(name="llama", model_types=("llama",), attn_bias=True)
            return adapter
    raise UnsupportedArchitecture(
        f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
    )


FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "tie_word_embeddings",
)


def config_fingerprint(model_or_config: Any) -> str:
    """A short hash of the architecture-defining config fields.

    Routers and plans carry it so that they cannot be applied to another model by mistake.
    """
    config = getattr(model_or_config, "config", model_or_config)
    values = {}
    for key in FINGERPRINT_KEYS:
        v = getattr(config, key, None)
        if key == "head_dim" and v is None:
            v = config.hidden_size // config.num_attention_heads
        if key == "num_key_value_heads" and v is None:
            v = config.num_attention_heads
        if isinstance(v, float):
            v = float(f"{v:.6g}")
        values[key] = v
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
