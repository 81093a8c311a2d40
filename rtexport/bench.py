"""Side-by-side speed of causal language models: prefill and decode, medians, and speedups against a baseline.

How each number is taken (``METHODS`` holds these labels, and every result carries them):

* prefill: one forward over a random prompt (``use_cache=False``, ``logits_to_keep=1``), warm-up calls first, then the
  median of repeated calls, timed with CUDA events on a GPU and a host clock on the CPU.
* decode on a GPU: milliseconds per greedy decode step through a transformers ``StaticCache``. The step (forward of
  one token per sequence + argmax + position update) is captured once in a CUDA graph and replayed ``new_tokens``
  times after an eager prefill of the prompt; CUDA events around the replays. No ``torch.compile``: every model runs
  the same captured step, so the comparison holds kernels and launch costs equal. A model that offers
  ``make_static_cache(batch, max_length)`` gets its own cache (a pruned model: entries for its kept attention layers
  only); any other gets ``StaticCache(config=...)``.
* decode on the CPU: the same greedy steps, eager, through a ``DynamicCache`` (no graph, no compile), host clock.

``compare`` runs several models in one process, cell by cell with the models interleaved, and computes
``speedup = baseline_ms / model_ms`` and, for named pairs, ``variant_ms / reference_ms`` turned into the share of the
reference's speedup that the variant reaches. ``format_table`` renders the result as markdown.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
from torch import nn

from .errors import RtexportError

METHODS = {
    "prefill": "forward over the prompt, use_cache=False, logits_to_keep=1; median of timed calls after warm-up",
    "decode_cuda": "greedy decode step through a StaticCache, captured once in a CUDA graph and replayed "
    "(no torch.compile); CUDA events; ms per step",
    "decode_cpu": "greedy decode step, eager, through a DynamicCache (no graph, no compile); host clock; ms per step",
}


class BenchmarkSetupError(RtexportError):
    """A benchmark asked for something that cannot be measured (bad shape, unknown baseline...)."""


@dataclass(frozen=True)
class Cell:
    """One measurement: ``prefill`` of ``batch`` × ``prompt_len`` tokens, or ``decode`` of ``new_tokens`` steps after
    such a prompt."""

    kind: str
    batch: int
    prompt_len: int
    new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("prefill", "decode"):
            raise BenchmarkSetupError(f"cell kind must be 'prefill' or 'decode', not {self.kind!r}")
        if self.batch < 1 or self.prompt_len < 1:
            raise BenchmarkSetupError(f"batch and prompt length must be positive ({self.batch} × {self.prompt_len})")
        if self.kind == "decode" and self.new_tokens < 1:
            raise BenchmarkSetupError("a decode cell needs at least one new token")

    @classmethod
    def prefill(cls, batch: int, prompt_len: int) -> Cell:
        return cls("prefill", batch, prompt_len)

    @classmethod
    def decode(cls, batch: int, prompt_len: int, new_tokens: int) -> Cell:
        return cls("decode", batch, prompt_len, new_tokens)

    @property
    def key(self) -> str:
        if self.kind == "prefill":
            return f"prefill_b{self.batch}_s{self.prompt_len}"
        return f"decode_b{self.batch}_p{self.prompt_len}_n{self.new_tokens}"

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill b{self.batch}×{self.prompt_len}"
        return f"decode b{self.batch} ({self.prompt_len}+{self.new_tokens})"


@dataclass
class Timing:
    """Median and samples (ms; ms per step for decode) of one model in one cell."""

    median_ms: float
    samples_ms: list[float]
    method: str
    tokens: torch.Tensor | None = None  # decode: the greedy tokens of the last repetition (B, new_tokens + 1), CPU
    kv_cache_bytes: int | None = None  # decode: bytes of K/V the cache held


# ---- helpers -------------------------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 names the forward's cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _random_ids(model: nn.Module, batch: int, length: int, seed: int) -> torch.Tensor:
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(_device(model))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Elapsed milliseconds of a region: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def measure(self, out: list[float]) -> Iterator[None]:
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            yield
            out.append((time.perf_counter() - t0) * 1000.0)


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors a transformers cache holds (allocated ones only)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def new_static_cache(model: nn.Module, batch: int, max_length: int) -> Any:
    """The model's own static cache when it offers one (``make_static_cache``), else transformers' ``StaticCache``."""
    make = getattr(model, "make_static_cache", None)
    if callable(make):
        return make(batch, max_length)
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_length)


# ---- prefill -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def time_prefill(
    model: nn.Module, batch: int, prompt_len: int, *, warmup: int = 2, reps: int = 7, seed: int = 0
) -> Timing:
    """Median milliseconds of one forward over a random ``batch`` × ``prompt_len`` prompt (no cache, last logits)."""
    Cell.prefill(batch, prompt_len)  # validates
    device = _device(model)
    ids = _random_ids(model, batch, prompt_len, seed)
    clock = _Clock(device)
    for _ in range(warmup):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    samples: list[float] = []
    for _ in range(reps):
        with clock.measure(samples):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return Timing(statistics.median(samples), samples, METHODS["prefill"])


# ---- decode --------------------------------------------------------------------------------------------------------
@dataclass
class _DecodeState:
    """Static buffers of the greedy decode loop: the step reads and updates them in place (capturable)."""

    cache: Any
    tok: torch.Tensor  # (B, 1) the token each sequence feeds next
    pos: torch.Tensor  # (B, 1) its position
    generated: torch.Tensor  # (B, new_tokens) tokens produced by the steps
    mask: torch.Tensor | None = None  # (B, 1, 1, capacity) for a static cache, in the model's mask format
    slots: torch.Tensor | None = None  # (1, 1, 1, capacity) slot indices
    allowed: torch.Tensor | None = None  # (B, 1, 1, capacity) boolean, when the model wants an additive float mask
    first: torch.Tensor | None = field(default=None)  # (B, 1) the prefill's token


def _decode_step(model: nn.Module, state: _DecodeState, prompt_len: int) -> Callable[[], None]:
    cache_kw = _cache_kwarg(model)

    def step() -> None:
        if state.mask is not None:
            # slot j attends iff j <= position (slots beyond are unwritten): static shape, no host sync
            if state.allowed is None:
                torch.le(state.slots, state.pos.view(-1, 1, 1, 1), out=state.mask)
            else:  # additive float mask (transformers' eager attention): 0 where allowed, the dtype's minimum elsewhere
                torch.le(state.slots, state.pos.view(-1, 1, 1, 1), out=state.allowed)
                state.mask.fill_(torch.finfo(state.mask.dtype).min).masked_fill_(state.allowed, 0.0)
        out = model(
            input_ids=state.tok, position_ids=state.pos, attention_mask=state.mask, use_cache=True,
            **{cache_kw: state.cache},
        )
        state.tok.copy_(out.logits[:, -1:].argmax(dim=-1))
        state.generated.scatter_(1, state.pos - prompt_len, state.tok)
        state.pos.add_(1)

    return step


def _prefill_into(model: nn.Module, state: _DecodeState, ids: torch.Tensor) -> None:
    """Reset the cache and run the prompt through it (eager); the loop then starts at position ``prompt_len``."""
    if state.cache is not None and hasattr(state.cache, "reset"):
        state.cache.reset()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): state.cache})
    state.first = out.logits[:, -1:].argmax(dim=-1)
    state.tok.copy_(state.first)
    state.pos.fill_(ids.shape[1])
    state.generated.zero_()


@torch.no_grad()
def time_decode(
    model: nn.Module,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    *,
    warmup: int = 1,
    reps: int = 3,
    seed: int = 0,
    cache: str = "auto",
    cuda_graph: bool | None = None,
) -> Timing:
    """Median milliseconds per greedy decode step after a random ``batch`` × ``prompt_len`` prompt.

    ``cache``: ``"static"`` (a static cache of ``prompt_len + new_tokens`` slots), ``"dynamic"``, or ``"auto"``
    (static on a GPU, dynamic on the CPU). ``cuda_graph`` (default: on a GPU) captures the step once and replays it;
    it needs the static cache. Each repetition resets the cache and prefills the prompt again (not timed), then times
    ``new_tokens`` steps. The result also carries the greedy tokens and the bytes the KV cache held.
    """
    Cell.decode(batch, prompt_len, new_tokens)  # validates
    device = _device(model)
    on_gpu = device.type == "cuda"
    if cache == "auto":
        cache = "static" if on_gpu else "dynamic"
    if cache not in ("static", "dynamic"):
        raise BenchmarkSetupError(f"cache must be 'static', 'dynamic' or 'auto', not {cache!r}")
    graph = on_gpu if cuda_graph is None else cuda_graph
    if graph and (cache != "static" or not on_gpu):
        raise BenchmarkSetupError("a CUDA-graph decode step needs a GPU and a static cache")

    capacity = prompt_len + new_tokens
    ids = _random_ids(model, batch, prompt_len, seed)
    allowed = None
    if cache == "static":
        kv = new_static_cache(model, batch, capacity)
        slots = torch.arange(capacity, device=device).view(1, 1, 1, capacity)
        mask = torch.zeros(batch, 1, 1, capacity, dtype=torch.bool, device=device)
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if attention == "eager":
            allowed = mask
            mask = torch.zeros(batch, 1, 1, capacity, dtype=next(model.parameters()).dtype, device=device)
        elif attention != "sdpa":
            raise BenchmarkSetupError(
                f"the static-cache decode step builds sdpa (boolean) or eager (additive) masks; this model uses "
                f"{attention!r} attention"
            )
    else:
        from transformers import DynamicCache

        kv, slots, mask = DynamicCache(), None, None
    state = _DecodeState(
        cache=kv,
        tok=torch.zeros(batch, 1, dtype=torch.long, device=device),
        pos=torch.zeros(batch, 1, dtype=torch.long, device=device),
        generated=torch.zeros(batch, new_tokens, dtype=torch.long, device=device),
        mask=mask,
        slots=slots,
        allowed=allowed,
    )
    step = _decode_step(model, state, prompt_len)

    def fresh_cache() -> None:
        if cache == "dynamic":
            from transformers import DynamicCache

            state.cache = DynamicCache()
        _prefill_into(model, state, ids)

    run: Callable[[], None] = step
    if graph:
        fresh_cache()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, library handles, workspaces
            for _ in range(min(2, new_tokens)):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        fresh_cache()
        cuda_graph_obj = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph_obj):
            step()
        run = cuda_graph_obj.replay

    clock = _Clock(device)
    samples: list[float] = []
    for rep in range(warmup + reps):
        fresh_cache()
        _sync(device)
        timed: list[float] = []
        with clock.measure(timed):
            for _ in range(new_tokens):
                run()
        if rep >= warmup:
            samples.append(timed[0] / new_tokens)
    _sync(device)
    tokens = torch.cat([state.first, state.generated], dim=1).cpu()
    method = METHODS["decode_cuda"] if graph else (
        METHODS["decode_cpu"] if cache == "dynamic" else "greedy decode step through a StaticCache, eager"
    )
    return Timing(statistics.median(samples), samples, method, tokens=tokens, kv_cache_bytes=cache_bytes(state.cache))


# ---- the hand-pruned ideal -----------------------------------------------------------------------------------------
class _FeedForwardOnly(nn.Module):
    """A decoder layer with its attention sub-block removed by hand: ``h + mlp(norm(h))``, nothing else."""

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states + self.mlp(self.norm(hidden_states))


@contextlib.contextmanager
def attention_removed(model: nn.Module, layers: Sequence[int]) -> Iterator[nn.Module]:
    """The speed ceiling of skipping attention in ``layers``: inside the block, those decoder layers of ``model`` run
    only their feed-forward sub-block (no attention, no KV cache writes, no routing). The layers are put back on exit.

    For transformers decoders whose layers return the hidden states as a tensor (transformers 5).
    """
    from .models.adapters import adapter_for

    adapter = adapter_for(model)
    decoder = adapter.decoder_layers(model)
    originals = {i: decoder[i] for i in layers}
    try:
        for i, layer in originals.items():
            decoder[i] = _FeedForwardOnly(adapter.feed_forward_norm(layer), adapter.feed_forward(layer))
        yield model
    finally:
        for i, layer in originals.items():
            decoder[i] = layer


# ---- side by side --------------------------------------------------------------------------------------------------
ModelEntry = nn.Module | Callable[[], ContextManager[nn.Module]]


@contextlib.contextmanager
def _entered(entry: ModelEntry) -> Iterator[nn.Module]:
    if isinstance(entry, nn.Module):
        yield entry
    else:
        with entry() as model:
            yield model


def compare(
    models: Mapping[str, ModelEntry],
    cells: Sequence[Cell],
    *,
    baseline: str | None = None,
    pairs: Mapping[str, str] | None = None,
    rounds: int = 1,
    warmup: int | None = None,
    reps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every model in every cell, side by side in this process; speedups against ``baseline`` (default: the
    first model).

    ``models`` maps a name to a model, or to a zero-argument callable returning a context manager that yields one
    (e.g. ``lambda: attention_removed(full, [23, 24])``: entered around each of its measurements). Within a cell the
    models run one after another, and ``rounds`` > 1 repeats the whole sweep, pooling the samples, so slow drifts of
    the device hit every model alike. ``pairs`` maps a variant to a reference (e.g. ``{"pruned": "ideal"}``):
    ``share[variant][cell] = speedup[variant] / speedup[reference]``.

    Returns a JSON-ready dict: ``cells`` (key -> label/kind/shape), ``models`` (name -> cell key -> median_ms,
    samples_ms, round_medians_ms, method, kv_cache_bytes), ``speedup``, ``share``, ``baseline``, ``pairs``.
    """
    if not models:
        raise BenchmarkSetupError("nothing to compare: no models given")
    names = list(models)
    baseline = baseline or names[0]
    if baseline not in models:
        raise BenchmarkSetupError(f"baseline {baseline!r} is not one of the models ({', '.join(names)})")
    pairs = dict(pairs or {})
    for variant, reference in pairs.items():
        if variant not in models or reference not in models:
            raise BenchmarkSetupError(f"pair {variant!r} / {reference!r} names a model that is not compared")
    options: dict[str, int] = {}
    if warmup is not None:
        options["warmup"] = warmup
    if reps is not None:
        options["reps"] = reps

    samples: dict[str, dict[str, list[float]]] = {n: {c.key: [] for c in cells} for n in names}
    round_medians: dict[str, dict[str, list[float]]] = {n: {c.key: [] for c in cells} for n in names}
    extra: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in names}
    for round_index in range(rounds):
        for cell in cells:
            for name in names:
                with _entered(models[name]) as model:
                    if cell.kind == "prefill":
                        timing = time_prefill(model, cell.batch, cell.prompt_len, **options)
                    else:
                        timing = time_decode(model, cell.batch, cell.prompt_len, cell.new_tokens, **options)
                samples[name][cell.key].extend(timing.samples_ms)
                round_medians[name][cell.key].append(timing.median_ms)
                extra[name][cell.key] = {"method": timing.method, "kv_cache_bytes": timing.kv_cache_bytes}
                if log is not None:
                    log(f"[round {round_index + 1}/{rounds}] {cell.label:<28} {name:<16} {timing.median_ms:10.3f} ms")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    result: dict[str, Any] = {
        "baseline": baseline,
        "pairs": pairs,
        "rounds": rounds,
        "cells": {
            c.key: {"label": c.label, "kind": c.kind, "batch": c.batch, "prompt_len": c.prompt_len,
                    "new_tokens": c.new_tokens}
            for c in cells
        },
        "models": {},
        "speedup": {},
        "share": {},
    }
    for name in names:
        result["models"][name] = {
            key: {"median_ms": statistics.median(values), "samples_ms": values,
                  "round_medians_ms": round_medians[name][key], **extra[name][key]}
            for key, values in samples[name].items()
        }
    for name in names:
        result["speedup"][name] = {
            key: result["models"][baseline][key]["median_ms"] / result["models"][name][key]["median_ms"]
            for key in result["cells"]
        }
    for variant, reference in pairs.items():
        result["share"][variant] = {
            key: result["speedup"][variant][key] / result["speedup"][reference][key] for key in result["cells"]
        }
    return result


def format_table(result: Mapping[str, Any], *, digits: int = 3) -> str:
    """Markdown: one row per model (median ms, speedup against the baseline), then one row per pair (share of the
    reference's speedup the variant reaches)."""
    keys = list(result["cells"])
    header = "| model | " + " | ".join(result["cells"][k]["label"] for k in keys) + " |"
    rule = "| --- |" + " --- |" * len(keys)
    lines = [header, rule]
    for name, row in result["models"].items():
        cells = []
        for key in keys:
            ms = row[key]["median_ms"]
            unit = " ms/step" if result["cells"][key]["kind"] == "decode" else " ms"
            text = f"{ms:.{digits}g}{unit}" if ms < 1 else f"{ms:.2f}{unit}"
            if name != result["baseline"]:
                text += f" ({result['speedup'][name][key]:.{digits}f}×)"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for variant, reference in result.get("pairs", {}).items():
        share = result["share"][variant]
        values = [f"{share[k]:.{digits}f}" if math.isfinite(share[k]) else "–" for k in keys]
        lines.append(f"| {variant} ÷ {reference} (speedup share) | " + " | ".join(values) + " |")
    return "\n".join(lines)
