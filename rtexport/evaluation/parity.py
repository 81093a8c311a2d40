"""Parity: the PyTorch model against the exported ONNX graph under ONNX Runtime, on the same batched, padded inputs.

Checks (each with its value, tolerance and verdict):

* ``max_abs_logits_diff``: the largest absolute logits difference over real (non-padding) tokens;
* ``top1_agreement``: the share of real tokens whose argmax agrees;
* ``greedy_agreement``: greedy decoding for ``steps`` tokens through each side's KV cache; the share of generated
  tokens that agree before the first divergence (tokens after it count as disagreements);
* ``perplexity_rel_diff``: |ppl(onnx) - ppl(torch)| / ppl(torch) over the same next-token predictions;
* gated graphs: ``decision_agreement``, the share of (sequence, routed layer) decisions that agree.

The reference is what the graph was exported from: a plain Hugging Face model or a ``RoutedModel``. For a static
graph, the plan recorded in ``export_info.json`` is applied to it (its skipped sub-blocks forced off); for a gated
graph it must be the ``RoutedModel`` whose routers were exported. ``report.raise_if_failed()`` raises
``ValidationFailed`` (exit code 3). Computing the report and rendering it (``parity_table``) are separate.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactMismatch, DataError, ValidationFailed
from ..fsutil import write_json_atomic

REPORT_FORMAT = "rtexport.parity_report/1"

# Defaults per graph dtype. Measured on SmolLM2-135M (30 layers, 6 attention layers dropped), 9 padded sequences
# (361 real tokens), 24 greedy steps, CPU: float32 graph max |logits diff| 2.1e-4, perplexity rel. diff 4.7e-7,
# top-1 and greedy agreement 1.0; float16 graph against the float32 model: 0.067, 4.5e-4, 1.0 and 0.977.
# The tolerances leave about 5x (float32) and 4x (float16) room above those.
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"atol": 1e-3, "top1": 0.999, "greedy": 1.0, "ppl_rel": 1e-4, "decisions": 1.0},
    "float16": {"atol": 0.25, "top1": 0.97, "greedy": 0.75, "ppl_rel": 1e-2, "decisions": 0.97},
}


@dataclass
class Check:
    name: str
    value: float
    tolerance: float
    passed: bool
    higher_is_better: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParityReport:
    onnx_dir: str
    mode: str
    dtype: str
    providers: list[str]
    sequences: int
    real_tokens: int
    steps: int
    checks: list[Check]
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    format: str = REPORT_FORMAT

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["checks"] = [c.to_dict() for c in self.checks]
        return {"format": d.pop("format"), **d}

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    def raise_if_failed(self) -> None:
        if self.failed:
            parts = [
                f"{c.name} {_fmt(c.value)} {'<' if c.higher_is_better else '>'} {_fmt(c.tolerance)}" for c in self.failed
            ]
            raise ValidationFailed(f"ONNX parity failed for {self.onnx_dir}: " + "; ".join(parts))


def _fmt(x: float) -> str:
    if isinstance(x, float) and (x == 0 or 1e-3 <= abs(x) < 1e4):
        return f"{x:.4f}"
    return f"{x:.3g}"


def parity_table(report: ParityReport) -> Any:
    """A rich Table of the report's checks (rendering only; nothing is computed here)."""
    from rich.table import Table

    cache = ", preallocated KV cache" if report.details.get("kv_cache") == "preallocated" else ""
    if report.details.get("attention") == "gqa":
        cache += " (GroupQueryAttention)"
    table = Table(title=f"ONNX parity: {report.mode} graph{cache}, {report.dtype} ({', '.join(report.providers)})")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("result")
    for c in report.checks:
        bound = f"{'>=' if c.higher_is_better else '<='} {_fmt(c.tolerance)}"
        verdict = "[green]pass[/green]" if c.passed else "[bold red]FAIL[/bold red]"
        table.add_row(c.name, _fmt(c.value), bound, verdict)
    table.caption = (
        f"{report.sequences} sequences, {report.real_tokens} real tokens, greedy {report.steps} steps, "
        f"{report.seconds:.1f} s"
    )
    return table


