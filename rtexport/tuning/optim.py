"""Optimizers for routers.

Each router sees only its own layer's gradient, so a per-coordinate optimizer (Adam) normalises away how much a
layer matters: a layer whose gate moves the loss ten times more than another's still moves its router at the same
speed. ``SharedScaleAdam`` keeps Adam's momentum and bias correction but divides every update by one second-moment
estimate shared by all routers, so the relative size of the layers' gradients survives into the router weights (and
so into the ranking that skip plans are made from).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import DataError

OPTIMIZERS = ("adamw", "shared-adam", "sgd")


class SharedScaleAdam(torch.optim.Optimizer):
    """Adam with one second-moment scalar (the mean squared gradient over all parameters) instead of one per element."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.shared = {"step": 0, "v": torch.zeros((), dtype=torch.float64)}

    def state_dict(self):  # the shared scalar lives outside the per-parameter state; keep it in the saved dict
        d = super().state_dict()
        d["shared"] = {"step": self.shared["step"], "v": self.shared["v"].clone()}
        return d

    def load_state_dict(self, state_dict):
        shared = state_dict.get("shared")
        sd = {k: v for k, v in state_dict.items() if k != "shared"}
        super().load_state_dict(sd)
        if shared is not None:
            self.shared = {"step": int(shared["step"]), "v": shared["v"].clone()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        b1, b2 = self.param_groups[0]["betas"]
        shared = self.shared
        shared["step"] += 1
        t = shared["step"]
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params)
        count = sum(p.numel() for p in params)
        shared["v"] = shared["v"] * b2 + (1 - b2) * (sq / count)
        v_hat = float(shared["v"]) / (1 - b2**t)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "m" not in st:
                    st["m"] = torch.zeros_like(p, dtype=torch.float32)
                st["m"].mul_(b1).add_(p.grad.float(), alpha=1 - b1)
                m_hat = st["m"] / (1 - b1**t)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((m_hat / (v_hat**0.5 + group["eps"])).to(p.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "shared-adam":
        return SharedScaleAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise DataError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
