"""The pruned-folder writer: a SkipPlan applied to a model, written as a self-contained Hugging Face folder.

The folder holds safetensors weights without the skipped sub-blocks' tensors, a config in the nemotron-nas (DeciLM)
form that vLLM, TensorRT-LLM and llama.cpp load (``block_configs`` with no-op attention / ffn parts), the standalone
modeling code (``modeling_rtexport_decilm.py`` + ``configuration_rtexport_decilm.py``, referenced by ``auto_map``),
the tokenizer, the generation config, and ``rtexport_prune.json`` (what made the folder).

Layers that the nemotron-nas form cannot express (attention biases, q/k norms, sliding windows, widths with no exact
``ffn_mult``...) are written with rtexport's own model type instead, after a warning that says why; the same modeling
file runs both.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ArtifactMismatch, UnsupportedArchitecture
from ..fsutil import atomic_directory, file_sha256, write_json_atomic, write_text_atomic
from ..models.adapters import ArchitectureAdapter
from ..models.loading import LoadedModel, parse_dtype
from ..planning import SkipPlan
from ..routing.routed import RoutedDecoderLayer
from . import configuration_rtexport_decilm as decilm_config

logger = logging.getLogger(__name__)

PRUNED_FORMAT = "rtexport.pruned/1"
MANIFEST_NAME = "rtexport_prune.json"
CONFIG_MODULE = "configuration_rtexport_decilm"
MODELING_MODULE = "modeling_rtexport_decilm"
NEMOTRON_NAS = "nemotron-nas"
OWN_MODEL_TYPE = "rtexport_pruned"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# our modeling code's names, in the order of the adapter's projection tuples (q, k, v, o / gate, up, down)
_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
_QK_NORM_NAMES = ("q_norm", "k_norm")

_CLASSES = {
    NEMOTRON_NAS: ("DeciLMConfig", "DeciLMModel", "DeciLMForCausalLM"),
    OWN_MODEL_TYPE: ("RtexportPrunedConfig", "RtexportPrunedModel", "RtexportPrunedForCausalLM"),
}


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float | None:
    """The shortest decimal ``ffn_mult`` that nemotron-nas readers turn back into exactly ``intermediate_size``.

    Readers compute ``int(2 * ffn_mult * hidden / 3)`` rounded up to a multiple of 256 (vLLM's and llama.cpp's
    ``_ffn_mult_to_intermediate_size``), so only multiples of 256 can be expressed; ``None`` for the others.
    """
    exact = 3 * intermediate_size / (2 * hidden_size)
    for digits in range(0, 10):
        mult = round(exact, digits)
        if mult > 0 and decilm_config.ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size:
            return float(mult)
    return None


@dataclass
class SourceArchitecture:
    """What the writer measured on the source model (from its modules and weights, not only its config)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_sizes: list[int]
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    qk_norm: bool
    windows: list[int | None]
    tie_word_embeddings: bool
    initializer_range: float
    token_ids: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunedLayout:
    """The decisions the writer made: which form, why, and which sub-blocks stay."""

    model_type: str
    fallback_reasons: list[str]
    attention_kept: list[int]
    ffn_kept: list[int]

    @property
    def form(self) -> str:
        return NEMOTRON_NAS if self.model_type == NEMOTRON_NAS else "rtexport"


# ---- reading the source model -------------------------------------------------------------------------------------
def _plain_layers(model: nn.Module, adapter: ArchitectureAdapter) -> list[nn.Module]:
    """The decoder layers, looking through RoutedDecoderLayer wrappers (a model still wrapped by a RoutedModel)."""
    return [layer.layer if isinstance(layer, RoutedDecoderLayer) else layer for layer in adapter.decoder_layers(model)]


