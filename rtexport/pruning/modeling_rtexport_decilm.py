# Modeling code of a pruned model written by rtexport.
#
# This file is copied into every pruned model folder and loaded through ``auto_map`` with
# ``trust_remote_code=True``. It imports only ``torch`` and ``transformers`` (it is shipped to people who never
# install rtexport) and is self-contained: RMSNorm, rotary embedding (default, linear and llama3 scaling), grouped-query
# attention through ``torch.nn.functional.scaled_dot_product_attention``, gated MLP.
#
# Decoder layers follow the nemotron-nas (DeciLM) layout: a layer whose ``attention.no_op`` is set has no attention
# weights and keeps no KV cache; a layer whose ``ffn.no_op`` is set has no feed-forward weights. The KV cache (a
# transformers ``DynamicCache``, or a ``StaticCache`` for compiled decoding: ``generate(cache_implementation="static")``
# or ``model.make_static_cache``) holds one entry per *kept* attention layer: kept layer ``config.kv_layers[k]`` writes
# cache slot ``k``.
"""A Llama-style decoder with per-layer no-op attention / feed-forward sub-blocks (rtexport pruned models)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_rtexport_decilm import DeciLMConfig, RtexportPrunedConfig


def _cache_field(output_class: type) -> str:
    """transformers renamed the outputs' cache field from ``past_key_values`` to ``cache``; use whichever exists."""
    return "cache" if "cache" in getattr(output_class, "__dataclass_fields__", {}) else "past_key_values"


_MODEL_CACHE_FIELD = _cache_field(BaseModelOutputWithPast)
_LM_CACHE_FIELD = _cache_field(CausalLMOutputWithPast)


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5 on
_SDPA_HAS_GQA = _torch_at_least(2, 5)


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rope_inverse_frequencies(config: DeciLMConfig) -> torch.Tensor:
    """Inverse frequencies (float32, on the CPU) for the config's RoPE type: default, linear or llama3."""
    params = config.rope_parameters
    rope_type = params.get("rope_type", "default")
    base = float(params["rope_theta"])
    dim = int(config.head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params.get("original_max_position_embeddings") or config.max_position_embeddings)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * torch.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_type {rope_type!r}: this modeling code knows default, linear and llama3")


class DeciLMRotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of the current tokens (no buffers: nothing to save or to re-initialise)."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self._config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inverse_frequencies(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inverse_frequencies(self._config).to(device)
        return self._inv_freq[device]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inverse_frequencies(x.device)
        freqs = position_ids[..., None].to(torch.float32) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, S, D) -> (B, kv_heads * n_rep, S, D), each KV head repeated for its group of query heads."""
    if n_rep == 1:
        return hidden_states
    b, kv, s, d = hidden_states.shape
    return hidden_states[:, :, None, :, :].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


class DeciLMAttention(nn.Module):
    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: int):
        super().__init__()
        block = config.block_configs[layer_idx].attention
        if block.replace_with_linear:
            raise NotImplementedError("attention replace_with_linear is not supported by this modeling code")
        self.layer_idx = layer_idx
        self.cache_slot = cache_slot
        self.head_dim = int(config.head_dim)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = config.num_kv_heads(layer_idx)
        self.num_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        qkv_bias = bool(config.attention_bias)
        out_bias = bool(getattr(config, "attention_output_bias", config.attention_bias))
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=out_bias)
        if getattr(config, "qk_norm", False):
            self.q_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None,
    ) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_slot)
        if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != q.dtype:
            attention_mask = attention_mask.to(q.dtype)
        if self.num_groups > 1 and attention_mask is None and _SDPA_HAS_GQA:
            # grouped-query attention inside the kernel (flash / efficient), no copies of K/V per query head
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=is_causal, scale=self.scaling, enable_gqa=True
            )
        else:
            # with a mask the GQA kernels are not available: repeat K/V per query head (as transformers does)
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k, self.num_groups), repeat_kv(v, self.num_groups), attn_mask=attention_mask,
                is_causal=is_causal, scale=self.scaling,
            )
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, layer_idx: int):
        super().__init__()
        block = config.block_configs[layer_idx].ffn
        if block.replace_with_linear:
            raise NotImplementedError("ffn replace_with_linear is not supported by this modeling code")
        size = config.intermediate_size_of(layer_idx)
        bias = bool(config.mlp_bias)
        self.gate_proj = nn.Linear(config.hidden_size, size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, size, bias=bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[getattr(block, "hidden_act", None) or config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMDecoderLayer(nn.Module):
    """Pre-norm residual layer; either sub-block may be a no-op (no weights, no compute, no cache)."""

    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_slot: int | None):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.layer_idx = layer_idx
        self.attention_no_op = bool(block.attention.no_op)
        self.ffn_no_op = bool(block.ffn.no_op)
        windows = getattr(config, "attention_windows", None)
        self.attention_window = windows[layer_idx] if windows is not None else None
        if not self.attention_no_op:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, layer_idx, cache_slot)
        if not self.ffn_no_op:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None,
        is_causal: bool,
        cache: Cache | None,
    ) -> torch.Tensor:
        if not self.attention_no_op:
            hidden_states = hidden_states + self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings, attention_mask, is_causal, cache
            )
        if not self.ffn_no_op:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


def window_key(window: int | None) -> str:
    """Key of a window's mask in the dict of masks handed to ``forward`` (layers with different windows)."""
    return "full" if window is None else f"window_{window}"


