"""``genai_config.json`` for ONNX Runtime GenAI (onnxruntime-genai), for static graphs.

The decoder section names the graph's inputs and outputs with ``%d`` templates over the original layer index.
A static graph has KV inputs only for the layers whose attention the plan kept; onnxruntime-genai 0.12.2 and later
discovers which layer indices have KV inputs, so ``num_hidden_layers`` stays the model's own layer count.

A gated graph also takes ``routing_decisions`` and ``run_layer.{i}`` inputs that GenAI's generate loop does not
feed, so no GenAI config is written for it (its package runs with the bundled ``run_ort.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ArtifactMismatch
from ..fsutil import write_json_atomic

CONFIG_NAME = "genai_config.json"
# onnxruntime-genai's own name for each provider in "provider_options"
PROVIDER_NAMES = {"cuda": "cuda", "cpu": None}


def genai_config(info: dict[str, Any], *, provider: str = "cuda", max_length: int | None = None) -> dict[str, Any]:
    """The GenAI config for the export described by ``info`` (the export's ``export_info.json``)."""
    if info["mode"] != "static":
        raise ArtifactMismatch(
            "ONNX Runtime GenAI cannot feed a gated graph's routing inputs; write a GenAI config for static graphs only"
        )
    if info.get("kv_cache", "growing") != "growing":
        raise ArtifactMismatch("ONNX Runtime GenAI does not feed a preallocated cache's cache_position input; "
                               "write a GenAI config for graphs with a growing cache only")
    if info.get("logits", "all") != "all":
        raise ArtifactMismatch("ONNX Runtime GenAI does not feed a logits_positions input; write a GenAI config for "
                               "graphs exported with logits for every token only")
    if provider not in PROVIDER_NAMES:
        raise ArtifactMismatch(f"provider must be one of {', '.join(PROVIDER_NAMES)}, got {provider!r}")
    m = info["model"]
    context = int(m.get("max_position_embeddings") or 2048)
    eos = m.get("eos_token_id")
    pad = m.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    provider_options = [{PROVIDER_NAMES[provider]: {}}] if PROVIDER_NAMES[provider] else []
    return {
        "model": {
            "bos_token_id": m.get("bos_token_id"),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": info["graph"],
                "head_size": int(m["head_dim"]),
                "hidden_size": int(m["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": int(m["num_attention_heads"]),
                "num_hidden_layers": int(m["num_hidden_layers"]),
                "num_key_value_heads": int(m["num_key_value_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": m["model_type"],
            "vocab_size": int(m["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": int(max_length or context),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # the graph concatenates past and new keys into a new present: buffers are not shared
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: str | Path, info: dict[str, Any], **kwargs: Any) -> Path:
    return write_json_atomic(Path(folder) / CONFIG_NAME, genai_config(info, **kwargs))
