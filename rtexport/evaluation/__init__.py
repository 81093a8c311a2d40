"""Evaluation: quality (perplexity, zero-shot tasks offline or through lm-eval) and comparison tables."""

from .compare import format_layers, quality_table
from .quality import LogLikelihood, perplexity, score_requests
from .tasks import (
    DEFAULT_TASKS,
    choose_backend,
    evaluate,
    evaluate_tasks,
    evaluate_with_lm_eval,
    list_offline_tasks,
    load_offline_task,
)

__all__ = [
    "DEFAULT_TASKS",
    "LogLikelihood",
    "choose_backend",
    "evaluate",
    "evaluate_tasks",
    "evaluate_with_lm_eval",
    "format_layers",
    "list_offline_tasks",
    "load_offline_task",
    "perplexity",
    "quality_table",
    "score_requests",
]