def _child(module: nn.Module, name: str, what: str) -> nn.Module:
    sub = getattr(module, name, None)
    if not isinstance(sub, nn.Module):
        raise UnsupportedArchitecture(f"{what}: expected a sub-module {name!r}, found {type(sub).__name__}")
    return sub


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def describe_source(model: nn.Module, adapter: ArchitectureAdapter) -> SourceArchitecture:
    """Measure the architecture facts the pruned config needs (biases and widths from the modules themselves)."""
    cfg = model.config
    if adapter.is_moe:
        raise UnsupportedArchitecture(f"{adapter.name}: mixture-of-experts layers cannot be pruned into a folder yet")
    layers = _plain_layers(model, adapter)
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedArchitecture(f"{heads} attention heads cannot be grouped over {kv_heads} KV heads")
    attn = adapter.attention(layers[0])
    q, k, v, o = (_child(attn, n, "attention") for n in adapter.attn_projections)
    if q.weight.shape[0] != heads * head_dim or k.weight.shape[0] != kv_heads * head_dim:
        raise UnsupportedArchitecture(
            f"attention projections of shape {tuple(q.weight.shape)} / {tuple(k.weight.shape)} do not match "
            f"{heads} heads, {kv_heads} KV heads of size {head_dim}"
        )
    gate = _child(adapter.feed_forward(layers[0]), adapter.mlp_projections[0], "feed-forward")
    intermediate = [
        int(_child(adapter.feed_forward(layer), adapter.mlp_projections[0], "feed-forward").weight.shape[0])
        for layer in layers
    ]
    rope_source = getattr(cfg, "rope_parameters", None)
    rope = decilm_config.normalize_rope(
        dict(rope_source) if isinstance(rope_source, dict) else None,
        getattr(cfg, "rope_theta", None),
        getattr(cfg, "rope_scaling", None) if not isinstance(rope_source, dict) else None,
    )
    if rope["rope_type"] not in decilm_config.ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"RoPE type {rope['rope_type']!r} is not supported by the pruned-model code "
            f"(supported: {', '.join(decilm_config.ROPE_TYPES)})"
        )
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedArchitecture("partial rotary embeddings are not supported by the pruned-model code")
    hidden_act = getattr(cfg, "hidden_act", None)
    if not isinstance(hidden_act, str):
        raise UnsupportedArchitecture("the model config names no hidden_act")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) and (
        head.weight is embed.weight or torch.equal(head.weight, embed.weight)
    )
    token_ids = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return SourceArchitecture(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(embed.weight.shape[0]),
        intermediate_sizes=intermediate,
        hidden_act=hidden_act,
        rms_norm_eps=float(cfg.rms_norm_eps),
        max_position_embeddings=int(getattr(cfg, "max_position_embeddings", 2048)),
        rope=rope,
        qkv_bias=_has_bias(q) or _has_bias(k) or _has_bias(v),
        out_bias=_has_bias(o),
        mlp_bias=_has_bias(gate),
        qk_norm=bool(adapter.qk_norm),
        windows=[adapter.sliding_window(cfg, i) for i in range(len(layers))],
        tie_word_embeddings=tied,
        initializer_range=float(getattr(cfg, "initializer_range", 0.02) or 0.02),
        token_ids=token_ids,
    )


def nemotron_nas_obstacles(adapter: ArchitectureAdapter, src: SourceArchitecture, ffn_kept: list[int]) -> list[str]:
    """Why this model cannot be written in the nemotron-nas form (empty: it can)."""
    reasons = []
    if src.qkv_bias or src.out_bias or adapter.attn_bias:
        reasons.append("attention projections have biases")
    if src.qk_norm or adapter.qk_norm:
        reasons.append("attention has per-head q/k norms")
    if not adapter.nemotron_nas_compatible and not reasons:
        reasons.append(f"{adapter.name} layers are not Llama layers")
    if src.mlp_bias:
        reasons.append("feed-forward projections have biases")
    if src.hidden_act != "silu":
        reasons.append(f"activation {src.hidden_act!r} (DeciLM readers assume silu)")
    if any(w is not None for w in src.windows):
        reasons.append("sliding-window attention")
    if src.rope["rope_type"] not in ("default", "llama3"):
        reasons.append(f"RoPE scaling {src.rope['rope_type']!r} (llama.cpp's DeciLM converter only keeps llama3)")
    if src.head_dim * src.num_attention_heads != src.hidden_size:
        reasons.append("head_dim × heads differs from hidden_size")
    sizes = {src.intermediate_sizes[i] for i in ffn_kept}
    widths = sorted(w for w in sizes if ffn_mult_for(w, src.hidden_size) is None)
    if widths:
        reasons.append(
            f"feed-forward width {', '.join(map(str, widths))} has no exact ffn_mult "
            "(nemotron-nas widths are multiples of 256)"
        )
    return reasons


# ---- building the folder's contents -------------------------------------------------------------------------------
def plan_layout(loaded: LoadedModel, plan: SkipPlan, src: SourceArchitecture) -> PrunedLayout:
    n = plan.num_layers
    drop_attn = set(plan.skip) if plan.target in ("attn", "block") else set()
    drop_ffn = set(plan.skip) if plan.target in ("mlp", "block") else set()
    attention_kept = [i for i in range(n) if i not in drop_attn]
    ffn_kept = [i for i in range(n) if i not in drop_ffn]
    reasons = nemotron_nas_obstacles(loaded.adapter, src, ffn_kept)
    return PrunedLayout(
        model_type=OWN_MODEL_TYPE if reasons else NEMOTRON_NAS,
        fallback_reasons=reasons,
        attention_kept=attention_kept,
        ffn_kept=ffn_kept,
    )


