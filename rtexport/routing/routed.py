"""RoutedModel: a frozen causal LM whose routed decoder layers are wrapped so that routers can skip sub-blocks.

The wrapping replaces the chosen entries of the model's layer list with ``RoutedDecoderLayer`` modules that hold the
original layer and recompute its pre-norm residual forward from the adapter's parts, with a gate on the routed
sub-block: ``residual + gate * attn(norm(residual))``. No library class is modified; ``unwrap()`` puts the original
layers back.

Decisions (inference): for sequence-level routing the decision is taken once per sequence at prefill and held for the
whole generation. A layer that no sequence in the batch needs is not called at all, so it writes no KV cache; a layer
that some sequences need runs for the batch and its output is masked for the sequences that skip it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ArtifactMismatch
from ..models.adapters import ArchitectureAdapter, adapter_for, config_fingerprint
from .config import CONFIG_NAME, WEIGHTS_NAME, RouterConfig
from .router import Router, sampled_straight_through_gate, straight_through_gate

MODES = ("hard", "train", "open")


@dataclass
class RoutingState:
    """Per-model routing state, shared by that model's routed layers (one per RoutedModel; no globals)."""

    mode: str = "hard"  # hard: thresholded decisions; train: straight-through gates; open: every gate on
    threshold: float = 0.5
    stochastic: bool = False  # train mode: sample gates ~ Bernoulli(score) instead of thresholding (still STE)
    padding_mask: torch.Tensor | None = None
    is_prefill: bool = True
    held: dict[int, torch.Tensor] = field(default_factory=dict)
    # what each layer's held decision resolves to (None: run, False: skip, or the per-sequence multiplier), computed
    # once at prefill so decode steps read no decision back from the device
    held_gate: dict[int, torch.Tensor | bool | None] = field(default_factory=dict)
    forced: dict[int, bool] | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    gates: dict[int, torch.Tensor] = field(default_factory=dict)
    recording: dict[int, list[torch.Tensor]] | None = None


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) and cache[0] is not None else 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # a cache type without the method: treat as empty only if it says so
        return 0


