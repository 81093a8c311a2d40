"""SkipPlan: which routed sub-blocks a deployment drops, from router execution rates or from Attention Drop.

A plan is a small JSON file a person can read and edit::

    {"format": "rtexport.skip_plan/1", "method": "router-tuning", "target": "attn",
     "base_model": "...", "fingerprint": "...", "num_layers": 30,
     "skip": [17, 20, 23], "candidates": [15, ..., 28], "scores": {"15": 0.98, ...}, ...}

``scores`` are what the ranking used: execution rates (router-tuning; lower = skipped first), the cosine
similarity between a sub-block's input and output (attention-drop; higher = skipped first), or the calibration
perplexity after each greedy removal (loss-search; the order in which layers were removed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import ArtifactMismatch, DataError
from .fsutil import read_artifact, write_json_atomic

PLAN_FORMAT = "rtexport.skip_plan/1"
METHODS = ("router-tuning", "attention-drop", "loss-search", "manual")


@dataclass
class SkipPlan:
    base_model: str
    fingerprint: str
    num_layers: int
    target: str
    method: str
    skip: list[int]
    candidates: list[int] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    base_revision: str | None = None
    base_gguf_file: str | None = None
    format: str = PLAN_FORMAT

    def __post_init__(self) -> None:
        self.skip = sorted(int(i) for i in self.skip)
        if self.method not in METHODS:
            raise ArtifactMismatch(f"plan method must be one of {', '.join(METHODS)}, got {self.method!r}")
        bad = [i for i in self.skip if not 0 <= i < self.num_layers]
        if bad:
            raise ArtifactMismatch(f"plan skips layers {bad}, but the model has {self.num_layers} layers")

    # ---- derived views -----------------------------------------------------------------------------------------
    @property
    def kept(self) -> list[int]:
        """Layers whose target sub-block is kept (all layers for the other sub-block kinds)."""
        return [i for i in range(self.num_layers) if i not in set(self.skip)]

    @property
    def skip_ratio(self) -> float:
        return len(self.skip) / self.num_layers

    def run_map(self) -> dict[int, bool]:
        """layer -> run? for every candidate and skipped layer (what ``RoutedModel.forced_decisions`` takes)."""
        layers = set(self.candidates) | set(self.skip)
        return {i: i not in self.skip for i in sorted(layers)}

    def kv_layers(self) -> list[int]:
        """Layers that keep an attention KV cache after pruning."""
        if self.target in ("attn", "block"):
            return self.kept
        return list(range(self.num_layers))

    # ---- IO ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_ratio"] = round(self.skip_ratio, 6)
        d["kept"] = self.kept
        return {"format": d.pop("format"), **d}

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SkipPlan":
        d = read_artifact(path, what="rtexport skip plan", format=PLAN_FORMAT)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def check_model(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise ArtifactMismatch(
                f"this plan was made for {self.base_model} (fingerprint {self.fingerprint}), "
                f"not for this model (fingerprint {fingerprint})"
            )


def resolve_skip_count(num_layers: int, candidates: int, skip_ratio: float | None, skip_layers: int | None) -> int:
    """How many sub-blocks to drop: an exact count, or a ratio of *all* the model's layers (rounded half up)."""
    if (skip_ratio is None) == (skip_layers is None):
        raise DataError("give exactly one of --skip-ratio or --skip-layers")
    if skip_layers is not None:
        n = int(skip_layers)
    else:
        if not 0.0 <= float(skip_ratio) <= 1.0:
            raise DataError(f"--skip-ratio must be within [0, 1], got {skip_ratio}")
        n = int(math.floor(float(skip_ratio) * num_layers + 0.5))
    if n < 0 or n > candidates:
        raise DataError(f"cannot skip {n} layers: only {candidates} layers are candidates (routed layers)")
    return n


def _plan_from_order(
    method: str,
    order: list[int],
    candidates: list[int],
    scores: dict[int, float],
    *,
    num_layers: int,
    skip_ratio: float | None,
    skip_layers: int | None,
    calibration: dict[str, Any] | None,
    **fields: Any,
) -> SkipPlan:
    """The plan that drops the first k layers of ``order`` (k from the ratio or count), with its ranking scores."""
    n = resolve_skip_count(num_layers, len(candidates), skip_ratio, skip_layers)
    if n > len(order):
        raise DataError(f"only {len(order)} layers are ranked; the plan needs {n}")
    return SkipPlan(
        num_layers=num_layers,
        method=method,
        skip=order[:n],
        candidates=sorted(candidates),
        scores={str(i): round(float(v), 6) for i, v in scores.items()},
        calibration=calibration or {},
        **fields,
    )


