"""Tiny random models exported to ONNX once per test session, shared by test_onnx_export.py and test_validate.py.

An export takes 10-60 s on two cores, so each (architecture, mode) pair is exported once and kept in a temporary
folder removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import build_model, build_tokenizer

from rtexport.models.loading import wrap_model
from rtexport.onnx.export import export_onnx
from rtexport.planning import SkipPlan
from rtexport.routing import RoutedModel

NUM_LAYERS = 4
STATIC_SKIP = [1, 2]  # attention removed from layers 1 and 2: KV only for layers 0 and 3
ROUTED_LAYERS = [1, 2]
PREFILL_ALWAYS = [1]  # mode "gated_always"


@dataclass
class Case:
    arch: str
    mode: str
    model: Any
    loaded: Any
    onnx_dir: Path
    plan: SkipPlan | None = None
    routed: RoutedModel | None = None


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="rtexport-onnx-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def randomise_routers(routed: RoutedModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))


@functools.cache
def exported(arch: str, mode: str, logits: str = "all") -> Case:
    """``mode``: static, gated, gated_always (gated, routed layer ``PREFILL_ALWAYS`` without an ``If`` at
    prefill), preallocated (the static graph with a preallocated KV cache) or gqa (that cache
    written by ONNX Runtime's GroupQueryAttention; needs ``logits="selected"``); ``logits``: all, or selected (the
    graph takes ``logits_positions``). The same random model for every mode of ``arch``."""
    model = build_model(arch, num_hidden_layers=NUM_LAYERS)
    loaded = wrap_model(model, tokenizer=build_tokenizer(), model_id=f"tiny-{arch}")
    out = _root() / f"{arch}-{mode}-{logits}"
    if mode in ("static", "preallocated", "gqa"):
        plan = SkipPlan(base_model=f"tiny-{arch}", fingerprint=loaded.fingerprint, num_layers=NUM_LAYERS,
                        target="attn", method="manual", skip=STATIC_SKIP, candidates=STATIC_SKIP)
        export_onnx(loaded, out, mode="static", plan=plan, attention="gqa" if mode == "gqa" else "auto",
                    kv_cache="growing" if mode == "static" else "preallocated", logits=logits)
        return Case(arch, mode, model, loaded, out, plan=plan)
    routed = RoutedModel.from_model(model, layers=ROUTED_LAYERS)
    randomise_routers(routed)
    # gated_always: the first routed layer runs at prefill without an If (masked per sequence), the other in one
    always = PREFILL_ALWAYS if mode == "gated_always" else "none"
    export_onnx(loaded, out, mode="gated", routed=routed, logits=logits, prefill_always=always)
    return Case(arch, mode, model, loaded, out, routed=routed)


@contextlib.contextmanager
def reference(case: Case):
    """PyTorch computing what the graph computes: the plan's sub-blocks forced off, or the routers deciding."""
    if case.mode in ("gated", "gated_always"):
        yield case.model
        return
    routed = RoutedModel.from_model(case.model, layers=case.plan.candidates)
    try:
        with routed.forced_decisions(case.plan.run_map()):
            yield case.model
    finally:
        routed.unwrap()


def random_sequences(n: int, seed: int, lo: int = 3, hi: int = 9) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def right_pad(seqs, pad_id=0):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
