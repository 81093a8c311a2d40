"""Benchmark the artifacts of a run folder side by side: the full model, the pruned folder, the ONNX graphs.

PyTorch models are timed by ``rtexport.bench.compare`` (static cache + CUDA graph decode on a GPU; eager dynamic-cache
decode on the CPU, labelled as such). ONNX graphs are timed in the same process with ONNX Runtime (IO binding on
CUDA), prefill as one session run and decode as ms per step through the exported KV cache. Every ratio is against the
full PyTorch model measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bench import Cell, compare
from .versions import device_description, package_versions


def default_cells(device: torch.device) -> list[Cell]:
    if device.type == "cuda":
        return [Cell.prefill(1, 2048), Cell.prefill(8, 1024), Cell.decode(1, 2048, 128), Cell.decode(8, 1024, 128)]
    return [Cell.prefill(1, 128), Cell.decode(1, 64, 16)]


def ort_prefill_once(lm: Any, ids: np.ndarray) -> float:
    """ms for one prefill of ``ids`` (B, T) through an ``OrtCausalLM`` that returns the greedy next token only."""
    start = time.perf_counter()
    lm.forward(ids, np.ones_like(ids), greedy=True, capacity=ids.shape[1])
    return 1000 * (time.perf_counter() - start)


def ort_decode_once(lm: Any, ids: np.ndarray, steps: int) -> float:
    """ms per token over ``steps`` greedy decode steps through an ``OrtCausalLM``, after an untimed prefill of
    ``ids`` (B, T)."""
    mask = np.ones_like(ids)
    # a preallocated cache holds the prompt and the steps, as PyTorch's static cache does; a growing one ignores it
    step = lm.forward(ids, mask, greedy=True, capacity=ids.shape[1] + steps)
    start = time.perf_counter()
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=mask.dtype)], axis=1)
        step = lm.forward(step.next_token[:, None], mask, cache=step.cache, greedy=True)
    return 1000 * (time.perf_counter() - start) / steps


def _prompt(cell: Cell, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(cell.batch, cell.prompt_len), dtype=np.int64)


def _ort_prefill_ms(lm: Any, cell: Cell, reps: int, vocab: int, seed: int = 0) -> list[float]:
    ids = _prompt(cell, vocab, seed)
    ort_prefill_once(lm, ids)  # warm-up
    return [ort_prefill_once(lm, ids) for _ in range(reps)]


def _ort_decode_ms(lm: Any, cell: Cell, reps: int, vocab: int, seed: int = 0) -> list[float]:
    ids = _prompt(cell, vocab, seed)
    ort_decode_once(lm, ids, cell.new_tokens)  # warm-up
    return [ort_decode_once(lm, ids, cell.new_tokens) for _ in range(reps)]


def bench_run_folder(
    run_dir: str | Path,
    loaded: Any,
    *,
    reps: int = 3,
    onnx: bool = True,
    hf: bool = True,
    cells: list[Cell] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time full vs pruned (vs ONNX static/gated) of a tune-and-export run folder on the current device."""
    run_dir = Path(run_dir)
    pruned = run_dir / "model" if hf and (run_dir / "model" / "config.json").is_file() else None
    graphs = {f"onnx-{m}": run_dir / "onnx-build" / m / "model.onnx" for m in ("static", "gated")} if onnx else {}
    return bench_artifacts(loaded, pruned_dir=pruned, onnx_graphs={k: v for k, v in graphs.items() if v.is_file()},
                           reps=reps, cells=cells, progress=progress)


def bench_artifacts(
    loaded: Any,
    *,
    pruned_dir: str | Path | None = None,
    onnx_graphs: dict[str, str | Path] | None = None,
    reps: int = 3,
    cells: list[Cell] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time the full model, a pruned folder and ONNX graphs side by side; rows for the report and the card."""
    device = loaded.device
    cells = cells or default_cells(device)
    models: dict[str, Any] = {"full": loaded.model}
    if pruned_dir is not None:
        from .pruning import load_pruned

        models["pruned"] = load_pruned(pruned_dir, dtype=loaded.model.dtype, device=str(device)).model
    log = (lambda msg: print(msg, flush=True)) if progress else None
    result = compare(models, cells, warmup=1, reps=reps, log=log)
    rows = []
    for name in models:
        for c in cells:
            m = result["models"][name][c.key]
            rows.append({"variant": name, "cell": c.key, "seconds": m["median_ms"] / 1000, "ms": m["median_ms"],
                         "speedup": result["speedup"][name][c.key], "method": m.get("method")})
    notes = []
    if onnx_graphs:
        vocab = loaded.model.config.vocab_size
        from .onnx.export import load_export_info
        from .onnx.runtime import OrtCausalLM

        for name, graph in onnx_graphs.items():
            # a preallocated-cache graph replays its decode step as a CUDA graph on CUDAExecutionProvider
            kv_cache = load_export_info(graph).get("kv_cache", "growing")
            lm = OrtCausalLM(graph, cuda_graph=kv_cache == "preallocated")
            for c in cells:
                ms = (_ort_prefill_ms if c.kind == "prefill" else _ort_decode_ms)(lm, c, reps, vocab)
                med = statistics.median(ms)
                full_ms = result["models"]["full"][c.key]["median_ms"]
                rows.append({"variant": name, "cell": c.key, "seconds": med / 1000, "ms": med,
                             "speedup": full_ms / med, "method": f"onnxruntime {lm.device_type} ({'IO binding' if lm.io_binding else 'numpy'}"
                             f"{', CUDA graph decode' if lm.cuda_graph else ''})"})
            del lm
        notes.append("ONNX rows: ONNX Runtime in the same process; the speedup is against the full PyTorch model.")
    if device.type == "cpu":
        notes.append("CPU timings (eager PyTorch, dynamic cache): indicative only; GPU claims come from GPU runs.")
    return {
        "device": device_description(device),
        "versions": package_versions(),
        "method": "static cache + CUDA graph decode" if device.type == "cuda" else "eager PyTorch, dynamic cache (CPU)",
        "cells": [c.key for c in cells],
        "rows": rows,
        "note": " ".join(notes) or None,
        "compare": result,
    }
