"""Quality of skip plans on equal terms: the same model, the same held-out text, the same task documents.

Every plan is applied as fixed decisions on one RoutedModel (what the pruned folder computes), so Router-Tuning
plans, Attention-Drop plans and the base model (no skip) are scored by exactly the same code.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..planning import SkipPlan
from ..routing.routed import RoutedModel
from .quality import perplexity
from .tasks import evaluate


def evaluate_plans(
    loaded: Any,
    plans: Sequence[SkipPlan],
    heldout_blocks: torch.Tensor,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = 200,
    batch_size: int = 8,
    task_batch_size: int = 16,
    include_base: bool = True,
    backend: str = "auto",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One entry per plan (plus the base model): method, skip ratio, skipped layers, perplexity, task accuracies."""
    n = loaded.model.config.num_hidden_layers
    targets = {p.target for p in plans} or {"attn"}
    if len(targets) > 1:
        raise ValueError("evaluate_plans compares plans of one target at a time")
    routed = RoutedModel.from_model(loaded.model, target=targets.pop(), layers=list(range(n)),
                                    base_model_id=loaded.source.model_id)
    entries: list[dict[str, Any]] = []
    try:
        runs: list[tuple[str, SkipPlan | None]] = [("base", None)] if include_base else []
        runs += [(p.method, p) for p in plans]
        for method, plan in runs:
            t0 = time.perf_counter()
            skip = [] if plan is None else plan.skip
            with routed.forced_decisions({i: i not in skip for i in range(n)}):
                ppl = perplexity(routed, heldout_blocks, batch_size=batch_size, progress=progress)
                scores = (evaluate(routed, loaded.tokenizer, tasks, limit=limit, backend=backend,
                                   batch_size=task_batch_size, progress=progress) if tasks else {})
            entries.append({
                "method": method,
                "skip_ratio": len(skip) / n,
                "skipped_layers": list(skip),
                "perplexity": ppl,
                "tasks": scores,
                "seconds": round(time.perf_counter() - t0, 2),
            })
    finally:
        routed.unwrap()
    return entries


def mean_accuracy(entry: dict[str, Any], metric: str = "acc") -> float | None:
    accs = [v.get(metric, v.get("acc")) for v in (entry.get("tasks") or {}).values()]
    accs = [a for a in accs if a is not None]
    return sum(accs) / len(accs) if accs else None
