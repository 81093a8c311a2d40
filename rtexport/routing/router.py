"""The router and its gate, exactly as the Router-Tuning paper's official code builds them.

Router = ``Linear(hidden, 1, bias=False)``, zero-initialised so that sigmoid(0) = 0.5 and every routed layer starts
on. It reads the hidden state after the sub-block's input norm. Sequence-level routing pools that state by a mean
over the real (non-padding) positions. Gate = hard threshold of the sigmoid score with a straight-through estimator.
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(hidden: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions of ``hidden`` (B, T, H), counting only positions where ``padding_mask`` (B, T) is 1.

    The official code takes a plain mean, which lets padding change a sequence's decision in a batch.
    """
    if padding_mask is None:
        return hidden.mean(dim=1)
    keep = padding_mask.to(torch.bool).unsqueeze(-1)
    total = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(dim=1)
    count = keep.sum(dim=1).clamp_min(1).to(hidden.dtype)
    return total / count


def straight_through_gate(score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Forward: 1.0 where ``score >= threshold`` else 0.0. Backward: the identity with respect to ``score``."""
    hard = (score >= threshold).to(score.dtype)
    return hard + (score - score.detach())  # parenthesised: the forward value is exactly 0.0 or 1.0


def sampled_straight_through_gate(score: torch.Tensor) -> torch.Tensor:
    """Forward: a Bernoulli(score) sample (0.0 or 1.0). Backward: the identity with respect to ``score``.

    Training with sampled gates shows each router many skip configurations around the target sparsity instead of
    one, so its gradient estimates the layer's contribution averaged over which other layers are skipped.
    """
    hard = torch.bernoulli(score.detach().float()).to(score.dtype)
    return hard + (score - score.detach())  # parenthesised: the forward value is exactly 0.0 or 1.0


class Router(nn.Module):
    """One linear probe that scores whether a sub-block should run."""

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.proj.weight)

    def forward(
        self, normed_hidden: torch.Tensor, padding_mask: torch.Tensor | None, granularity: str
    ) -> torch.Tensor:
        """Scores in (0, 1): shape (B,) for sequence-level routing, (B, T) for token-level routing."""
        if granularity == "sequence":
            pooled = masked_mean(normed_hidden.float(), padding_mask)
            logits = pooled @ self.proj.weight.float().t()
            return torch.sigmoid(logits.squeeze(-1))
        if granularity == "token":
            logits = normed_hidden.float() @ self.proj.weight.float().t()
            return torch.sigmoid(logits.squeeze(-1))
        raise ValueError(f"unknown granularity {granularity!r}")