# ---- the PyTorch side ------------------------------------------------------------------------------------------
def _causal_lm(reference: Any) -> nn.Module:
    from ..routing import RoutedModel

    return reference.base_model if isinstance(reference, RoutedModel) else reference


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 names the cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@contextlib.contextmanager
def reference_model(reference: Any, info: dict[str, Any]) -> Iterator[tuple[nn.Module, Any]]:
    """The PyTorch model that computes what the graph computes, as ``(causal_lm, routed_or_None)``.

    Static graph: the plan's skipped sub-blocks are forced off (wrapping a plain model for the duration).
    Gated graph: the ``RoutedModel`` decides, at the exported threshold; plan-skipped sub-blocks are forced off.
    """
    from ..routing import RoutedModel

    spec = info["spec"]
    plan = info.get("plan") or {}
    skip = [int(i) for i in plan.get("skip", [])]
    target = plan.get("target", spec.get("target", "attn"))
    lm = _causal_lm(reference)
    if spec["mode"] == "gated":
        if not isinstance(reference, RoutedModel):
            raise ArtifactMismatch("a gated graph is validated against the RoutedModel whose routers it holds")
        missing = sorted(set(int(i) for i in spec["routed_layers"]) - set(reference.layers))
        if missing or reference.config.target != spec["target"]:
            raise ArtifactMismatch(
                f"the RoutedModel routes {reference.config.target} on layers {reference.layers}; the graph routes "
                f"{spec['target']} on layers {spec['routed_layers']}"
            )
        unforced = sorted(set(skip) - set(reference.layers))
        if unforced:
            raise ArtifactMismatch(f"the plan skips layers {unforced} that the RoutedModel does not wrap")
        with reference.threshold(float(spec["threshold"])), reference.forced_decisions({i: False for i in skip}):
            yield lm, reference
        return
    if not skip:
        if isinstance(reference, RoutedModel):
            with reference.forced_decisions({i: True for i in reference.layers}):
                yield lm, None
        else:
            yield lm, None
        return
    if isinstance(reference, RoutedModel):
        if reference.config.target != target or not set(skip) <= set(reference.layers):
            raise ArtifactMismatch(
                f"the plan skips {target} on layers {skip}; the RoutedModel routes {reference.config.target} on "
                f"layers {reference.layers}"
            )
        run = {i: i not in skip for i in reference.layers}
        with reference.forced_decisions(run):
            yield lm, None
        return
    wrapper = RoutedModel.from_model(lm, target=target, layers=skip)
    try:
        with wrapper.forced_decisions({i: False for i in skip}):
            yield lm, None
    finally:
        wrapper.unwrap()


@contextlib.contextmanager
def reference_for(loaded: Any, plan: Any = None, routed: Any = None) -> Iterator[nn.Module]:
    """The PyTorch model a graph is checked against: the routers (gated), or the model with the plan's decisions
    fixed (static), or the plain model. A routed wrapper made here for a plan is removed again on exit."""
    made = None
    if routed is None and plan is not None:
        from ..routing import RoutedModel

        made = RoutedModel.from_model(loaded.model, target=plan.target, layers=sorted(plan.run_map()),
                                      base_model_id=loaded.source.model_id)
    reference = routed if routed is not None else made
    try:
        if reference is None:
            yield loaded.model
        elif plan is not None:
            with reference.forced_decisions(plan.run_map()):
                yield reference
        else:
            yield reference
    finally:
        if made is not None:
            made.unwrap()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0) * (attention_mask > 0)


@torch.no_grad()
def torch_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return out.logits.float().cpu()


@torch.no_grad()
def torch_greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through the model's own KV cache, positions counted over real tokens (as the ONNX loop)."""
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    key = _cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True)
    tokens = []
    for n in range(steps):
        token = out.logits[:, -1].float().argmax(-1)
        tokens.append(token)
        if n == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = positions(mask)[:, -1:]
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **{key: _returned_cache(out)})
    return torch.stack(tokens, dim=1).cpu()


# ---- inputs --------------------------------------------------------------------------------------------------
def token_batches_from_texts(
    tokenizer: Any, texts: Sequence[str], batch_size: int, max_length: int
) -> list[dict[str, torch.Tensor]]:
    """Left-padded batches (the layout generation needs), each text truncated to ``max_length`` tokens."""
    if tokenizer is None:
        raise DataError("validating on texts needs a tokenizer")
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = [t for t in texts[start:start + batch_size]]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [_fallback_token(tokenizer)]
                   for t in chunk]
        batches.append(left_pad(encoded, pad_id=_pad_id(tokenizer)))
    return batches


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))