def build_config(src: SourceArchitecture, layout: PrunedLayout, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for the pruned folder (nemotron-nas fields; rtexport's own type adds a few)."""
    import transformers

    nemotron = layout.model_type == NEMOTRON_NAS
    group = src.num_attention_heads // src.num_key_value_heads
    blocks = []
    for i in range(len(src.intermediate_sizes)):
        attn_kept = i in layout.attention_kept
        ffn_kept = i in layout.ffn_kept
        width = src.intermediate_sizes[i]
        ffn: dict[str, Any] = {
            "no_op": not ffn_kept,
            "replace_with_linear": False,
            "ffn_mult": ffn_mult_for(width, src.hidden_size) if ffn_kept else None,
        }
        if not nemotron and ffn_kept:
            ffn["intermediate_size"] = width
        blocks.append(
            {
                "attention": {
                    "no_op": not attn_kept,
                    "replace_with_linear": False,
                    "n_heads_in_group": group if attn_kept else None,
                },
                "ffn": ffn,
            }
        )
    rope = dict(src.rope)
    rope_scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    config_cls, model_cls, lm_cls = _CLASSES[layout.model_type]
    dtype_name = str(dtype).replace("torch.", "")
    config: dict[str, Any] = {
        "architectures": [lm_cls],
        "auto_map": {
            "AutoConfig": f"{CONFIG_MODULE}.{config_cls}",
            "AutoModel": f"{MODELING_MODULE}.{model_cls}",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.{lm_cls}",
        },
        "model_type": layout.model_type,
        "vocab_size": src.vocab_size,
        "hidden_size": src.hidden_size,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": src.num_attention_heads,
        "head_dim": src.head_dim,
        "hidden_act": src.hidden_act,
        "max_position_embeddings": src.max_position_embeddings,
        "initializer_range": src.initializer_range,
        "rms_norm_eps": src.rms_norm_eps,
        "rope_theta": float(rope["rope_theta"]),
        "rope_scaling": rope_scaling,
        "rope_parameters": rope,
        "attention_bias": src.qkv_bias,
        "mlp_bias": src.mlp_bias,
        "tie_word_embeddings": src.tie_word_embeddings,
        **src.token_ids,
        "use_cache": True,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "block_configs": blocks,
    }
    if not nemotron:
        config["attention_output_bias"] = src.out_bias
        config["qk_norm"] = src.qk_norm
        config["attention_windows"] = list(src.windows)
    return config


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters())


def collect_tensors(
    model: nn.Module, adapter: ArchitectureAdapter, src: SourceArchitecture, layout: PrunedLayout, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The kept weights under the pruned model's (Llama-style) names, on the CPU in ``dtype``.

    Every parameter of a kept sub-block must land somewhere: a parameter the mapping does not know is an error,
    not something silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(name: str, t: torch.Tensor) -> None:
        t = t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t

    def put_module(prefix: str, module: nn.Module) -> None:
        for pname, p in _params(module).items():
            put(f"{prefix}.{pname}", p)

    def put_children(prefix: str, parent: nn.Module, ours: tuple[str, ...], theirs: tuple[str, ...], what: str) -> None:
        mapped = set()
        for our, their in zip(ours, theirs):
            child = _child(parent, their, what)
            put_module(f"{prefix}.{our}", child)
            mapped.update(f"{their}.{n}" for n in _params(child))
        unknown = sorted(set(_params(parent)) - mapped)
        if unknown:
            raise UnsupportedArchitecture(f"{what} has parameters the pruned-model code does not know: {unknown}")

    put("model.embed_tokens.weight", model.get_input_embeddings().weight)
    for i, layer in enumerate(_plain_layers(model, adapter)):
        base = f"model.layers.{i}"
        if i in layout.attention_kept:
            put_module(f"{base}.input_layernorm", adapter.attention_norm(layer))
            ours, theirs = _ATTN_NAMES, tuple(adapter.attn_projections)
            if src.qk_norm:
                ours, theirs = ours + _QK_NORM_NAMES, theirs + tuple(adapter.qk_norm_names)
            put_children(f"{base}.self_attn", adapter.attention(layer), ours, theirs, f"layer {i} attention")
        if i in layout.ffn_kept:
            put_module(f"{base}.post_attention_layernorm", adapter.feed_forward_norm(layer))
            put_children(
                f"{base}.mlp", adapter.feed_forward(layer), _MLP_NAMES, tuple(adapter.mlp_projections),
                f"layer {i} feed-forward",
            )
    put_module("model.norm", adapter._get(model, adapter.final_norm))
    if not src.tie_word_embeddings:
        put("lm_head.weight", model.get_output_embeddings().weight)
    return out


def check_against_modeling_code(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Build the shipped modeling code from ``config`` (on the meta device) and require the same names and shapes."""
    from . import modeling_rtexport_decilm as modeling

    config_cls_name, _, lm_cls_name = _CLASSES[config["model_type"]]
    skip = {"architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype"}
    cfg = getattr(decilm_config, config_cls_name)(**{k: v for k, v in config.items() if k not in skip})
    with torch.device("meta"):
        lm = getattr(modeling, lm_cls_name)(cfg)
    expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:5]
        unexpected = sorted(set(got) - set(expected))[:5]
        shapes = [(k, got[k], expected[k]) for k in sorted(set(got) & set(expected)) if got[k] != expected[k]][:5]
        raise AssertionError(
            f"pruned weights do not fit the modeling code: missing {missing}, unexpected {unexpected}, shapes {shapes}"
        )


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    total = sum(nbytes(t) for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes(t)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json_atomic(folder / "model.safetensors.index.json", index)
    return names


def _versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    out = {"rtexport": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version()}
    try:
        out["safetensors"] = importlib.metadata.version("safetensors")
    except importlib.metadata.PackageNotFoundError:
        pass
    return out


def prune(
    loaded: LoadedModel,
    plan: SkipPlan,
    output_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write ``loaded`` with ``plan``'s sub-blocks removed as a self-contained model folder; returns the folder.

    ``dtype`` (default: the model's) is the dtype of the saved weights, e.g. ``"bfloat16"`` for a GGUF model that
    was dequantized to float32 at load time. The folder appears in one rename when complete; an interrupted run
    leaves the previous folder (or none) in place.
    """
    model = loaded.model
    adapter = loaded.adapter
    plan.check_model(loaded.fingerprint)
    n_layers = len(adapter.decoder_layers(model))
    if plan.num_layers != n_layers:
        raise ArtifactMismatch(f"the plan is for {plan.num_layers} layers, but the model has {n_layers}")
    target_dtype = parse_dtype(dtype) or _model_dtype(model)
    src = describe_source(model, adapter)
    layout = plan_layout(loaded, plan, src)
    if layout.fallback_reasons:
        logger.warning(
            "%s cannot be written in the nemotron-nas form (%s); writing rtexport's own model type %r instead "
            "(loads with transformers and trust_remote_code=True; vLLM, TensorRT-LLM and llama.cpp will not load it)",
            loaded.source.model_id, "; ".join(layout.fallback_reasons), OWN_MODEL_TYPE,
        )
    config = build_config(src, layout, target_dtype)
    tensors = collect_tensors(model, adapter, src, layout, target_dtype)
    check_against_modeling_code(config, tensors)
    here = Path(__file__).parent

    with atomic_directory(output_dir) as staging:
        weight_files = _write_weights(tensors, staging, max_shard_bytes)
        write_json_atomic(staging / "config.json", config)
        for module_name in (CONFIG_MODULE, MODELING_MODULE):
            shutil.copyfile(here / f"{module_name}.py", staging / f"{module_name}.py")
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            write_text_atomic(staging / "generation_config.json", generation_config.to_json_string(use_diff=True))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(staging))
        source_params = sum(p.numel() for p in model.parameters())
        kept_params = sum(t.numel() for t in tensors.values())
        write_json_atomic(
            staging / MANIFEST_NAME,
            {
                "format": PRUNED_FORMAT,
                "form": layout.form,
                "model_type": layout.model_type,
                "fallback_reasons": layout.fallback_reasons,
                "target": plan.target,
                "skip": list(plan.skip),
                "attention_layers": layout.attention_kept,
                "ffn_layers": layout.ffn_kept,
                "kv_layers": layout.attention_kept,
                "dtype": str(target_dtype).replace("torch.", ""),
                "parameters": kept_params,
                "tied_embeddings": src.tie_word_embeddings,
                "base_model": loaded.source.to_dict(),
                "base_parameters": source_params,
                "fingerprint": loaded.fingerprint,
                "plan": plan.to_dict(),
                "files": {
                    name: {"bytes": (staging / name).stat().st_size, "sha256": file_sha256(staging / name)}
                    for name in weight_files
                },
                "versions": _versions(),
            },
        )
    return Path(output_dir)
