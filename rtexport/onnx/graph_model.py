"""An export-friendly functional decoder built from a Hugging Face causal LM's weights.

``DecoderGraph`` recomputes the model's forward from the parts the ``ArchitectureAdapter`` names (embedding,
per-layer norms, q/k/v/o projections with their biases and q/k norms, the MLP module, final norm, LM head, rotary
embedding), with the KV cache passed as flat tensors of shape ``(batch, kv_heads, past, head_dim)`` and an explicit
attention that builds its additive mask from ``attention_mask`` (left or right padding) and the cache positions.

Two layouts (``GraphSpec``):

* static: only the sub-blocks a ``SkipPlan`` keeps exist; a layer without attention has no KV input or output.
* gated: the decoder sits in a ``torch.cond`` (an ONNX ``If``) on a prefill flag computed from input shapes, and
  each routed sub-block in its own ``If`` inside either branch. Prefill branch: the router decides per sequence
  (where ``routing_decisions`` allows the layer) and the sub-block's ``If`` runs it only when some sequence needs
  it, masking its output per sequence. Decode branch:
  the sub-block's ``If`` on the host input ``run_layer.{i}`` with the held decisions (``routing_decisions``). See
  ``README-gated.md``.

Attention (``attention=``): ``"explicit"`` (MatMul/Softmax/MatMul, KV heads repeated) or ``"fused"`` (opset 23:
ONNX ``RotaryEmbedding`` and ``Attention`` nodes on the (B, T, heads x d) projections, the ``Attention`` taking the
past K/V and returning the present; models with per-head q/k norms or a partial rotary use
``scaled_dot_product_attention`` with grouped KV heads, which torch.onnx also turns into one ``Attention`` node).

``"gqa"`` (preallocated cache only; ONNX Runtime only): one ``com.microsoft::GroupQueryAttention`` node per layer
on the rotated (B, T, heads x d) projections, the past buffers shared with the presents. Each sequence's tokens are
packed from slot 0 of its buffers (a batched prompt is right-padded), ``attention_mask`` marks the slots that hold
real tokens, ``seqlens_k`` (their count - 1) and ``total_sequence_length`` (the mask's width: the prompt's length at
prefill, the buffer's at decode) are computed from it. The op then writes the step's K/V at each sequence's own
slots, and no additive mask exists: ORT's CUDA kernels see the causal structure and the lengths.

KV cache (``kv_cache=``, static graphs): ``"growing"`` (the present is the past with this step's K/V appended, as ORT
GenAI and optimum name them) or ``"preallocated"`` (opset 24: each past is a buffer of the whole generation's length,
written in place by one ONNX ``TensorScatter`` per K and V at ``cache_position``; the attention reads the buffer
under a mask built from ``attention_mask`` over the buffer and ``cache_position``). A preallocated graph's decode step
has the same shapes at every step, so ONNX Runtime can capture it once as a CUDA graph and replay it.

Host/device rule for ONNX Runtime's CUDA EP: values derived from input shapes live on the host. They may be used as
shape-like inputs (Range bounds, Slice starts, Reshape shapes) and as ``If`` conditions, never as operands of
element-wise arithmetic on device tensors (each such use is a host-to-device Memcpy at every step).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactMismatch, UnsupportedArchitecture
from ..models.adapters import ArchitectureAdapter

MODES = ("static", "gated")
KV_CACHES = ("growing", "preallocated")
# which positions get logits: "all" (``logits`` is (B, T, V), the layout ORT GenAI and optimum read) or "selected"
# (a ``logits_positions`` (B, K) input names them and ``logits`` is (B, K, V): a generate loop asks for the last
# position only, so a prefill runs the LM head on one position, not on the whole prompt, as
# ``logits_to_keep=1`` does in transformers; ONNX Runtime runs every node of a graph whatever outputs are fetched)
LOGITS = ("all", "selected")
PREALLOCATED_OPSET = 24  # ONNX TensorScatter (the in-place KV write) is opset 24
EXPORT_DOMAIN = "rtexport"  # ops traced under this domain get their ONNX domain back after export
TARGETS = ("attn", "mlp", "block")
# "explicit": MatMul/Softmax/MatMul with the KV heads repeated (any opset); "fused": one
# ``torch.nn.functional.scaled_dot_product_attention`` per layer, which torch.onnx (opset >= 23) exports as one ONNX
# ``Attention`` node (grouped-query heads and the additive mask inside the node)
# "gqa": ONNX Runtime's contrib ``GroupQueryAttention`` (com.microsoft), on a preallocated cache only: the op
# writes the step's K/V into the buffers itself and knows the causal structure and each sequence's length, so ORT's
# CUDA EP runs flash attention at prefill and its fused decode kernels at decode, with no mask tensor at all
ATTENTION_KINDS = ("explicit", "fused", "gqa")
GQA_DOMAIN = "com.microsoft"
# how a gated graph picks the router's decision (prefill) or the held one (decode): "cond", an ONNX If on the
# host-side prefill flag around the decoder (no host-to-device copy, routers not run at decode; needs torch >= 2.13's
# exporter), or "logical", and/or of the flag with both (one small host-to-device copy of the flag per step; any torch)
PREFILL_SELECTS = ("cond", "logical")
# a routed layer whose router runs it for at least this fraction of held-out sequences runs at prefill without an
# ``If`` (``prefill_always="auto"``): an ``If`` at prefill costs a device-to-host copy and the device's wait for the
# host every time, running the block for a batch that skips it costs its compute only then (GraphSpec.prefill_always)
PREFILL_ALWAYS_RATE = 0.9


@dataclass(frozen=True)
class GraphSpec:
    """Which parts of which layers the exported graph contains, and which of them are routed."""

    mode: str
    num_layers: int
    attention_layers: tuple[int, ...]
    mlp_layers: tuple[int, ...]
    routed_layers: tuple[int, ...] = ()
    target: str = "attn"
    threshold: float = 0.5
    sliding_windows: dict[int, int] = field(default_factory=dict)
    # routed layers whose sub-block runs at prefill for the whole batch, with no ``If``, each sequence keeping its
    # output only where its router says run (exact whatever the routers decide); the others run inside an ``If`` on
    # "some sequence runs it". After prefill every routed layer is in an ``If`` on its host flag.
    prefill_always: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ArtifactMismatch(f"export mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise ArtifactMismatch(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.mode == "static" and self.routed_layers:
            raise ArtifactMismatch("a static graph has no routed layers")
        for i in self.routed_layers:
            needs = {"attn": [self.attention_layers], "mlp": [self.mlp_layers],
                     "block": [self.attention_layers, self.mlp_layers]}[self.target]
            if any(i not in group for group in needs):
                raise ArtifactMismatch(f"layer {i} is routed but its {self.target} sub-block is not in the graph")
        stray = sorted(set(self.prefill_always) - set(self.routed_layers))
        if stray:
            raise ArtifactMismatch(f"prefill_always names layers {stray}, which are not routed "
                                   f"(routed: {list(self.routed_layers)})")

    # KV layout: every layer with attention has one past/present pair, named by its index in the original model
    @property
    def kv_layers(self) -> list[int]:
        return sorted(self.attention_layers)

    def routes_attention(self, layer: int) -> bool:
        return layer in self.routed_layers and self.target in ("attn", "block")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_windows"] = {str(k): v for k, v in self.sliding_windows.items()}
        d["kv_layers"] = self.kv_layers
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphSpec":
        return cls(
            mode=d["mode"],
            num_layers=int(d["num_layers"]),
            attention_layers=tuple(int(i) for i in d["attention_layers"]),
            mlp_layers=tuple(int(i) for i in d["mlp_layers"]),
            routed_layers=tuple(int(i) for i in d.get("routed_layers", ())),
            target=d.get("target", "attn"),
            threshold=float(d.get("threshold", 0.5)),
            sliding_windows={int(k): int(v) for k, v in d.get("sliding_windows", {}).items()},
            prefill_always=tuple(int(i) for i in d.get("prefill_always", ())),
        )


def build_spec(
    config: Any,
    adapter: ArchitectureAdapter,
    *,
    mode: str,
    skip: list[int] | None = None,
    skip_target: str = "attn",
    routed_layers: list[int] | None = None,
    routed_target: str = "attn",
    threshold: float = 0.5,
) -> GraphSpec:
    """The graph layout for a model: ``skip`` sub-blocks of kind ``skip_target`` are left out; in gated mode the
    ``routed_layers`` sub-blocks of kind ``routed_target`` go in an ``If`` each."""
    n = int(config.num_hidden_layers)
    skip = sorted(set(int(i) for i in (skip or [])))
    attn = [i for i in range(n) if not (skip_target in ("attn", "block") and i in skip)]
    mlp = [i for i in range(n) if not (skip_target in ("mlp", "block") and i in skip)]
    routed: list[int] = []
    target = skip_target
    if mode == "gated":
        target = routed_target
        removed = set(skip) if skip_target in (routed_target, "block") else set()
        routed = [int(i) for i in (routed_layers or []) if int(i) not in removed]
        if not routed:
            raise ArtifactMismatch("gated export needs routers on at least one layer that the plan keeps")
    windows = {i: w for i in range(n) if (w := adapter.sliding_window(config, i))}
    return GraphSpec(
        mode=mode,
        num_layers=n,
        attention_layers=tuple(attn),
        mlp_layers=tuple(mlp),
        routed_layers=tuple(sorted(routed)),
        target=target,
        threshold=float(threshold),
        sliding_windows=windows,
    )


def prefill_always_from_rates(execution_rates: dict[str, float] | dict[int, float], routed_layers: list[int],
                              rate: float = PREFILL_ALWAYS_RATE) -> list[int]:
    """The routed layers that run without an ``If`` at prefill by the routers' measured execution rates (the
    fraction of held-out sequences whose router runs each layer, ``RouterConfig.execution_rates``): those at
    ``rate`` or above. No rates (routers not measured): none."""
    rates = {int(k): float(v) for k, v in (execution_rates or {}).items()}
    return [i for i in routed_layers if rates.get(i, 0.0) >= rate]


class _Layer(nn.Module):
    """The parts of one decoder layer that the graph uses (references to the HF modules, not copies)."""

    def __init__(self, layer: nn.Module, adapter: ArchitectureAdapter, has_attn: bool, has_mlp: bool):
        super().__init__()
        self.has_attn = has_attn
        self.has_mlp = has_mlp
        if has_attn:
            attn = adapter.attention(layer)
            self.attn_norm = adapter.attention_norm(layer)
            q, k, v, o = (getattr(attn, name) for name in adapter.attn_projections)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o
            if adapter.qk_norm:
                self.q_norm = getattr(attn, adapter.qk_norm_names[0])
                self.k_norm = getattr(attn, adapter.qk_norm_names[1])
            self.scaling = float(getattr(attn, "scaling", 0.0)) or None
        if has_mlp:
            self.mlp_norm = adapter.feed_forward_norm(layer)
            self.mlp = adapter.feed_forward(layer)
        self.router: nn.Linear | None = None


def _has_onnx_rotary() -> bool:
    """torch's registered ONNX ``RotaryEmbedding`` op (``torch.onnx.ops``, exported as the opset-23 node)."""
    try:
        import torch.onnx.ops  # noqa: F401  (registers torch.ops.onnx.*)

        return hasattr(torch.ops.onnx.RotaryEmbedding, "opset23")
    except (ImportError, AttributeError):
        return False


