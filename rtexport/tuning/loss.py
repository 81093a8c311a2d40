"""The causal-LM loss without materialising the (tokens × vocabulary) logits.

``labels=`` on a transformers causal LM builds the whole logits tensor, upcasts it to float32 and keeps the float32
log-softmax for the backward pass: for a 128k vocabulary that is about 1.5 MB per token, tens of GB per batch of
2048-token sequences. Here the final hidden states are projected chunk by chunk; each chunk's loss *and* its gradient
with respect to the hidden states (and to the projection weight, if that is trainable) are computed in the forward
pass, so at most one chunk of logits is alive at a time. The arithmetic is the library's: bf16/fp16 matmul into the
model's dtype, log-sum-exp and softmax in float32, ``sum / number of predicted tokens``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int,
    ) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n, chunk):
            h = hidden[start : start + chunk]
            y = labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, torch.zeros_like(y))
            logits = nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            if need_h or need_w or need_b:
                # d(sum of token losses)/d(logits) = softmax - one_hot, zero on ignored positions
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs.scatter_add_(1, target.unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                probs.mul_(valid.unsqueeze(1))
                g = probs.to(hidden.dtype)
                del logits, probs
                if need_h:
                    torch.matmul(g, weight, out=grad_h[start : start + chunk])
                if need_w:
                    grad_w += (g.t() @ h).float()
                if need_b:
                    grad_b += g.float().sum(0)
        count = (labels != IGNORE_INDEX).sum().clamp_min(1).to(torch.float32)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b, count) if t is not None))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        count = saved.pop()
        scale = grad_out.float() / count
        out: list[torch.Tensor | None] = []
        for present, dtype in zip(ctx.present, ctx.dtypes):
            out.append((saved.pop(0).float() * scale).to(dtype) if present else None)
        return out[0], out[1], out[2], None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_tokens: int = 8192,
) -> torch.Tensor:
    """Mean cross-entropy of ``linear(hidden, weight, bias)`` against ``labels`` (``-100`` ignored), chunked.

    ``hidden`` is (N, H), ``labels`` (N,); no (N, V) tensor is kept. Equals
    ``cross_entropy(linear(hidden, weight, bias).float(), labels, ignore_index=-100)`` up to rounding.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be at least 1")
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, int(chunk_tokens))


def final_hidden_states(
    model: nn.Module,
    final_norm_path: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    call: Any = None,
) -> torch.Tensor:
    """The final norm's output (what feeds the output embedding) for ``input_ids``, with no logits computed.

    ``call`` runs the forward (defaults to ``model``; a RoutedModel passes itself so its hooks run); the forward asks
    for no logits (``logits_to_keep`` = no position).
    """
    norm = operator.attrgetter(final_norm_path)(model)
    captured: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _a, out: captured.append(out))
    try:
        (call or model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the final norm to run once per forward, it ran {len(captured)} times")
    return captured[0]


def causal_lm_loss(
    model: nn.Module,
    final_norm_path: str,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_tokens: int = 8192,
    call: Any = None,
) -> torch.Tensor:
    """The causal-LM loss of ``model`` on ``input_ids`` (next-token prediction, as ``labels=input_ids`` gives).

    ``model`` is a transformers causal LM; ``final_norm_path`` the attribute path of its final norm (the adapter's
    ``final_norm``). The loss is taken from the final norm's output with :func:`linear_cross_entropy`.
    """
    labels = input_ids if labels is None else labels
    hidden = final_hidden_states(model, final_norm_path, input_ids, attention_mask, call)
    head = model.get_output_embeddings()
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    return linear_cross_entropy(h, head.weight, y, getattr(head, "bias", None), chunk_tokens)


def _chunk_kl(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    s = nn.functional.linear(student, weight, bias).float().log_softmax(-1)
    t = nn.functional.linear(teacher, weight, bias).float().log_softmax(-1)
    return (t.exp() * (t - s)).sum()


def linear_kl_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) between the distributions ``linear(h, weight, bias)`` gives.

    ``student`` and ``teacher`` are (N, H) final hidden states (``teacher`` carries no gradient); ``mask`` (N,) picks
    the tokens that count. Each chunk's logits are recomputed in the backward pass (activation checkpointing), so at
    most one chunk of (tokens × vocabulary) logits is alive at a time. Softmaxes in float32.
    """
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be at least 1")
    if mask is not None:
        keep = mask.reshape(-1).bool()
        student, teacher = student[keep], teacher[keep]
    teacher = teacher.detach()
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for start in range(0, student.shape[0], chunk_tokens):
        s, t = student[start : start + chunk_tokens], teacher[start : start + chunk_tokens]
        if s.requires_grad or weight.requires_grad:
            total = total + checkpoint(_chunk_kl, s, t, weight, bias, use_reentrant=False)
        else:
            total = total + _chunk_kl(s, t, weight, bias)
    return total / max(student.shape[0], 1)