def plan_from_execution_rates(
    rates: dict[int, float],
    mean_scores: dict[int, float],
    *,
    base_model: str,
    fingerprint: str,
    num_layers: int,
    target: str,
    skip_ratio: float | None = None,
    skip_layers: int | None = None,
    calibration: dict[str, Any] | None = None,
    **source: Any,
) -> SkipPlan:
    """Drop the routed layers the routers execute least often (ties broken by the mean router score)."""
    candidates = sorted(int(i) for i in rates)
    order = sorted(candidates, key=lambda i: (rates[i], mean_scores.get(i, 0.0), -i))
    means = {str(i): round(float(mean_scores.get(i, 0.0)), 6) for i in candidates}
    return _plan_from_order("router-tuning", order, candidates, {i: rates[i] for i in candidates},
                            num_layers=num_layers, skip_ratio=skip_ratio, skip_layers=skip_layers,
                            calibration={**(calibration or {}), "mean_router_score": means},
                            base_model=base_model, fingerprint=fingerprint, target=target, **source)


def plan_from_routed(routed: Any, calib: torch.Tensor, *, batch_size: int = 4, **plan_fields: Any) -> SkipPlan:
    """Run tuned routers over calibration blocks at their threshold and drop the least-executed layers."""
    from .tuning.trainer import collect_scores, execution_rates

    thr = routed.state.threshold
    rates, means = execution_rates(collect_scores(routed, calib, batch_size), thr)
    plan_fields.setdefault("calibration", {})["threshold"] = thr
    return plan_from_execution_rates(rates, means, target=routed.config.target, **plan_fields)


def plan_from_similarity(
    similarity: dict[int, float],
    *,
    base_model: str,
    fingerprint: str,
    num_layers: int,
    target: str,
    skip_ratio: float | None = None,
    skip_layers: int | None = None,
    calibration: dict[str, Any] | None = None,
    **source: Any,
) -> SkipPlan:
    """Attention Drop (arXiv 2406.15786): drop the sub-blocks whose output is most cosine-similar to their input."""
    candidates = sorted(int(i) for i in similarity)
    order = sorted(candidates, key=lambda i: (-similarity[i], -i))
    return _plan_from_order("attention-drop", order, candidates, {i: similarity[i] for i in candidates},
                            num_layers=num_layers, skip_ratio=skip_ratio, skip_layers=skip_layers,
                            calibration=calibration, base_model=base_model, fingerprint=fingerprint, target=target,
                            **source)


@torch.no_grad()
def greedy_loss_search(
    model: torch.nn.Module,
    calib: torch.Tensor,
    candidates: list[int],
    max_skip: int,
    *,
    target: str = "attn",
    batch_size: int = 8,
    progress: bool = False,
) -> list[tuple[int, float]]:
    """Backward elimination by measured loss: repeatedly drop the candidate whose removal raises the perplexity of
    ``calib`` least, until ``max_skip`` are dropped. Returns [(layer, perplexity after dropping it), ...] in removal
    order, so the first k entries are the k-layer plan. Costs about ``len(candidates) * max_skip`` passes over
    ``calib``: a reference (and a strong baseline) that needs no training, but scales poorly with depth.
    """
    from .evaluation.quality import perplexity
    from .routing.routed import RoutedModel

    n = model.config.num_hidden_layers
    routed = RoutedModel.from_model(model, target=target, layers=list(range(n)))
    removed: list[tuple[int, float]] = []
    try:
        for _ in range(min(max_skip, len(candidates))):
            gone = {layer for layer, _ in removed}
            best: tuple[int, float] | None = None
            for c in candidates:
                if c in gone:
                    continue
                with routed.forced_decisions({i: i not in gone | {c} for i in range(n)}):
                    ppl = perplexity(routed, calib, batch_size=batch_size, progress=False)
                if best is None or ppl < best[1]:
                    best = (c, ppl)
            assert best is not None
            removed.append(best)
            if progress:
                print(f"loss-search: drop {best[0]} -> perplexity {best[1]:.3f}", flush=True)
    finally:
        routed.unwrap()
    return removed


def plan_from_loss_search(
    removal: list[tuple[int, float]],
    candidates: list[int],
    *,
    base_model: str,
    fingerprint: str,
    num_layers: int,
    target: str,
    skip_ratio: float | None = None,
    skip_layers: int | None = None,
    calibration: dict[str, Any] | None = None,
    **source: Any,
) -> SkipPlan:
    """The first k layers of a :func:`greedy_loss_search` removal order as a plan."""
    return _plan_from_order("loss-search", [layer for layer, _ in removal], candidates, dict(removal),
                            num_layers=num_layers, skip_ratio=skip_ratio, skip_layers=skip_layers,
                            calibration=calibration, base_model=base_model, fingerprint=fingerprint, target=target,
                            **source)