def static_attention_mask(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int | torch.Tensor,
    capacity: int,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (B, 1, T, capacity) mask, True = attend, for a static cache whose K/V span ``capacity`` slots.

    Slot j holds the token at position j; slots past the last written one are masked by causality. ``past_length``
    may be a 0-d tensor (a static cache keeps its fill level on the device): everything here is tensor arithmetic, so
    the mask costs no host synchronisation and has the same shape at every decode step (one compiled / captured graph).
    ``attention_mask`` is an optional 2-D padding mask over the tokens seen so far (1 = real token).
    """
    q_idx = (torch.arange(query_length, device=device) + past_length)[:, None]
    k_idx = torch.arange(capacity, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None].expand(batch_size, 1, query_length, capacity)
    if attention_mask is not None:
        pad = attention_mask.to(device=device, dtype=torch.bool)
        if pad.shape[-1] > capacity:
            raise ValueError(f"attention_mask covers {pad.shape[-1]} tokens, but the static cache holds {capacity}")
        if pad.shape[-1] < capacity:
            pad = torch.cat([pad, pad.new_ones(pad.shape[0], capacity - pad.shape[-1])], dim=-1)
        allowed = allowed & pad[:, None, None, :]
    # A query with nothing to attend to (a left-padding position) attends to itself (see attention_mask_for_sdpa).
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (k_idx == q_idx))


def attention_mask_for_sdpa(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    query_length: int,
    past_length: int | torch.Tensor,
    window: int | None,
    device: torch.device,
    capacity: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for ``scaled_dot_product_attention``; the mask is boolean (B, 1, T, S), True = attend.

    ``attention_mask`` is the usual 2-D padding mask over cached + new tokens (1 = real token), or a ready 4-D mask.
    ``capacity`` is the length of a static cache's K/V buffers (None for a cache that grows, or no cache): attention
    then spans every slot, written or not, and the mask is always explicit (``static_attention_mask``).
    Without a static cache, padding or a window, plain causal attention needs no mask at all.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    if capacity is not None:
        return static_attention_mask(
            attention_mask, batch_size, query_length, past_length, capacity, window, device
        ), False
    kv_length = past_length + query_length
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, but the cache holds {past_length} and "
                f"{query_length} are new"
            )
        padded = not bool(attention_mask.all())
    else:
        padded = False
    windowed = window is not None and window < kv_length
    if not padded and not windowed:
        if query_length == 1:
            return None, False
        if past_length == 0:
            return None, True
    q_idx = torch.arange(past_length, kv_length, device=device)[:, None]
    k_idx = torch.arange(kv_length, device=device)[None, :]
    allowed = k_idx <= q_idx
    if windowed:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None].expand(batch_size, 1, query_length, kv_length)
    if padded:
        allowed = allowed & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)
    # A query with nothing to attend to (a left-padding position) attends to itself: its output is never used, but an
    # all-masked row gives NaN, which later layers would multiply by a zero attention weight and spread.
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (empty & (k_idx == q_idx)), False


def fit_cache(cache: Cache, kv_slots: int) -> Cache:
    """Make ``cache`` hold exactly one entry per kept attention layer.

    ``generate`` builds its cache (``DynamicCache``, or ``StaticCache`` for ``cache_implementation="static"``) from
    the config, one empty, lazily allocated entry per decoder layer; this model keeps K/V only for the kept attention
    layers, in slots 0..kv_slots-1, so the unused trailing entries are dropped before anything is written (a cache
    already holding tensors there belongs to another model: an error). Nothing is ever allocated for them.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"pass the KV cache as a transformers Cache (e.g. DynamicCache), not {type(cache).__name__}")
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list) and len(layers) > kv_slots:
        if any(getattr(layer, "is_initialized", False) for layer in layers[kv_slots:]):
            raise ValueError(
                f"this cache holds key/values for {len(layers)} layers, but this model keeps "
                f"{kv_slots} attention layers"
            )
        del layers[kv_slots:]
    return cache


