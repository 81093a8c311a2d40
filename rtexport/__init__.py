"""rtexport: Router-Tuning for pretrained LLMs, and the artifacts people deploy from it.

The public API (imported lazily so that ``import rtexport`` stays cheap)::

    load_model, tune, TuneSettings, make_plan, SkipPlan, RoutedModel, RouterConfig, prune, load_pruned,
    export_onnx, validate, evaluate, evaluate_plans, perplexity, bench, render_card, push_to_hub,
    tune_and_export, PipelineSettings
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "rtexport.models.loading",
    "wrap_model": "rtexport.models.loading",
    "tune": "rtexport.tuning.trainer",
    "TuneSettings": "rtexport.tuning.trainer",
    "load_tuned": "rtexport.tuning.trainer",
    "make_plan": "rtexport.planning",
    "SkipPlan": "rtexport.planning",
    "RoutedModel": "rtexport.routing",
    "RouterConfig": "rtexport.routing",
    "prune": "rtexport.pruning",
    "load_pruned": "rtexport.pruning",
    "export_onnx": "rtexport.onnx.export",
    "validate": "rtexport.evaluation.parity",
    "evaluate": "rtexport.evaluation.tasks",
    "evaluate_plans": "rtexport.evaluation.plan_quality",
    "perplexity": "rtexport.evaluation.quality",
    "bench": "rtexport.bench",
    "render_card": "rtexport.packaging.card",
    "push_to_hub": "rtexport.packaging.hub",
    "tune_and_export": "rtexport.pipeline",
    "PipelineSettings": "rtexport.pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(_API[name])
        return module if name == "bench" else getattr(module, name)
    raise AttributeError(f"module 'rtexport' has no attribute {name!r}")