@torch.no_grad()
def measure_similarity(
    model: torch.nn.Module,
    adapter: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    target: str = "attn",
    layers: list[int] | None = None,
) -> dict[int, float]:
    """Mean cosine similarity between each sub-block's input X and output X + f(norm(X)) over real tokens.

    Uses forward hooks only (no change to the model). ``layers`` defaults to every layer but the last.
    """
    decoder = adapter.decoder_layers(model)
    n = len(decoder)
    layers = list(range(n - 1)) if layers is None else list(layers)
    sums = {i: 0.0 for i in layers}
    count = {i: 0.0 for i in layers}
    captured: dict[int, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]
    handles = []

    def accumulate(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
        m = mask_box[0]
        if m is not None:
            m = m[:, -cos.shape[1]:].to(cos.dtype)
            sums[i] += float((cos * m).sum())
            count[i] += float(m.sum())
        else:
            sums[i] += float(cos.sum())
            count[i] += cos.numel()

    for i in layers:
        layer = decoder[i]
        inner = getattr(layer, "layer", layer)  # a RoutedDecoderLayer holds the original in .layer

        def pre(mod, args, kwargs, i=i):
            captured[i] = args[0] if args else kwargs["hidden_states"]

        if target == "attn":
            sub = adapter.attention(inner)
        elif target == "mlp":
            sub = adapter.feed_forward(inner)
            norm = adapter.feed_forward_norm(inner)

            def norm_pre(mod, args, kwargs, i=i):
                captured[i] = args[0] if args else kwargs["hidden_states"]

            handles.append(norm.register_forward_pre_hook(norm_pre, with_kwargs=True))
        else:
            sub = None

        if sub is not None:
            def post(mod, args, kwargs, out, i=i):
                delta = out[0] if isinstance(out, tuple) else out
                x = captured.pop(i)
                accumulate(i, x, x + delta)

            if target == "attn":
                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(sub.register_forward_hook(post, with_kwargs=True))
        else:
            def block_post(mod, args, kwargs, out, i=i):
                y = out[0] if isinstance(out, tuple) else out
                accumulate(i, captured.pop(i), y)

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(block_post, with_kwargs=True))
    try:
        for batch in batches:
            mask_box[0] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    finally:
        for h in handles:
            h.remove()
    return {i: sums[i] / max(count[i], 1.0) for i in layers}


def make_plan(
    loaded: Any,
    *,
    method: str = "router-tuning",
    routers: str | Path | None = None,
    skip_ratio: float | None = None,
    skip_layers: int | None = None,
    data: str | None = None,
    seq_len: int = 512,
    blocks: int = 32,
    batch_size: int = 4,
    layers: list[int] | str | None = None,
    target: str = "attn",
) -> SkipPlan:
    """Build a SkipPlan for ``loaded`` from tuned routers (``method='router-tuning'``), from Attention Drop's
    cosine rule (``method='attention-drop'``) or from a greedy search by measured calibration perplexity
    (``method='loss-search'``; about candidates x skipped passes over the calibration text), all measured on the same
    calibration text."""
    from .routing.config import parse_layers
    from .tuning.data import load_blocks

    calib, info = load_blocks(loaded.tokenizer, data, seq_len=seq_len, max_blocks=blocks)
    calibration = {"source": info.to_dict(), "blocks": int(calib.shape[0]), "seq_len": seq_len}
    src = dict(base_revision=loaded.source.revision, base_gguf_file=loaded.source.gguf_file)
    common = dict(base_model=loaded.source.model_id, fingerprint=loaded.fingerprint,
                  num_layers=loaded.model.config.num_hidden_layers, skip_ratio=skip_ratio, skip_layers=skip_layers,
                  calibration=calibration, **src)
    if method == "router-tuning":
        if routers is None:
            raise DataError("a router-tuning plan needs the tuned routers folder")
        from .tuning.trainer import load_tuned

        routed = load_tuned(loaded, routers)
        try:
            calibration["routers"] = str(routers)
            return plan_from_routed(routed, calib, batch_size=batch_size, **common)
        finally:
            routed.unwrap()
    if method == "attention-drop":
        n = loaded.model.config.num_hidden_layers
        cand = parse_layers(layers, n)
        batches = [{"input_ids": calib[i : i + batch_size].to(loaded.device)} for i in range(0, calib.shape[0], batch_size)]
        sim = measure_similarity(loaded.model, loaded.adapter, batches, target=target, layers=cand)
        return plan_from_similarity(sim, target=target, **common)
    if method == "loss-search":
        n = loaded.model.config.num_hidden_layers
        cand = parse_layers(layers, n)
        k = resolve_skip_count(n, len(cand), skip_ratio, skip_layers)
        removal = greedy_loss_search(loaded.model, calib, cand, k, target=target, batch_size=batch_size)
        return plan_from_loss_search(removal, cand, target=target, **common)
    raise DataError(f"unknown plan method {method!r}: use router-tuning, attention-drop or loss-search")