def static_capacity(cache: Cache | None) -> int | None:
    """Length of a static cache's K/V buffers; None for a cache that grows with the sequence (or no cache)."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    layer = layers[0]
    get_max_length = getattr(layer, "get_max_length", None)
    length = get_max_length() if callable(get_max_length) else getattr(layer, "max_cache_len", None)
    return int(length) if isinstance(length, int) and length > 0 else None


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        slots = {layer: slot for slot, layer in enumerate(config.kv_layers)}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DeciLMDecoderLayer(config, i, slots.get(i)) for i in range(config.num_hidden_layers)]
        )
        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        # plain Python facts, read once (a compiled forward then guards on two constants, not on the whole config)
        self.kv_slots = len(slots)
        self.attention_windows = tuple(
            dict.fromkeys(layer.attention_window for layer in self.layers if not layer.attention_no_op)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def static_cache_masks(
        self,
        batch_size: int,
        query_length: int,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        device: torch.device,
    ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """The 4-D masks for the next forward through a static ``cache`` (what ``generate`` prepares per step).

        One boolean mask, or one per attention window (keyed by ``window_key``) when kept layers differ in window.
        ``attention_mask`` is 2-D over the tokens seen so far, including the ``query_length`` new ones.
        """
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if cache is None or not self.kv_slots:
            return attention_mask
        cache = fit_cache(cache, self.kv_slots)
        capacity = static_capacity(cache)
        if capacity is None:
            return attention_mask
        if attention_mask is not None:
            past_length: int | torch.Tensor = attention_mask.shape[-1] - query_length
        else:
            past_length = cache.get_seq_length()
        masks = {
            window_key(window): static_attention_mask(
                attention_mask, batch_size, query_length, past_length, capacity, window, device
            )
            for window in self.attention_windows
        }
        return next(iter(masks.values())) if len(masks) == 1 else masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported (attention runs through scaled_dot_product_attention)")
        if cache is None:
            cache = past_key_values
        elif past_key_values is not None and past_key_values is not cache:
            raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        kv_slots = self.kv_slots
        if cache is not None:
            cache = fit_cache(cache, kv_slots)
        batch_size, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        with_cache = cache is not None and kv_slots > 0
        # an int for a growing cache; a 0-d device tensor for a static one (no host sync in a compiled decode step)
        past_length = cache.get_seq_length() if with_cache else 0
        capacity = static_capacity(cache) if with_cache else None
        if position_ids is None:
            position_ids = (torch.arange(query_length, device=device) + past_length).unsqueeze(0)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if kv_slots else None
        masks: dict[int | None, tuple[torch.Tensor | None, bool]] = {}
        for window in self.attention_windows:
            if isinstance(attention_mask, dict):
                masks[window] = (attention_mask[window_key(window)], False)
            else:
                masks[window] = attention_mask_for_sdpa(
                    attention_mask, batch_size, query_length, past_length, window, device, capacity
                )

        hidden_states = inputs_embeds
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden += (hidden_states,)
            mask, is_causal = masks.get(layer.attention_window, (None, False))
            hidden_states = layer(hidden_states, position_embeddings, mask, is_causal, cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden, **{_MODEL_CACHE_FIELD: cache}
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @property
    def kv_layers(self) -> list[int]:
        """Decoder layers that keep a KV cache; cache slot k belongs to layer ``kv_layers[k]``."""
        return self.config.kv_layers

    def make_static_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Cache:
        """A transformers ``StaticCache`` with ``max_length`` slots for each *kept* attention layer, allocated now.

        Pass it as ``past_key_values`` to ``generate`` (which then compiles the decode step, as for
        ``cache_implementation="static"``) or to ``forward``. Layers without attention get no entry and no memory.
        """
        cache = fit_cache(StaticCache(config=self.config, max_cache_len=max_length), self.model.kv_slots)
        kept = self.config.kv_layers
        if kept:
            cache.early_initialization(
                batch_size=batch_size,
                num_heads=[self.config.num_kv_heads(i) for i in kept],
                head_dim=[int(self.config.head_dim)] * len(kept),
                dtype=dtype or self.dtype,
                device=torch.device(device) if device is not None else self.device,
            )
        return cache

    def create_masks_for_generate(
        self,
        config: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """``generate``'s hook for static caches: the 4-D masks this model attends with, sized to the cache.

        They have the same shape at every decode step, so the compiled step is traced once; per-layer windows are
        honoured (transformers' own mask builder does not know this config's windows).
        """
        batch_size, query_length = inputs_embeds.shape[:2]
        return self.model.static_cache_masks(
            batch_size, query_length, attention_mask, cache if cache is not None else past_key_values,
            inputs_embeds.device,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            cache=cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep > 0 else slice(None)
            hidden_states = hidden_states[:, keep, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100
            )
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_LM_CACHE_FIELD: getattr(outputs, _MODEL_CACHE_FIELD)},
        )
        if return_dict is False:
            return out.to_tuple()
        return out


class RtexportPrunedModel(DeciLMModel):
    """The decoder stack under rtexport's own model type (what ``AutoModel`` loads from such a folder)."""

    config_class = RtexportPrunedConfig


class RtexportPrunedForCausalLM(DeciLMForCausalLM):
    """The same model under rtexport's own model type (layers the nemotron-nas form cannot express)."""

    config_class = RtexportPrunedConfig
