# Configuration of a pruned model written by rtexport.
#
# This file is copied into every pruned model folder and loaded through ``auto_map`` with
# ``trust_remote_code=True``; it imports only ``transformers`` so that it works without rtexport installed.
#
# The layout is the nemotron-nas (DeciLM) one that vLLM, TensorRT-LLM and llama.cpp load: one ``block_configs``
# entry per decoder layer, each with an ``attention`` and an ``ffn`` part; a part with ``no_op: true`` has no weights
# (and an attention no-op has no KV cache). Readers access the parts as attributes
# (``config.block_configs[i].attention.no_op``), so they are kept as small objects here and written back as dicts.
"""Configuration classes for rtexport's pruned (nemotron-nas / DeciLM layout) models."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

ROPE_TYPES = ("default", "linear", "llama3")


class _Part:
    """One part (attention or ffn) of a block config: attribute access for readers, a plain dict in JSON."""

    _fields: tuple[str, ...] = ()
    _optional: tuple[str, ...] = ()

    def __init__(self, **values: Any):
        for name in self._fields:
            setattr(self, name, values.pop(name, None))
        for name in self._optional:
            if values.get(name) is not None:
                setattr(self, name, values.pop(name))
            else:
                values.pop(name, None)
        # keys written by other tools are kept (and written back) but not interpreted
        self._extra = dict(values)
        for name, value in values.items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self._fields}
        for name in self._optional:
            if getattr(self, name, None) is not None:
                d[name] = getattr(self, name)
        d.update(self._extra)
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Part) and self.to_dict() == other.to_dict()


class AttentionBlockConfig(_Part):
    _fields = ("no_op", "replace_with_linear", "n_heads_in_group")


class FFNBlockConfig(_Part):
    # ``ffn_mult`` is the nemotron-nas way to give the width; ``intermediate_size`` (optional) states it directly
    _fields = ("no_op", "replace_with_linear", "ffn_mult")
    _optional = ("intermediate_size",)


class BlockConfig:
    def __init__(
        self, attention: dict[str, Any] | AttentionBlockConfig, ffn: dict[str, Any] | FFNBlockConfig, **extra: Any
    ):
        self.attention = attention if isinstance(attention, AttentionBlockConfig) else AttentionBlockConfig(**attention)
        self.ffn = ffn if isinstance(ffn, FFNBlockConfig) else FFNBlockConfig(**ffn)
        self._extra = dict(extra)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict(), **self._extra}

    def __repr__(self) -> str:
        return f"BlockConfig({self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockConfig) and self.to_dict() == other.to_dict()


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The nemotron-nas width rule (vLLM, llama.cpp DeciLM loaders): 2/3 * mult * hidden, up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - (n % 256)


def normalize_rope(rope_parameters: Any, rope_theta: Any, rope_scaling: Any) -> dict[str, Any]:
    """One flat dict with ``rope_type`` and ``rope_theta`` from the new (``rope_parameters``) or legacy fields."""
    params: dict[str, Any] = {}
    if isinstance(rope_scaling, dict):
        params.update(rope_scaling)
    if isinstance(rope_parameters, dict):
        params.update(rope_parameters)
    if "rope_type" not in params:
        params["rope_type"] = params.pop("type", "default")
    params.pop("type", None)
    if params.get("rope_theta") is None:
        params["rope_theta"] = float(rope_theta if rope_theta is not None else 10000.0)
    return params


class DeciLMConfig(PretrainedConfig):
    """A Llama-style decoder whose layers may drop their attention and/or feed-forward sub-block."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        block_configs: list[dict[str, Any]] | list[BlockConfig] | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.rope_parameters = normalize_rope(rope_parameters, rope_theta, rope_scaling)
        self.rope_theta = float(self.rope_parameters["rope_theta"])
        if block_configs is None:
            block_configs = [
                {
                    "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 1},
                    "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": 4.03125},
                }
                for _ in range(num_hidden_layers)
            ]
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs]
        if len(self.block_configs) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is {num_hidden_layers}"
            )
        self._read_extra_fields(kwargs)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _read_extra_fields(self, kwargs: dict[str, Any]) -> None:
        """Fields that only rtexport's own model type uses (see ``RtexportPrunedConfig``)."""

    # ---- derived views -----------------------------------------------------------------------------------------
    def num_kv_heads(self, layer_idx: int) -> int:
        return self.num_attention_heads // int(self.block_configs[layer_idx].attention.n_heads_in_group)

    def intermediate_size_of(self, layer_idx: int) -> int:
        ffn = self.block_configs[layer_idx].ffn
        if getattr(ffn, "intermediate_size", None) is not None:
            return int(ffn.intermediate_size)
        return ffn_mult_to_intermediate_size(float(ffn.ffn_mult), self.hidden_size)

    @property
    def kv_layers(self) -> list[int]:
        """Layers that run attention, hence keep a KV cache (in this order: cache slot k is ``kv_layers[k]``)."""
        return [i for i, b in enumerate(self.block_configs) if not b.attention.no_op]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["block_configs"] = [b.to_dict() for b in self.block_configs]
        return d


class RtexportPrunedConfig(DeciLMConfig):
    """rtexport's own model type, for layers the nemotron-nas form cannot express (biases, q/k norms, windows)."""

    model_type = "rtexport_pruned"

    def __init__(self, **kwargs: Any):
        # an explicit __init__: transformers replaces the __init__ of config subclasses that do not define one
        super().__init__(**kwargs)

    def _read_extra_fields(self, kwargs: dict[str, Any]) -> None:
        # q/k/v biases and the output-projection bias are separate switches (some families have one, not the other)
        self.attention_output_bias = bool(kwargs.pop("attention_output_bias", self.attention_bias))
        # per-head RMSNorm on q and k before the rotary embedding
        self.qk_norm = bool(kwargs.pop("qk_norm", False))
        # per-layer sliding attention window (None: full causal attention)
        windows = kwargs.pop("attention_windows", None)
        self.attention_windows = list(windows) if windows is not None else [None] * self.num_hidden_layers
