"""Quality numbers computed from a model's next-token distribution: perplexity and log-likelihood scoring.

Both work for a plain Hugging Face causal LM, a ``RoutedModel`` (its forward is the HF model's), and a frozen-plan
``RoutedModel`` (call them inside ``with routed.forced_decisions(plan.run_map()):``). Nothing here changes the model
beyond putting it in eval mode for the call (its previous mode is restored).

``score_requests`` is the engine of the offline multiple-choice tasks (``tasks.py``): it returns, for each
``(context, continuation)`` pair, the summed log-probability of the continuation's tokens given the context and
whether greedy decoding would have produced exactly those tokens. Tokenization follows lm-evaluation-harness:
trailing spaces of the context move to the continuation, the pair is tokenized as one string and the continuation's
tokens are those past the context's own tokens, no special tokens are added, and an empty context gets the BOS (or
EOS) token as its only token.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import DataError

# A progress bar is shown when a call has more batches than this.
PROGRESS_MIN_BATCHES = 3


@dataclass(frozen=True)
class LogLikelihood:
    """The score of one continuation given its context."""

    loglik: float  # summed log p(continuation tokens | context), natural log
    is_greedy: bool  # every continuation token is the argmax of the model's distribution at its position
    num_tokens: int  # continuation tokens scored


# ---- helpers shared by the evaluation stage ----------------------------------------------------------------------
def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face model behind ``model`` (a ``RoutedModel`` holds it as ``base_model`` with its routed layers
    in place, so calling either runs the same computation)."""
    from ..routing import RoutedModel

    return model.base_model if isinstance(model, RoutedModel) else model


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless module: nothing to move
        return torch.device("cpu")


def max_sequence_length(model: nn.Module, default: int = 2048) -> int:
    cfg = getattr(causal_lm(model), "config", None)
    value = getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 1 else default


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` for the duration, restoring each submodule's previous training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Any]:
    """A rich progress bar over ``total`` steps; yields ``advance(n=1)``. Silent for a few steps or when disabled."""
    if not enabled or total <= PROGRESS_MIN_BATCHES:
        yield lambda n=1: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(type(causal_lm(model)).forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions when ``keep`` is None), float32, (B, keep, V)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if keep is not None and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    if keep is not None and logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits.float()


# ---- perplexity --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(
    model: nn.Module,
    token_blocks: torch.Tensor,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``token_blocks`` (N, T).

    Each block is one sequence; position t predicts token t+1, so N * (T - 1) tokens are scored.
    """
    if token_blocks.dim() != 2 or token_blocks.shape[1] < 2:
        raise DataError(f"perplexity needs token blocks of shape (N, T) with T >= 2, got {tuple(token_blocks.shape)}")
    if batch_size < 1:
        raise DataError("batch_size must be at least 1")
    device = torch.device(device) if device is not None else model_device(model)
    blocks = token_blocks.long()
    n = blocks.shape[0]
    total_nll = 0.0
    total_tokens = 0
    batches = math.ceil(n / batch_size)
    with eval_mode(model), progress_bar(batches, "perplexity", progress) as advance:
        for start in range(0, n, batch_size):
            ids = blocks[start : start + batch_size].to(device)
            logits = _logits(model, ids, torch.ones_like(ids), None)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll)
            total_tokens += ids[:, 1:].numel()
            advance()
    return math.exp(total_nll / total_tokens)


# ---- log-likelihood of continuations -----------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has neither a BOS nor an EOS token, which an empty context needs")


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    n_context = len(_encode(tokenizer, context))
    return (whole[:n_context] or [_prefix_token(tokenizer)]), whole[n_context:]


@torch.inference_mode()
def score_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    max_length: int | None = None,
    progress: bool = True,
    description: str = "scoring",
) -> list[LogLikelihood]:
    """Score ``(context, continuation)`` pairs, one forward per batch of right-padded ``context + continuation``.

    Pairs are run longest first (less padding); results come back in the order given. A pair longer than
    ``max_length`` (default: the model's ``max_position_embeddings``) loses context tokens from the left.
    """
    if batch_size < 1:
        raise DataError("batch_size must be at least 1")
    device = torch.device(device) if device is not None else model_device(model)
    max_length = max_length or max_sequence_length(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None else 0

    encoded: list[tuple[list[int], int]] = []  # (input tokens, number of continuation tokens)
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise DataError(f"continuation {continuation!r} has no tokens of its own after context {context[-40:]!r}")
        if len(cont) >= max_length:
            raise DataError(f"a continuation of {len(cont)} tokens does not fit the model's {max_length} positions")
        full = (ctx + cont)[-max_length - 1 :]
        encoded.append((full, len(cont)))

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[LogLikelihood | None] = [None] * len(encoded)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model), progress_bar(len(batches), description, progress) as advance:
        for batch in batches:
            # the input is the sequence without its last token; targets are the sequence shifted by one
            inputs = [encoded[i][0][:-1] for i in batch]
            width = max(len(x) for x in inputs)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, : len(x)] = 1
            # positions that predict continuation tokens: [len(x) - n_cont, len(x)) for each row
            first = min(len(x) - encoded[i][1] for x, i in zip(inputs, batch))
            keep = width - first
            logits = _logits(model, ids.to(device), mask.to(device), keep)
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, (x, i) in enumerate(zip(inputs, batch)):
                full, n_cont = encoded[i]
                start = len(x) - n_cont - first
                lp = logprobs[row, start : start + n_cont]
                target = torch.tensor(full[-n_cont:], dtype=torch.long, device=lp.device)
                ll = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = LogLikelihood(ll, greedy, n_cont)
            advance()
    return [r for r in results if r is not None]
