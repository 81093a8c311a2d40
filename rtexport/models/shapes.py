"""Named model shapes with random weights, built directly on a device (for speed measurements: timing does not depend
on the weights' values, and no checkpoint has to be downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import RtexportError


class UnknownShape(RtexportError):
    """A shape name that is not in SHAPES."""


# Meta-Llama-3-8B's config.json (architecture fields only)
_LLAMA3_8B: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_bias=False,
)

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": _LLAMA3_8B,
    # Llama-3.2-1B's architecture where it differs from the 8B's (its embeddings stay untied here), for GPU
    # measurements where an 8B run does not fit the time
    "llama3.2-1b": {**_LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16},
    # SmolLM2-135M's architecture (the embedded default's), for GPU runs of the whole job in seconds
    "smollm2-135m": {**_LLAMA3_8B, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "rope_theta": 100000.0, "tie_word_embeddings": True},
    # CPU dry runs of the ONNX GPU benchmark's two phases (examples/benchmarks/ort_gpu_speed.py): every vector over
    # 1 KiB, so every weight goes to the weights file (smaller tensors stay inside model.onnx with the exporting
    # machine's values, and graph_weights.fill refuses them)
    "llama-dryrun": {**_LLAMA3_8B, "vocab_size": 1000, "hidden_size": 1024, "intermediate_size": 2048,
                     "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048},
    # a few-kB model of the same family, for tests and smoke runs of the measurement scripts
    # (rope_theta and rms_norm_eps: transformers' LlamaConfig defaults, which this shape has always had)
    "llama-tiny": {**_LLAMA3_8B, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6},
}


def random_model(
    shape: str | dict[str, Any],
    *,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """A causal LM of ``shape`` (a SHAPES name or config fields incl. ``model_type``) with random weights.

    Parameters are allocated on ``device`` in ``dtype`` (never on the CPU first); matrices are drawn from
    N(0, std²), norm weights are 1 and biases 0.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise UnknownShape(f"unknown shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
        fields = dict(SHAPES[shape])
    else:
        fields = dict(shape)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval()