def _fallback_token(tokenizer: Any) -> int:
    return int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _pad_id(tokenizer))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        if s:
            ids[r, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[r, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _default_texts(count: int) -> list[str]:
    """Paragraphs of the shipped held-out text, spread over it, in varied lengths (so that batches are padded)."""
    from ..tuning.data import embedded_corpus

    paragraphs = [" ".join(p.split()) for p in embedded_corpus("heldout").split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 80]
    step = max(len(paragraphs) // max(count, 1), 1)
    return [p[: 100 + 120 * (n % 4)] for n, p in enumerate(paragraphs[::step][:count])]


# ---- metrics -------------------------------------------------------------------------------------------------
def _nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over positions whose token and next token are both real."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    target = ids[:, 1:]
    keep = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    picked = logp.gather(-1, target[..., None]).squeeze(-1)
    return float(-(picked[keep]).sum()), int(keep.sum())


def _prefix_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Mean share of steps that agree before the first divergence, and how many sequences agree entirely."""
    equal = (a == b).long()
    prefix = equal.cumprod(dim=1).sum(dim=1).double()
    return float((prefix / a.shape[1]).mean()), int((prefix == a.shape[1]).sum())


def validate(
    reference: Any,
    onnx_dir: str | Path,
    *,
    texts: Sequence[str] | None = None,
    token_batches: Sequence[dict[str, torch.Tensor]] | None = None,
    tokenizer: Any = None,
    atol: float | None = None,
    tolerances: dict[str, float] | None = None,
    steps: int = 16,
    batch_size: int = 3,
    max_length: int = 64,
    num_texts: int = 6,
    providers: list[Any] | None = None,
    io_binding: bool | None = None,
) -> ParityReport:
    """Compare ``reference`` (PyTorch) with the graph in ``onnx_dir`` (ONNX Runtime) on the same padded batches."""
    from ..onnx.export import load_export_info
    from ..onnx.runtime import OrtCausalLM

    started = time.perf_counter()
    onnx_dir = Path(onnx_dir)
    if onnx_dir.is_file():
        onnx_dir = onnx_dir.parent
    info = load_export_info(onnx_dir)
    lm = _causal_lm(reference)
    from ..models.adapters import config_fingerprint

    if config_fingerprint(lm) != info["model"]["fingerprint"]:
        raise ArtifactMismatch(
            f"{onnx_dir} was exported from another model (fingerprint {info['model']['fingerprint']}, "
            f"this one {config_fingerprint(lm)})"
        )
    dtype = info["dtype"]
    tol = dict(DEFAULT_TOLERANCES[dtype])
    tol.update(tolerances or {})
    if atol is not None:
        tol["atol"] = float(atol)
    if token_batches is None:
        if tokenizer is None and info.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(onnx_dir))
        texts = list(texts) if texts is not None else _default_texts(num_texts)
        token_batches = token_batches_from_texts(tokenizer, texts, batch_size, max_length)
    if not token_batches:
        raise DataError("validation needs at least one batch of tokens")

    # a gated export with phase graphs: validated through them (what the runner runs on CUDA), and model.onnx, which
    # serves both phases alone (and is what the runner runs on the CPU), is checked against them: the same logits,
    # the same greedy tokens. Both are given the one copy of the weights the phase graphs' sessions hold.
    ort_model = OrtCausalLM(onnx_dir, providers=providers, io_binding=io_binding, phase_graphs=True)
    single = (OrtCausalLM(onnx_dir, providers=providers, io_binding=io_binding, phase_graphs=False,
                          share_weights_with=ort_model) if ort_model.phases else None)
    single_diff, single_same = 0.0, 0
    gated = info["mode"] == "gated"
    max_diff, top1_hits, real = 0.0, 0, 0
    nll_t, nll_o, nll_n = 0.0, 0.0, 0
    greedy_share, greedy_full, sequences = 0.0, 0, 0
    dec_hits, dec_total = 0, 0
    per_batch = []
    was_training = lm.training
    lm.eval()
    try:
        with reference_model(reference, info) as (model, routed):
            for batch in token_batches:
                ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()
                ref_logits = torch_forward(model, ids, mask)
                ref_decisions = routed.decisions() if (gated and routed is not None) else None
                step = ort_model.forward(ids.numpy(), mask.numpy())
                onnx_logits = torch.from_numpy(step.logits.astype(np.float32))
                keep = mask > 0
                diff = float((onnx_logits - ref_logits).abs()[keep].max())
                max_diff = max(max_diff, diff)
                top1_hits += int((onnx_logits.argmax(-1) == ref_logits.argmax(-1))[keep].sum())
                real += int(keep.sum())
                a, n = _nll(ref_logits, ids, mask)
                b, _ = _nll(onnx_logits, ids, mask)
                nll_t, nll_o, nll_n = nll_t + a, nll_o + b, nll_n + n
                if gated:
                    for r, layer in enumerate(info["spec"]["routed_layers"]):
                        mine = step.cache.decisions[:, r]
                        theirs = ref_decisions[int(layer)].cpu().numpy().astype(bool)
                        dec_hits += int((mine == theirs).sum())
                        dec_total += len(mine)
                ref_tokens = torch_greedy(model, ids, mask, steps)
                onnx_tokens = torch.from_numpy(ort_model.generate(ids.numpy(), mask.numpy(), max_new_tokens=steps))
                if single is not None:
                    alone = single.forward(ids.numpy(), mask.numpy()).logits.astype(np.float32)
                    gap = np.abs(alone - step.logits.astype(np.float32))[keep.numpy()]
                    single_diff = max(single_diff, float(gap.max()))
                    tokens = single.generate(ids.numpy(), mask.numpy(), max_new_tokens=steps)
                    single_same += int((tokens == onnx_tokens.numpy()).all(axis=1).sum())
                share, full = _prefix_agreement(onnx_tokens, ref_tokens)
                greedy_share += share * ids.shape[0]
                greedy_full += full
                sequences += ids.shape[0]
                per_batch.append({"batch_size": int(ids.shape[0]), "max_abs_logits_diff": diff,
                                  "greedy_torch": ref_tokens.tolist(), "greedy_onnx": onnx_tokens.tolist()})
    finally:
        lm.train(was_training)

    ppl_t = math.exp(nll_t / max(nll_n, 1))
    ppl_o = math.exp(nll_o / max(nll_n, 1))
    ppl_rel = abs(ppl_o - ppl_t) / ppl_t
    checks = [
        Check("max_abs_logits_diff", max_diff, tol["atol"], max_diff <= tol["atol"], False, "over real tokens"),
        Check("top1_agreement", top1_hits / max(real, 1), tol["top1"], top1_hits / max(real, 1) >= tol["top1"], True),
        Check("greedy_agreement", greedy_share / max(sequences, 1), tol["greedy"],
              greedy_share / max(sequences, 1) >= tol["greedy"], True,
              f"{greedy_full}/{sequences} sequences identical over {steps} steps"),
        Check("perplexity_rel_diff", ppl_rel, tol["ppl_rel"], ppl_rel <= tol["ppl_rel"], False,
              f"torch {ppl_t:.4f}, onnx {ppl_o:.4f}"),
    ]
    if gated:
        share = dec_hits / max(dec_total, 1)
        checks.append(Check("decision_agreement", share, tol["decisions"], share >= tol["decisions"], True,
                            f"{dec_hits}/{dec_total} (sequence, layer) decisions"))
    if single is not None:
        share = single_same / max(sequences, 1)
        checks.append(Check("single_graph_agreement", share, 1.0, share >= 1.0 and single_diff <= tol["atol"], True,
                            f"model.onnx against prefill.onnx + decode.onnx: {single_same}/{sequences} greedy "
                            f"sequences identical, max |logits diff| {single_diff:.2e}"))
    return ParityReport(
        onnx_dir=str(onnx_dir),
        mode=info["mode"],
        dtype=dtype,
        providers=list(ort_model.session.get_providers()),
        sequences=sequences,
        real_tokens=real,
        steps=steps,
        checks=checks,
        details={"perplexity_torch": ppl_t, "perplexity_onnx": ppl_o, "scored_tokens": nll_n, "batches": per_batch,
                 "tolerances": tol, "kv_cache": info.get("kv_cache", "growing"),
                 "attention": info.get("attention"), "logits": info.get("logits", "all"),
                 "graphs": ["prefill.onnx", "decode.onnx"] if ort_model.phases else ["model.onnx"]},
        seconds=round(time.perf_counter() - started, 2),
    )