def _caches_nonempty(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A sub-block ``If``'s outputs, with a note for the exporter when it nests that ``If`` in another.

    The branches give the present different lengths (taken: past + new tokens; skipped: the past, often empty), so
    the tracer gives it a fresh size. Returning it through the outer ``If`` makes the tracer ask whether that size is
    0 (to merge the two branches' strides), which it cannot decide: state that it is not. Only while exporting, so
    the check adds nothing to the graph and an eager run with an empty cache is not refused.
    """
    if torch.compiler.is_exporting():
        for cache in outputs[1:]:
            torch._check(cache.shape[2] >= 1)
    return outputs


def _is_prefill(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """() bool: no cache yet (the mask is as long as the new tokens). Computed from input shapes, so ONNX Runtime
    holds it on the host, where an ``If`` reads its condition."""
    past_len = attention_mask.shape[1] - input_ids.shape[1]
    return (torch.zeros((), dtype=torch.int64, device=input_ids.device) + past_len) == 0


def _write_cache(buffer: torch.Tensor, update: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """``buffer`` (B, kv, L, d) with ``update`` (B, kv, T, d) written at slots ``cache_position`` (T,) (consecutive,
    the same for every sequence). Exported as one ONNX ``TensorScatter`` (opset 24) at the first slot, which ONNX
    Runtime runs in place when the caller binds the present to the past's buffer.

    The exporter writes it as ``rtexport::TensorScatter`` and ``export.py`` moves it to the ONNX domain while it
    declares opset 24: exporting at opset 24 directly would lose the opset-23 ``RMSNormalization`` nodes (torch's
    exporter decomposes ``rms_norm`` there), and opset 23 has no ``TensorScatter``."""
    if torch.compiler.is_exporting():
        from torch.onnx import ops as onnx_ops  # exporting only: symbolic() emits a node as it is given

        start = cache_position[:1].expand(buffer.shape[0])
        return onnx_ops.symbolic(f"{EXPORT_DOMAIN}::TensorScatter", [buffer, update, start], attrs={"axis": 2},
                                 dtype=buffer.dtype, shape=buffer.shape, version=1)
    return buffer.index_copy(2, cache_position, update)


def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor, *, num_heads: int,
                          kv_num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's ``com.microsoft::GroupQueryAttention`` with past and present sharing one buffer: exported as
    that node, computed here as the op defines it.

    ``q`` (B, S, heads x d), ``k``/``v`` (B, S, kv x d), both rotated; ``past_k``/``past_v`` (B, kv, L, d) buffers;
    ``seqlens_k`` (B,) int32, each sequence's tokens after this step - 1; ``total`` () int32. ``S == total`` is a
    first prompt: the new K/V go to slots 0..S-1 of every sequence (right padding). Otherwise the step's tokens are
    each sequence's last ``S``: slots ``seqlens_k - S + 1 .. seqlens_k``. A query attends the slots up to its own
    that hold its sequence's tokens. Returns ``(output (B, S, heads x d), present_k, present_v)``.
    """
    if torch.compiler.is_exporting():
        from torch.onnx import ops as onnx_ops  # exporting only: symbolic() emits a node as it is given

        return tuple(onnx_ops.symbolic_multi_out(
            f"{GQA_DOMAIN}::GroupQueryAttention", [q, k, v, past_k, past_v, seqlens_k, total],
            attrs={"num_heads": num_heads, "kv_num_heads": kv_num_heads, "scale": float(scale)},
            dtypes=[q.dtype, past_k.dtype, past_v.dtype], shapes=[q.shape, past_k.shape, past_v.shape], version=1))
    b, s = q.shape[0], q.shape[1]
    d, length = past_k.shape[3], past_k.shape[2]
    lengths = seqlens_k.to(torch.int64) + 1
    first = s == int(total)
    start = torch.zeros_like(lengths) if first else lengths - s
    slots = start[:, None] + torch.arange(s, device=q.device)  # (B, S)
    index = slots[:, None, :, None].expand(b, kv_num_heads, s, d)
    keys = past_k.scatter(2, index, k.view(b, s, kv_num_heads, d).transpose(1, 2).to(past_k.dtype))
    values = past_v.scatter(2, index, v.view(b, s, kv_num_heads, d).transpose(1, 2).to(past_v.dtype))
    k_slot = torch.arange(length, device=q.device)
    allowed = (k_slot[None, None, :] <= slots[:, :, None]) & (k_slot[None, None, :] < lengths[:, None, None])
    groups = num_heads // kv_num_heads
    qh = q.view(b, s, num_heads, d).transpose(1, 2).to(torch.float32)
    kh = keys.to(torch.float32).repeat_interleave(groups, dim=1)
    vh = values.to(torch.float32).repeat_interleave(groups, dim=1)
    scores = (qh @ kh.transpose(2, 3)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh
    return out.transpose(1, 2).reshape(b, s, num_heads * d).to(q.dtype), keys, values


def router_logit_limit(threshold: float) -> float:
    """The router logit at which ``sigmoid(logit) >= threshold`` starts to hold: logit(threshold); -inf for a
    threshold at or below 0 (every sequence runs), +inf at or above 1 (none does)."""
    if threshold <= 0.0:
        return float("-inf")
    if threshold >= 1.0:
        return float("inf")
    return math.log(threshold / (1.0 - threshold))


def _mean_weights(attention_mask: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T) in ``dtype``: each of this step's ``seq_len`` positions' weight in its sequence's mean over its real
    tokens (1/count on real tokens, 0 on padding). Computed once per step for every router: a router's masked mean
    is then one (B,1,T)x(B,T,hidden) matrix product of the activations as they are (ONNX Runtime's CUDA half GEMM
    accumulates in float32 by default: its ``HalfGemmOptions``, CUBLAS_COMPUTE_32F), not a float32 copy of them
    scaled, summed and divided per routed layer."""
    pad = attention_mask[:, attention_mask.shape[1] - seq_len:].to(torch.float32)
    return (pad / pad.sum(dim=1, keepdim=True).clamp_min(1.0))[:, None, :].to(dtype)


class DecoderGraph(nn.Module):
    """The model as ONNX will see it. Inputs and outputs, in order:

    ``input_ids`` (B,T) int64, ``attention_mask`` (B,P+T) int64, ``position_ids`` (B,T) int64,
    ``past_key_values.{i}.key|value`` (B,kv,P_i,d) for each layer ``i`` with attention,
    gated only: ``routing_decisions`` (B,R) bool (at prefill: which sequences may run each routed layer; after:
    the held decisions) and ``run_layer.{i}`` () bool for each routed layer ``i`` (read after prefill only; the
    ``logical`` layout reads it at every step),
    preallocated cache only: ``cache_position`` (T,) int64, the buffer slots this step writes,
    selected logits only: ``logits_positions`` (B,K) int64, the positions (0..T-1) of this step's tokens to score
    → ``logits`` (B,T,V) (selected logits: (B,K,V)), ``present.{i}.key|value``, gated only: ``decisions`` (B,R) bool, ``last_logits``
    (B,V), the last position's logits, and ``next_token`` (B,1) int64, their argmax (the greedy next token, chosen on
    the device: a greedy loop copies 8 bytes per sequence off it, not the vocabulary's logits).

    With ``kv_cache="preallocated"`` every past is a (B,kv,L,d) buffer of the generation's whole length ``L``, the
    present is that buffer after this step's write, and ``attention_mask`` is (B,L): 1 for the slots that hold a
    real token (this step's included), 0 for padding and for slots not written yet.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        spec: GraphSpec,
        routers: dict[int, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        attention: str = "explicit",
        prefill_select: str = "cond",
        kv_cache: str = "growing",
        logits: str = "all",
    ):
        super().__init__()
        if logits not in LOGITS:
            raise ArtifactMismatch(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
        self.logits = logits
        if kv_cache not in KV_CACHES:
            raise ArtifactMismatch(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
        if attention == "gqa" and kv_cache != "preallocated":
            raise ArtifactMismatch("GroupQueryAttention (attention='gqa') writes a preallocated cache: export it "
                                   "with kv_cache='preallocated'")
        if attention == "gqa" and spec.sliding_windows:
            raise UnsupportedArchitecture("attention='gqa' does not export sliding-window layers; use 'fused'")
        if kv_cache == "preallocated" and spec.mode != "static":
            raise ArtifactMismatch("a preallocated KV cache is for static graphs (a gated graph keeps no cache for "
                                   "the layers no sequence runs)")
        self.kv_cache = kv_cache
        if prefill_select not in PREFILL_SELECTS:
            raise ArtifactMismatch(f"prefill_select must be one of {', '.join(PREFILL_SELECTS)}, got {prefill_select!r}")
        self.prefill_select = prefill_select
        if spec.prefill_always and prefill_select != "cond":
            raise ArtifactMismatch("prefill_always needs prefill_select='cond' (the logical layout runs every routed "
                                   "sub-block in an If on run_layer.{i}, at prefill too)")
        if attention not in ATTENTION_KINDS:
            raise ArtifactMismatch(f"attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
        config = model.config
        self.spec = spec
        self.attention = attention
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        rotary = adapter.rotary_embedding(model)
        rope_type = str(getattr(rotary, "rope_type", "default"))
        if "dynamic" in rope_type:
            raise UnsupportedArchitecture(
                f"rotary embedding type {rope_type!r} changes with the sequence length; it cannot be exported"
            )
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        inv_freq = rotary.inv_freq.detach().to(torch.float32).clone()
        # the ONNX RotaryEmbedding node rotates the whole head (a partial rotary keeps the explicit arithmetic)
        self.fused_rotary = (attention in ("fused", "gqa") and 2 * inv_freq.numel() == self.head_dim
                             and _has_onnx_rotary())

        decoder = adapter.decoder_layers(model)
        layers = []
        for i in range(spec.num_layers):
            original = getattr(decoder[i], "layer", decoder[i])  # a RoutedDecoderLayer keeps the original in .layer
            layers.append(_Layer(original, adapter, i in spec.attention_layers, i in spec.mlp_layers))
        self.layers = nn.ModuleList(layers)
        self.embed_tokens = adapter._get(model, adapter.embed_tokens)
        self.norm = adapter._get(model, adapter.final_norm)
        self.lm_head = adapter._get(model, adapter.lm_head)

        if dtype is not None and any(p.dtype != dtype for p in self.parameters()):
            # cast a copy: the caller's model stays as it is (deepcopy keeps tied weights tied)
            cast = copy.deepcopy(nn.ModuleDict({"layers": self.layers, "embed_tokens": self.embed_tokens,
                                                "norm": self.norm, "lm_head": self.lm_head})).to(dtype)
            self.layers, self.embed_tokens = cast["layers"], cast["embed_tokens"]
            self.norm, self.lm_head = cast["norm"], cast["lm_head"]

        # routers and the rotary frequencies stay in float32 (the routers score in float32, as in training)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for i in spec.routed_layers:
            if routers is None or i not in routers:
                raise ArtifactMismatch(f"layer {i} is routed but no router weights were given for it")
            w = routers[i].detach().to(torch.float32).reshape(1, -1).clone()
            lin = nn.Linear(w.shape[1], 1, bias=False, dtype=torch.float32, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w)
            self.layers[i].router = lin
        self.eval()

    @property
    def writes_at_cache_position(self) -> bool:
        """A preallocated cache written by ``TensorScatter`` at the ``cache_position`` input (GroupQueryAttention
        finds each sequence's slots from the mask itself)."""
        return self.kv_cache == "preallocated" and self.attention != "gqa"

    # ---- names -------------------------------------------------------------------------------------------------
    def input_names(self) -> list[str]:
        names = ["input_ids", "attention_mask", "position_ids"]
        for i in self.spec.kv_layers:
            names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        if self.spec.mode == "gated":
            names.append("routing_decisions")
            names += [f"run_layer.{i}" for i in self.spec.routed_layers]
        if self.writes_at_cache_position:
            names.append("cache_position")
        if self.logits == "selected":
            names.append("logits_positions")
        return names

    def output_names(self) -> list[str]:
        names = ["logits"]
        for i in self.spec.kv_layers:
            names += [f"present.{i}.key", f"present.{i}.value"]
        if self.spec.mode == "gated":
            names.append("decisions")
        names += ["last_logits", "next_token"]
        return names

    # ---- pieces ------------------------------------------------------------------------------------------------
    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin per position: (B,1,T,d) for the explicit rotation, or (B,T,d/2), the half the ONNX
        ``RotaryEmbedding`` node takes, when the attention is fused."""
        freqs = position_ids[..., None].to(torch.float32) * self.inv_freq
        if self.fused_rotary:
            return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]  # (B,1,T,d)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary position embedding of ``x`` (B,heads,T,d): one ONNX ``RotaryEmbedding`` node (opset 23) with fused
        attention, else the rotate-half arithmetic (Slice/Neg/Concat/Mul/Add)."""
        if self.fused_rotary:
            # the registered op itself (torch.onnx.ops.rotary_embedding is not traceable inside torch.cond branches)
            return torch.ops.onnx.RotaryEmbedding.opset23(x, cos, sin)
        return x * cos + self._rotate_half(x) * sin

    @staticmethod
    def _mask_values(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive mask's 0 and its "masked" value in ``dtype``.

        float32: the dtype's minimum (what the explicit attention always used). 16-bit: half the minimum, so that a
        kernel adding scores to the mask in 16 bits cannot overflow to -inf (a row of -inf gives NaN, and the NaN of
        a padding query would reach real tokens through its value vector, even with a zero weight).
        """
        low = torch.finfo(dtype).min if dtype == torch.float32 else torch.finfo(dtype).min / 2
        return (torch.zeros((), dtype=dtype, device=device), torch.full((), low, dtype=dtype, device=device))

    @staticmethod
    def _additive_mask(attention_mask: torch.Tensor, seq_len: int, window: int | None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B,1,T,S) ``dtype``: 0 where query t may attend key s (causal by cache position, key not padding)."""
        total = attention_mask.shape[1]
        # positions as ranges with symbolic bounds (ONNX Range reads its bounds on the host): adding a host-side
        # offset to a device range would cost ONNX Runtime a host-to-device copy per step
        q_pos = torch.arange(total - seq_len, total, device=attention_mask.device)
        k_pos = torch.arange(total, device=attention_mask.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        # a Cast, not a comparison with 0: in a gated graph that 0 would be the constant the host-side prefill flag
        # compares with, which ONNX Runtime then keeps on the host and copies to the device at every step
        allowed = allowed[None, None] & attention_mask[:, None, None, :].to(torch.bool)
        zero, low = DecoderGraph._mask_values(dtype, attention_mask.device)
        return torch.where(allowed, zero, low)

    @staticmethod
    def _buffer_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor, window: int | None,
                     dtype: torch.dtype) -> torch.Tensor:
        """(B,1,T,L) ``dtype`` for a preallocated cache: query t (at slot ``cache_position[t]``) may attend slot s
        when s <= that slot and ``attention_mask`` marks s as a real token. The slot numbers come from a cumulative
        sum on the device (not a Range over the buffer's length, which ONNX Runtime would compute on the host and
        copy up at every step)."""
        slots = torch.cumsum(torch.ones_like(attention_mask), dim=1) - 1
        k_slot = slots[:, None, None, :]
        q_slot = cache_position[None, None, :, None]
        allowed = k_slot <= q_slot
        if window is not None:
            allowed = allowed & (k_slot > q_slot - window)
        allowed = allowed & attention_mask[:, None, None, :].to(torch.bool)
        zero, low = DecoderGraph._mask_values(dtype, attention_mask.device)
        return torch.where(allowed, zero, low)

    def _mask_dtype(self, activations: torch.dtype) -> torch.dtype:
        """The explicit attention adds the mask to float32 scores; the fused one takes it in the activations' dtype."""
        return activations if self.attention == "fused" else torch.float32

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _attention(
        self,
        layer: _Layer,
        normed: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, present_k, present_v)``; ``cache_position`` (preallocated cache): the slots to write.
        ``mask``: the additive mask, or for GroupQueryAttention the ``(seqlens_k, total_sequence_length)`` pair."""
        if self.attention == "gqa":
            return self._gqa_attention(layer, normed, past_k, past_v, cos, sin, *mask)
        if self.fused_rotary and not hasattr(layer, "q_norm"):
            return self._onnx_attention(layer, normed, past_k, past_v, cos, sin, mask, cache_position)
        b, t = normed.shape[0], normed.shape[1]
        d = self.head_dim
        q = layer.q_proj(normed).view(b, t, -1, d)
        k = layer.k_proj(normed).view(b, t, -1, d)
        v = layer.v_proj(normed).view(b, t, -1, d)
        if hasattr(layer, "q_norm"):
            q = layer.q_norm(q)
            k = layer.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = self._rotate(q, cos, sin)
        k = self._rotate(k, cos, sin)
        if cache_position is not None:
            keys, values = _write_cache(past_k, k, cache_position), _write_cache(past_v, v, cache_position)
        else:
            keys = torch.cat([past_k, k], dim=2)
            values = torch.cat([past_v, v], dim=2)
        scaling = layer.scaling if layer.scaling is not None else d**-0.5
        if self.attention == "fused":
            # one ONNX Attention node: the grouped KV heads are read in place (no repeat), the mask is additive in
            # the activations' dtype, the softmax runs in float32 inside the kernel
            out = torch.nn.functional.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=self.num_heads != self.num_kv_heads
            )
            out = out.transpose(1, 2).reshape(b, t, self.num_heads * d)
            return layer.o_proj(out), keys, values
        groups = self.num_heads // self.num_kv_heads
        kk, vv = keys, values
        if groups > 1:
            s = keys.shape[2]
            kk = keys[:, :, None].expand(b, self.num_kv_heads, groups, s, d).reshape(b, self.num_heads, s, d)
            vv = values[:, :, None].expand(b, self.num_kv_heads, groups, s, d).reshape(b, self.num_heads, s, d)
        scores = torch.matmul(q, kk.transpose(2, 3)).to(torch.float32) * scaling + mask
        probs = torch.softmax(scores, dim=-1)
        if probs.dtype != q.dtype:
            probs = probs.to(q.dtype)
        out = torch.matmul(probs, vv).transpose(1, 2).reshape(b, t, self.num_heads * d)
        return layer.o_proj(out), keys, values

    def _onnx_attention(self, layer: _Layer, normed: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                        cache_position: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused attention as ONNX's own ops on (B, T, heads x d) projections: two ``RotaryEmbedding`` nodes and
        one ``Attention`` node that takes the past K/V and returns the present (grouped KV heads as they are, the
        additive mask in the activations' dtype). No reshape, transpose or concat around them, so no shape
        arithmetic either: the fewest nodes per layer, and none that a routed layer's ``If`` branch must recompute.
        The registered ops are called directly (``torch.onnx.ops``'s wrappers are not traceable inside
        ``torch.cond`` branches); in PyTorch they run their reference implementations."""
        onnx_ops = torch.ops.onnx
        q, k, v = self._rotated_projections(layer, normed, cos, sin)
        scaling = layer.scaling if layer.scaling is not None else self.head_dim**-0.5
        if cache_position is not None:
            # preallocated cache: (B, heads, T, d) views, written into the buffers, attention over the buffers
            b, t, d = normed.shape[0], normed.shape[1], self.head_dim
            q, k, v = (x.view(b, t, -1, d).transpose(1, 2) for x in (q, k, v))
            keys, values = _write_cache(past_k, k, cache_position), _write_cache(past_v, v, cache_position)
            out, _, _, _ = onnx_ops.Attention.opset23(
                q, keys, values, mask, q_num_heads=self.num_heads, kv_num_heads=self.num_kv_heads, scale=scaling
            )
            return layer.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * d)), keys, values
        out, keys, values, _ = onnx_ops.Attention.opset23(
            q, k, v, mask, past_k, past_v, q_num_heads=self.num_heads, kv_num_heads=self.num_kv_heads, scale=scaling
        )
        return layer.o_proj(out), keys, values

    def _rotated_projections(self, layer: _Layer, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, k, v)`` as (B, T, heads x d) projections, q and k rotated (per-head q/k norms first, where the model
        has them): one ONNX ``RotaryEmbedding`` node each when the rotary covers the whole head, else the rotate-half
        arithmetic on (B, heads, T, d) views."""
        b, t, d = normed.shape[0], normed.shape[1], self.head_dim
        q, k, v = layer.q_proj(normed), layer.k_proj(normed), layer.v_proj(normed)
        if hasattr(layer, "q_norm"):
            q = layer.q_norm(q.view(b, t, -1, d)).reshape(b, t, -1)
            k = layer.k_norm(k.view(b, t, -1, d)).reshape(b, t, -1)
        if self.fused_rotary:
            q = torch.ops.onnx.RotaryEmbedding.opset23(q, cos, sin, num_heads=self.num_heads)
            k = torch.ops.onnx.RotaryEmbedding.opset23(k, cos, sin, num_heads=self.num_kv_heads)
            return q, k, v
        q = self._rotate(q.view(b, t, -1, d).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, -1)
        k = self._rotate(k.view(b, t, -1, d).transpose(1, 2), cos, sin).transpose(1, 2).reshape(b, t, -1)
        return q, k, v

    def _gqa_attention(self, layer: _Layer, normed: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention as one ``GroupQueryAttention`` node on the rotated projections; the node writes the buffers
        and returns them."""
        q, k, v = self._rotated_projections(layer, normed, cos, sin)
        scaling = layer.scaling if layer.scaling is not None else self.head_dim**-0.5
        out, keys, values = group_query_attention(q, k, v, past_k, past_v, seqlens_k, total, num_heads=self.num_heads,
                                                  kv_num_heads=self.num_kv_heads, scale=scaling)
        return layer.o_proj(out), keys, values

    def _score(self, layer: _Layer, normed: torch.Tensor, weights: torch.Tensor,
               limit: torch.Tensor | float) -> torch.Tensor:
        """(B, 1, 1) bool: the router's decision for this step's tokens: its logit for their mean over the real ones
        (``weights``: ``_mean_weights``), scored in float32, against ``limit``: ``router_logit_limit`` of the
        threshold, or (B, 1, 1) limits per sequence (``_prefill_limits``). ``sigmoid(logit) >= threshold`` as the
        logit against the threshold's logit: the same decision (the sigmoid is increasing) with no ``Sigmoid``
        kernel; the two can differ only for a logit so close to the threshold's that float32 rounds its sigmoid
        onto the threshold."""
        pooled = (weights @ normed).to(torch.float32)  # (B, 1, hidden)
        return (pooled @ layer.router.weight.t()) >= limit

    def _prefill_limits(self, routing_decisions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per routed layer, (B, 1, 1) float32: the logit each sequence's router must reach to run the layer at
        prefill: the threshold's logit where ``routing_decisions`` allows the layer, +inf where it forces it off.
        One ``Where`` and one ``Split`` for all routed layers, on one (B, R) input copied to the device once (a
        flag per layer and'ed with each router's decision was one more kernel and one host-to-device copy per routed
        layer)."""
        limit = router_logit_limit(self.spec.threshold)
        limits = torch.where(routing_decisions[:, :, None],
                             torch.full((), limit, dtype=torch.float32, device=routing_decisions.device),
                             torch.full((), float("inf"), dtype=torch.float32, device=routing_decisions.device))
        return torch.split(limits, 1, dim=1)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[torch.Tensor],
        routing_decisions: torch.Tensor | None = None,
        run_layer: list[torch.Tensor] | None = None,
        cache_position: torch.Tensor | None = None,
        logits_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        past_key_values = list(past_key_values)
        if (cache_position is None) == self.writes_at_cache_position:
            raise ArtifactMismatch(f"a {self.kv_cache} KV cache graph with {self.attention} attention takes "
                                   f"cache_position {'at every step' if self.writes_at_cache_position else 'never'}")
        if (logits_positions is None) != (self.logits == "all"):
            raise ArtifactMismatch(f"a graph with {self.logits} logits takes logits_positions "
                                   f"{'never' if self.logits == 'all' else 'at every step'}")
        if spec.mode != "gated":
            return self._decoder(input_ids, attention_mask, position_ids, past_key_values, None, None, phase="static",
                                 cache_position=cache_position, logits_positions=logits_positions)
        if self.prefill_select == "logical":
            return self._decoder(input_ids, attention_mask, position_ids, past_key_values, routing_decisions,
                                 list(run_layer), phase="logical", logits_positions=logits_positions)
        # one If on the prefill flag (from input shapes: host-side) around the whole decoder. Its prefill branch
        # runs the routers, its decode branch reads the held decisions: a decode step runs one If per routed layer
        # (on run_layer.{i}) inside it, and nothing else of the routing
        n_kv = len(past_key_values)
        n_run = len(run_layer)
        selected = () if logits_positions is None else (logits_positions,)
        operands = (input_ids, attention_mask, position_ids, *past_key_values, routing_decisions, *run_layer,
                    *selected)

        def branch(phase: str):
            def run(*ops):
                return self._decoder(ops[0], ops[1], ops[2], list(ops[3:3 + n_kv]), ops[3 + n_kv],
                                     list(ops[4 + n_kv:4 + n_kv + n_run]), phase=phase,
                                     logits_positions=ops[4 + n_kv + n_run] if selected else None)

            return run

        return tuple(torch.cond(_is_prefill(input_ids, attention_mask), branch("prefill"), branch("decode"),
                                operands))

    def _decoder(self, input_ids, attention_mask, position_ids, past_key_values, routing_decisions, run_layer,
                 phase: str, cache_position: torch.Tensor | None = None,
                 logits_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The decoder for one ``phase``: "static" (no routing), "prefill" / "decode" (the branches of a gated
        graph's prefill ``If``), or "logical" (a gated graph that selects the router's or the held decisions with
        logical ops at every step)."""
        spec = self.spec
        x = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        cos, sin = self._rotary(position_ids, x.dtype)
        mask_dtype = self._mask_dtype(x.dtype)
        if self.attention == "gqa":
            # what GroupQueryAttention reads instead of a mask: the real tokens per sequence - 1 (on the device),
            # and the mask's width (from its shape: on the host, where ORT's CUDA kernel reads it)
            seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
            total = (torch.zeros((), dtype=torch.int64, device=x.device) + attention_mask.shape[1]).to(torch.int32)
            masks: dict[Any, Any] = {None: (seqlens_k, total)}
        elif cache_position is not None:
            masks = {w: self._buffer_mask(attention_mask, cache_position, w, mask_dtype)
                     for w in {None, *spec.sliding_windows.values()}}
        else:
            masks = {w: self._additive_mask(attention_mask, t, w, mask_dtype)
                     for w in {None, *spec.sliding_windows.values()}}
        past = {i: (past_key_values[2 * j], past_key_values[2 * j + 1]) for j, i in enumerate(spec.kv_layers)}
        presents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        decisions: list[torch.Tensor] = []
        held: tuple[torch.Tensor, ...] = ()
        is_prefill = None
        if phase in ("decode", "logical"):
            # the held decisions as (B, 1, 1) per routed layer, ready to mask a (B, T, hidden) output: one Split
            held = torch.split(routing_decisions[:, :, None], 1, dim=1)
        if phase == "logical":
            is_prefill = _is_prefill(input_ids, attention_mask)
        # the routers' mean weights, once for every routed layer (the decode phase runs no router)
        mean_weights = _mean_weights(attention_mask, t, x.dtype) if phase in ("prefill", "logical") else None
        # at prefill, routing_decisions says which sequences may run each routed layer (all true: the routers decide)
        limits = self._prefill_limits(routing_decisions) if phase == "prefill" else None

        for i, layer in enumerate(self.layers):
            mask = masks[spec.sliding_windows.get(i)]
            if phase != "static" and i in spec.routed_layers:
                r = spec.routed_layers.index(i)
                x, kv, dec = self._routed_layer(layer, x, past.get(i), cos, sin, mask, mean_weights,
                                                held[r] if held else None, run_layer[r], phase, is_prefill,
                                                limits[r] if limits else None,
                                                always=phase == "prefill" and i in spec.prefill_always)
                decisions.append(dec)
                if kv is not None:
                    presents[i] = kv
                continue
            if layer.has_attn:
                out, k, v = self._attention(layer, layer.attn_norm(x), *past[i], cos, sin, mask, cache_position)
                presents[i] = (k, v)
                x = x + out
            if layer.has_mlp:
                x = x + layer.mlp(layer.mlp_norm(x))

        if logits_positions is not None:
            # the selected positions' hidden states only (one GatherElements), then the final norm and the LM head
            x = torch.gather(x, 1, logits_positions[:, :, None].expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(self.norm(x))
        outputs: list[torch.Tensor] = [logits]
        for i in spec.kv_layers:
            outputs += list(presents[i])
        if phase == "decode":
            outputs.append(routing_decisions.clone())  # the decisions this step used: the held ones
        elif phase != "static":
            outputs.append(torch.cat(decisions, dim=1)[:, :, 0])
        # the last (selected) position's logits, sliced from ``logits``: a generate loop binds only this output and
        # so never copies the prompt's (B, T, vocab) logits off the device
        last = logits[:, -1].clone()
        outputs += [last, last.argmax(dim=-1, keepdim=True)]
        return tuple(outputs)

    def _sub_block(self, layer: _Layer):
        """The routed sub-block as ``(taken, skipped)`` branch functions of ``(*operands, dec)``: for attention or
        whole-block routing the operands are ``(x, normed, past_k, past_v, cos, sin, mask)`` and the branches
        return ``(x, present_k, present_v)``; for MLP routing they are ``(x, normed)`` and the branches return
        ``(x,)`` (the layer's attention and cache stay outside the ``If``). ``dec`` is (B, 1, 1) bool.

        ``taken`` runs the sub-block for the whole batch and keeps its output only for the sequences whose decision
        says run (one ``Where``: each sequence gets exactly its own result). ``skipped`` returns ``x`` and, for
        attention, the past as the present: a layer that does not run keeps its cache as it was (empty while no
        sequence runs it). Its outputs are its inputs, so ONNX Runtime runs one ``Identity`` per output and no
        shape arithmetic. Both branches read the shared causal mask as it is: a layer that runs holds the whole
        cache (the decisions are fixed at prefill, so a layer runs at every step or at none).
        """
        target = self.spec.target
        if target == "mlp":

            def taken_mlp(x, normed, dec):
                return (torch.where(dec, x + layer.mlp(normed), x),)

            def skipped_mlp(x, normed, dec):
                return (x.clone(),)

            return taken_mlp, skipped_mlp

        def taken(x, normed, pk, pv, cos, sin, mask, dec):
            out, k, v = self._attention(layer, normed, pk, pv, cos, sin, mask)
            h = x + out
            if target == "block":
                h = h + layer.mlp(layer.mlp_norm(h))
            return torch.where(dec, h, x), k, v

        def skipped(x, normed, pk, pv, cos, sin, mask, dec):
            return x.clone(), pk.clone(), pv.clone()

        return taken, skipped

    def _routed_layer(self, layer, x, kv, cos, sin, mask, mean_weights, given, run, phase, is_prefill, limit,
                      always: bool = False):
        r"""One routed sub-block; returns ``(x, (present_k, present_v) or None, decision)``, the decision (B, 1, 1)
        (None at decode, where the held decisions are the output).

        ``phase="prefill"``: the router scores the sequences against ``limit`` (``_prefill_limits``: the sequences
        that ``routing_decisions`` forces off never reach it) and the sub-block's ``If`` runs it only when some
        sequence of the batch needs it (a condition computed on the device: ONNX Runtime copies one bool to the
        host, once per routed layer, at prefill only). ``run_layer.{i}`` is not read at prefill. ``always``
        (``GraphSpec.prefill_always``): no ``If``, the taken branch for the whole batch (its ``Where`` keeps each
        sequence's own result), so no copy and no wait; a batch that skips the layer pays its compute.
        ``phase="decode"``: the sub-block's ``If`` on the host input ``run_layer.{i}`` with the held decision
        ``given`` (B, 1, 1); no router, no host/device copy.

        ``phase="logical"`` (older exporters, which cannot trace the prefill ``If`` around ``If``\ s): the
        router's and the held decisions are selected with logical ops and the sub-block's ``If`` is on
        ``run_layer.{i}`` at every step, so a prefill runs every routed sub-block that ``run_layer.{i}`` allows.
        """
        spec = self.spec
        mlp = spec.target == "mlp"
        if mlp:
            if layer.has_attn:
                out, k, v = self._attention(layer, layer.attn_norm(x), *kv, cos, sin, mask)
                x = x + out
                kv = (k, v)
            normed = layer.mlp_norm(x)
            operands: tuple[torch.Tensor, ...] = (x, normed)
        else:
            normed = layer.attn_norm(x)
            operands = (x, normed, kv[0], kv[1], cos, sin, mask)
        taken, skipped = self._sub_block(layer)

        if phase == "decode":
            dec, condition = None, run
        else:
            if phase == "logical":
                scored = self._score(layer, normed, mean_weights, router_logit_limit(spec.threshold)) & run
                # the router's decision at prefill (where routing_decisions allows it), the held one after; with
                # logical ops (ONNX Runtime has no bool Where kernel)
                dec, condition = given & (scored | ~is_prefill), run
            else:
                dec = self._score(layer, normed, mean_weights, limit)
                condition = None if always else dec.any()
        if always:
            result = taken(*operands, dec)
        else:
            result = _caches_nonempty(torch.cond(condition, taken, skipped,
                                                 (*operands, given if dec is None else dec)))
        if mlp:
            return result[0], kv, dec
        x, k, v = result
        if spec.target == "attn" and layer.has_mlp:  # the layer's MLP is not routed
            x = x + layer.mlp(layer.mlp_norm(x))
        return x, (k, v), dec