class RoutedDecoderLayer(nn.Module):
    """A decoder layer with a gate on one sub-block (``attn``, ``mlp``) or on the whole block."""

    def __init__(
        self,
        layer: nn.Module,
        adapter: ArchitectureAdapter,
        router: Router,
        index: int,
        target: str,
        granularity: str,
        state: RoutingState,
    ):
        super().__init__()
        self.layer = layer
        self.index = index
        self.target = target
        self.granularity = granularity
        # references, not submodules: the routers are owned by RoutedModel.routers and the state by RoutedModel
        self._adapter = adapter
        self._router = [router]
        self._state = [state]
        self.attention_type = getattr(layer, "attention_type", None)

    @property
    def router(self) -> Router:
        return self._router[0]

    @property
    def state(self) -> RoutingState:
        return self._state[0]

    # ---- decisions ---------------------------------------------------------------------------------------------
    def _decide(self, normed: torch.Tensor) -> torch.Tensor | bool | None:
        """``None``: run unmasked; ``False``: skip; a tensor: per-sequence/per-token multiplier (B,1,1) or (B,T,1)."""
        st = self.state
        if st.mode == "open":
            return None
        if st.forced is not None and self.index in st.forced:
            return None if st.forced[self.index] else False
        pad = st.padding_mask
        if pad is not None:
            pad = pad[:, -normed.shape[1]:] if self.granularity == "token" or not st.is_prefill else pad
        if st.mode == "train":
            score = self.router(normed, pad, self.granularity)
            gate = sampled_straight_through_gate(score) if st.stochastic else straight_through_gate(score, st.threshold)
            st.scores[self.index] = score
            st.gates[self.index] = gate
            return gate.to(normed.dtype).reshape(gate.shape[0], -1, 1)
        # hard inference
        if self.granularity == "sequence" and not st.is_prefill and self.index in st.held_gate:
            return st.held_gate[self.index]
        score = self.router(normed, pad, self.granularity)
        decision = score >= st.threshold
        st.scores[self.index] = score
        if st.recording is not None:
            st.recording.setdefault(self.index, []).append(score.detach().float().cpu())
        gate: torch.Tensor | bool | None
        if bool(decision.all()):
            gate = None
        elif not bool(decision.any()):
            gate = False
        else:
            gate = decision.to(normed.dtype).reshape(decision.shape[0], -1, 1)
        if self.granularity == "sequence":
            st.held[self.index] = decision
            st.held_gate[self.index] = gate
        return gate

    # ---- forward -----------------------------------------------------------------------------------------------
    def _attention(self, normed: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = self._adapter.attention(self.layer)(hidden_states=normed, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _feed_forward(self, normed: torch.Tensor) -> torch.Tensor:
        out = self._adapter.feed_forward(self.layer)(normed)
        return out[0] if isinstance(out, tuple) else out  # MoE blocks may return (hidden, router_logits)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("RoutedDecoderLayer expects keyword arguments after hidden_states")
        a = self._adapter
        x = hidden_states
        if self.target == "block":
            normed = a.attention_norm(self.layer)(x)
            gate = self._decide(normed)
            if gate is False:
                return x
            h = x + self._attention(normed, kwargs)
            h = h + self._feed_forward(a.feed_forward_norm(self.layer)(h))
            return h if gate is None else x + gate * (h - x)

        normed = a.attention_norm(self.layer)(x)
        gate = self._decide(normed) if self.target == "attn" else None
        if gate is not False:
            attn = self._attention(normed, kwargs)
            x = x + (attn if gate is None else gate * attn)
        normed = a.feed_forward_norm(self.layer)(x)
        gate = self._decide(normed) if self.target == "mlp" else None
        if gate is not False:
            mlp = self._feed_forward(normed)
            x = x + (mlp if gate is None else gate * mlp)
        return x


class RoutedModel(nn.Module):
    """A causal LM with routers on some decoder layers. Only router parameters are trainable."""

    def __init__(self, model: nn.Module, config: RouterConfig, adapter: ArchitectureAdapter | None = None):
        super().__init__()
        self.adapter = adapter or adapter_for(model)
        config.check_model(config_fingerprint(model))
        self.config = config
        self.base_model = model
        self.state = RoutingState(threshold=config.threshold)
        device = next(model.parameters()).device
        self.routers = nn.ModuleDict(
            {str(i): Router(config.hidden_size, dtype=torch.float32, device=device) for i in config.layers}
        )
        layers = self.adapter.decoder_layers(model)
        self._originals: dict[int, nn.Module] = {}
        for i in config.layers:
            original = layers[i]
            self._originals[i] = original
            layers[i] = RoutedDecoderLayer(
                original, self.adapter, self.routers[str(i)], i, config.target, config.granularity, self.state
            )
        self._hook = model.register_forward_pre_hook(self._capture_inputs, with_kwargs=True)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        target: str = "attn",
        granularity: str = "sequence",
        layers: list[int] | None = None,
        threshold: float = 0.5,
        base_model_id: str = "in-memory",
        **extra: Any,
    ) -> "RoutedModel":
        from .config import default_routed_layers

        cfg = model.config
        n = cfg.num_hidden_layers
        config = RouterConfig(
            base_model=base_model_id,
            fingerprint=config_fingerprint(model),
            num_layers=n,
            hidden_size=cfg.hidden_size,
            target=target,
            granularity=granularity,
            layers=list(layers) if layers is not None else default_routed_layers(n),
            threshold=threshold,
            **extra,
        )
        return cls(model, config)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "RoutedModel":
        """Attach routers saved by ``save_pretrained`` to ``model`` (checked against the model's fingerprint)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config = RouterConfig.load(directory)
        routed = cls(model, config)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ArtifactMismatch(f"{directory} holds {CONFIG_NAME} but no {WEIGHTS_NAME}")
        state = load_file(str(weights))
        missing = routed.routers.load_state_dict(state, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ArtifactMismatch(f"router weights in {directory} do not match its config: {missing}")
        return routed

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``routers.safetensors`` + ``router_config.json`` (each atomically)."""
        import os
        import tempfile

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.routers.state_dict().items()}
        fd, tmp = tempfile.mkstemp(prefix=".routers.", suffix=".tmp", dir=directory)
        os.close(fd)
        save_file(tensors, tmp, metadata={"format": "pt", "rtexport": "routers"})
        os.replace(tmp, directory / WEIGHTS_NAME)
        self.config.save(directory)
        return directory

    def unwrap(self) -> nn.Module:
        """Restore the original layers and return the plain model."""
        layers = self.adapter.decoder_layers(self.base_model)
        for i, original in self._originals.items():
            layers[i] = original
        self._hook.remove()
        return self.base_model

    # ---- running -----------------------------------------------------------------------------------------------
    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        st = self.state
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        st.is_prefill = _cache_length(cache) == 0
        if st.is_prefill:
            st.held = {}
            st.held_gate = {}
        st.padding_mask = mask if (mask is not None and mask.dim() == 2) else None
        st.scores = {}
        st.gates = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    @property
    def layers(self) -> list[int]:
        return list(self.config.layers)

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator["RoutedModel"]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        old = self.state.mode
        self.state.mode = mode
        try:
            yield self
        finally:
            self.state.mode = old

    @contextlib.contextmanager
    def forced_decisions(self, run: dict[int, bool]) -> Iterator["RoutedModel"]:
        """Fix decisions (layer -> run?) regardless of the routers: what a frozen plan computes."""
        old = self.state.forced
        self.state.forced = {int(k): bool(v) for k, v in run.items()}
        try:
            yield self
        finally:
            self.state.forced = old

    @contextlib.contextmanager
    def threshold(self, value: float) -> Iterator["RoutedModel"]:
        old = self.state.threshold
        self.state.threshold = float(value)
        try:
            yield self
        finally:
            self.state.threshold = old

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Record the router scores of every prefill (layer -> list of (B,) or (B,T) tensors)."""
        old = self.state.recording
        rec: dict[int, list[torch.Tensor]] = {}
        self.state.recording = rec
        try:
            yield rec
        finally:
            self.state.recording = old

    def decisions(self) -> dict[int, torch.Tensor]:
        """The decisions held for the current sequences (sequence-level routing), layer -> (B,) bool."""
        return dict(self.state.held)
