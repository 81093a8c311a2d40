"""Run an exported graph with ONNX Runtime: one forward step, and a greedy generate loop over the KV cache.

This module imports only numpy and onnxruntime: its source is copied into every ``ort-gpu`` package as the body of
the runner script, for people who never install rtexport. Everything it needs is read from the graph's own input
and output names:

* ``past_key_values.{i}.key|value`` / ``present.{i}.key|value``: the layers ``i`` that keep a KV cache (a static
  graph has them only for the attention layers its plan kept);
* ``routing_decisions`` + ``run_layer.{i}`` / ``decisions``: a gated graph. The router decides per sequence at
  prefill (the graph computes the decisions, for the sequences ``routing_decisions`` lets run each layer: all
  of them here; ``run_layer.{i}`` is not read then), the caller keeps the returned
  ``decisions`` and feeds them back at every later step, with ``run_layer.{i}`` = any sequence of the batch runs
  layer ``i`` (a host-side bool: ORT's ``If`` reads its condition on the host, so no device-to-host copy is needed).
  A layer that no sequence runs gets an empty past and its present is dropped. Those inputs do not change after
  the prefill, so with IO binding they are bound once, in one binding that the generation's later steps reuse
  (each step binds only its tokens, mask, positions and the caches that grow): a gated decode step then costs the
  host what a static graph's step does.

* ``cache_position``: a static graph with a preallocated KV cache. Each past is a buffer as long as the whole
  generation (``capacity``), bound as its own present, so the graph writes this step's K/V into it in place (ONNX
  ``TensorScatter``); the mask is fed over the whole buffer. Every decode step then has the same shapes and the same
  buffers, so with ``cuda_graph=True`` ONNX Runtime captures the decode step once as a CUDA graph and replays it
  (prefill runs outside the graph). A cache outgrows its buffers by being copied into larger ones.

* ``rtexport.attention`` = ``gqa`` (metadata): a preallocated cache written by ONNX Runtime's GroupQueryAttention.
  Each sequence's tokens are packed from slot 0 of its buffers: the runner moves a left-padded prompt's tokens to
  the front of their rows (and the logits back), feeds a mask that marks each sequence's filled slots (the prompt's
  width at prefill, the buffers' width at decode, so that decode steps keep one shape), and GroupQueryAttention
  writes each sequence's new K/V at its own next slot. After the prompt, steps of more than one token take batch 1.

* ``logits_positions``: a graph with selected logits. Each step names the positions whose logits it wants; the
  runner asks for the last one when only the next token is needed (a prefill then runs the LM head on one
  position per sequence), and for every position otherwise.

On CUDAExecutionProvider the loop uses IO binding: the cache and the decisions stay on the device between steps;
only the next tokens go up and the last position's logits come down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def position_ids_from_mask(attention_mask: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions that count only real tokens (left padding starts each sequence at 0), last ``seq_len`` columns."""
    pos = np.cumsum(attention_mask.astype(np.int64), axis=1) - 1
    pos = np.where(attention_mask > 0, pos, 0)
    return np.ascontiguousarray(pos[:, -seq_len:]).astype(np.int64)


@dataclass
class Cache:
    """What a later step needs: the KV per layer (numpy arrays or OrtValues) and, for gated graphs after the prefill,
    what the prefill decided (``routing``; ``decisions``, ``decisions_value`` and ``active`` read it).

    A preallocated cache's buffers hold ``capacity`` slots, the first ``length`` of them written. Later steps write
    only slots at or after their cache's ``length``, so an earlier ``Cache`` of the same generation stays valid for
    what it holds; two continuations of one cache write the same slots and cannot both be kept."""

    past: dict[int, tuple[Any, Any]]
    length: int
    capacity: int = 0
    routing: _Routing | None = field(default=None, repr=False)

    @property
    def decisions(self) -> np.ndarray | None:
        """(B, R) bool on the host, fixed at prefill."""
        return None if self.routing is None else self.routing.decisions

    @property
    def decisions_value(self) -> Any:
        """The same decisions as the graph returned them (an OrtValue when IO-binding)."""
        return None if self.routing is None else self.routing.feeds["routing_decisions"]

    @property
    def active(self) -> dict[int, bool]:
        """Routed layer -> any sequence of the batch runs it."""
        return {} if self.routing is None else dict(self.routing.active)


@dataclass
class _Routing:
    """What a gated graph's prefill decided, and what every later step therefore feeds alike: the decisions (as
    the graph returned them) and the empty pasts of the layers no sequence runs (``feeds``), the ``run_layer``
    flags (``host``), and the outputs those steps drop (those layers' presents, the decisions they return
    unchanged). With IO binding, ``binding`` is the decode session's binding with all of them bound, made at the
    first step and reused by the later ones, which bind only what changes: the tokens, the mask, the positions and
    the caches that grow. (Steps that share it run one at a time, as a generation's steps do.)"""

    decisions: np.ndarray  # (B, R) bool on the host
    active: dict[int, bool]  # routed layer -> any sequence runs it
    feeds: dict[str, Any]
    host: dict[str, np.ndarray]
    dropped: frozenset[str]
    binding: Any = None


@dataclass
class StepOutput:
    logits: np.ndarray | None  # (B, T, V), or (B, 1, V) when only the last position was asked for; None: greedy
    cache: Cache
    next_token: np.ndarray | None = None  # (B,) int64, the greedy next token (forward(..., greedy=True))


class OrtCausalLM:
    """An exported causal LM under ONNX Runtime (static or gated graph)."""

    def __init__(
        self,
        path: str | Path,
        providers: list[Any] | None = None,
        io_binding: bool | None = None,
        session_options: Any = None,
        cuda_graph: bool = False,
        reserve: int = 256,
        phase_graphs: bool | None = None,
        share_weights: bool = True,
        share_weights_with: OrtCausalLM | None = None,
    ):
        """``cuda_graph``: replay decode steps as a CUDA graph (a preallocated-cache graph on
        CUDAExecutionProvider; ignored on the CPU). ``reserve``: slots a preallocated cache holds beyond the prompt
        when the caller gives no ``capacity`` at prefill. ``phase_graphs``: for a gated export that has them
        (``phase_graphs.json``, and ``path`` is the graph they derive from: another graph of the folder always
        runs alone), run prefills through ``prefill.onnx`` and later steps through ``decode.onnx``, two sessions
        given the same weight tensors (added to ``session_options``); False: run ``path`` for both; None
        (default): the phase graphs on CUDA, ``path`` on the CPU (there ONNX Runtime prepacks each session's MatMul
        weights, so two sessions hold two copies whatever they are given). ``share_weights=False``: each phase
        session loads the weights itself. ``share_weights_with``: a runner of the same export whose sessions were
        given shared weights: this one's sessions (phase graphs or ``path`` alone) get the same tensors, so that
        both runners hold one copy of the weights between them (validate's check of ``model.onnx`` against the
        phase graphs does this).

        ``session`` runs the steps after a prefill (``decode.onnx`` with phase graphs), ``prefill_session`` the
        prefills (``prefill.onnx``); without phase graphs both are the session of ``path``."""
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise FileNotFoundError(f"ONNX graph not found: {path}")
        self.path = path
        self.providers = providers or default_providers()
        if cuda_graph:
            self.providers = [_with_cuda_graph(p) for p in self.providers]
        manifest = path.parent / _PHASES_MANIFEST
        cuda = (bool(self.providers) and _provider_name(self.providers[0]) == "CUDAExecutionProvider"
                and "CUDAExecutionProvider" in ort.get_available_providers())
        # the phase graphs stand in for the graph they were derived from only (older records: model.onnx)
        phases = _read_phases(manifest) if manifest.is_file() else None
        derived = phases is not None and phases["source"] == path.name
        self.phases = derived and (cuda if phase_graphs is None else bool(phase_graphs))
        self._weights = None
        if share_weights_with is not None:
            if share_weights_with._weights is None or share_weights_with.path.parent.resolve() != path.parent.resolve():
                raise ValueError(f"share_weights_with must be a runner of {path.parent} whose sessions were given "
                                 "shared weights (its phase graphs, share_weights=True)")
            self._weights = share_weights_with._weights
            session_options = self._weights.add_to(session_options or ort.SessionOptions())
        if self.phases:  # a gated export's two phase graphs, given the same weight tensors
            if share_weights and self._weights is None:
                self._weights = _SharedWeights(path.parent, phases["initializers"], "cuda" if cuda else "cpu")
                session_options = self._weights.add_to(session_options or ort.SessionOptions())
            graphs = phases["graphs"]
            self.session = ort.InferenceSession(str(graphs["decode"]), sess_options=session_options,
                                                providers=self.providers)
            self.prefill_session = ort.InferenceSession(str(graphs["prefill"]), sess_options=session_options,
                                                         providers=self.providers)
        else:
            self.session = ort.InferenceSession(str(path), sess_options=session_options, providers=self.providers)
            self.prefill_session = self.session
        if self._weights is not None:
            # ONNX Runtime reads given initializers in place and keeps no reference to them: each session holds
            # the weights, so that one kept without its runner never reads freed memory
            for session in (self.session, self.prefill_session):
                session._rtexport_shared_weights = self._weights
        active = self.session.get_providers()
        self.device_type = "cuda" if "CUDAExecutionProvider" in active else "cpu"
        self.io_binding = (self.device_type == "cuda") if io_binding is None else bool(io_binding)
        self._ort = ort
        self.reserve = int(reserve)

        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kv_layers = sorted(
            int(n.split(".")[1]) for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")
        )
        self.routed_layers = sorted(int(n.split(".")[1]) for n in inputs if n.startswith("run_layer."))
        self.gated = "routing_decisions" in inputs
        # routed layers whose attention is inside the If (target attn or block): no cache while no sequence runs
        # them. The export writes them in the metadata; graphs without it name those layers' past length apart.
        meta = self.session.get_modelmeta().custom_metadata_map or {}
        if "rtexport.gated_kv_layers" in meta:
            self.gated_kv_layers = [int(i) for i in meta["rtexport.gated_kv_layers"].split(",") if i.strip()]
        else:
            self.gated_kv_layers = [
                i for i in self.routed_layers
                if f"past_key_values.{i}.key" in inputs
                and inputs[f"past_key_values.{i}.key"].shape[2] == f"past_sequence_length_{i}"
            ]
        if self.kv_layers:
            first = inputs[f"past_key_values.{self.kv_layers[0]}.key"]
            self.kv_dtype = _ORT_TO_NUMPY[first.type]
            self.num_kv_heads = int(first.shape[1])
            self.head_dim = int(first.shape[3])
        else:
            self.kv_dtype, self.num_kv_heads, self.head_dim = np.float32, 0, 0
        self.mask_dtype = _ORT_TO_NUMPY[inputs["attention_mask"].type]
        self._empties: dict[int, Any] = {}
        self.position_dtype = _ORT_TO_NUMPY[inputs["position_ids"].type] if "position_ids" in inputs else None
        # GroupQueryAttention graphs pack each sequence from slot 0 of a preallocated cache (no cache_position)
        self.packed = meta.get("rtexport.attention") == "gqa"
        self.preallocated = "cache_position" in inputs or self.packed
        self.selects_logits = "logits_positions" in inputs
        if self.packed and not self.selects_logits:
            raise ValueError(f"{path}: a GroupQueryAttention graph needs the logits_positions input")
        if cuda_graph and not self.preallocated:
            raise ValueError(f"{path}: CUDA graphs need a graph exported with a preallocated KV cache "
                             "(export with kv_cache='preallocated')")
        if self.preallocated:
            self.io_binding = True  # the presents are bound to the pasts' buffers: the write happens in place
        self.cuda_graph = bool(cuda_graph) and self.device_type == "cuda"
        # CUDA graph replays read fixed addresses: one set of buffers and one captured graph per (batch, capacity)
        self._pools: dict[tuple[int, int], dict[int, tuple[Any, Any]]] = {}
        self._graphs: dict[tuple[int, int], _GraphStep] = {}

    # ---- cache -------------------------------------------------------------------------------------------------
    def _empty(self, batch: int) -> Any:
        """An empty cache (B, kv_heads, 0, head_dim): one value per batch size, fed to every layer that keeps none."""
        if batch not in self._empties:
            arr = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            self._empties[batch] = self._to_device(arr)
        return self._empties[batch]

    def _to_device(self, arr: np.ndarray) -> Any:
        if not self.io_binding:
            return arr
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), self.device_type, 0)

    def empty_cache(self, batch: int, capacity: int | None = None) -> Cache:
        """A cache with nothing in it. Preallocated graphs: buffers of ``capacity`` slots (zeros; with CUDA graphs,
        the (batch, capacity) pool's buffers, whose stale slots the mask hides)."""
        if not self.preallocated:
            empty = self._empty(batch)
            return Cache(past={i: (empty, empty) for i in self.kv_layers}, length=0)
        if capacity is None or capacity < 1:
            raise ValueError("a preallocated cache needs a capacity of at least one slot")
        if self.cuda_graph:
            key = (batch, capacity)
            if key not in self._pools:
                self._pools[key] = self._buffers(batch, capacity)
            return Cache(past=dict(self._pools[key]), length=0, capacity=capacity)
        return Cache(past=self._buffers(batch, capacity), length=0, capacity=capacity)

    def _buffer(self, batch: int, capacity: int, content: np.ndarray | None = None) -> np.ndarray:
        """One K or V buffer on the host: zeros, with ``content``'s slots first."""
        arr = np.zeros((batch, self.num_kv_heads, capacity, self.head_dim), dtype=self.kv_dtype)
        if content is not None:
            arr[:, :, : content.shape[2]] = content
        return arr

    def _buffers(self, batch: int, capacity: int, content: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> dict[int, tuple[Any, Any]]:
        # its own OrtValue per buffer (on the CPU it wraps its array, which the graph then writes)
        return {i: tuple(self._ort.OrtValue.ortvalue_from_numpy(
                    self._buffer(batch, capacity, None if content is None else content[i][j]), self.device_type, 0)
                    for j in range(2))
                for i in self.kv_layers}

    def _grow(self, cache: Cache, capacity: int) -> Cache:
        """The same cache in buffers of ``capacity`` slots (copied through the host: a generate loop sizes its
        buffers up front and never gets here)."""
        content = {i: (_host(k)[:, :, : cache.length], _host(v)[:, :, : cache.length]) for i, (k, v) in cache.past.items()}
        b = next(iter(content.values()))[0].shape[0] if content else 1
        key = (b, capacity)
        if self.cuda_graph and key in self._pools:
            # that pool's buffers may already be bound in a captured step: write into them, never replace them
            for i, pair in self._pools[key].items():
                for value, old in zip(pair, content[i]):
                    value.update_inplace(self._buffer(b, capacity, old))
            return Cache(past=dict(self._pools[key]), length=cache.length, capacity=capacity)
        past = self._buffers(b, capacity, content)
        if self.cuda_graph:
            self._pools[key] = dict(past)
        return Cache(past=past, length=cache.length, capacity=capacity)

    def run_flags(self, decisions: np.ndarray | None) -> dict[int, bool]:
        """``run_layer.{i}`` for a step: all true at prefill (``decisions`` None), else whether any sequence of the
        batch runs ``i`` by its ``decisions`` (B, R)."""
        if decisions is None:
            return {i: True for i in self.routed_layers}
        runs = np.asarray(decisions, dtype=np.bool_).any(axis=0)
        return {i: bool(runs[r]) for r, i in enumerate(self.routed_layers)}

    # ---- one step ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None = None,
        cache: Cache | None = None,
        last_only: bool = False,
        capacity: int | None = None,
        greedy: bool = False,
    ) -> StepOutput:
        """Run ``input_ids`` (B,T) after ``cache`` (None: an empty cache, i.e. prefill).

        ``attention_mask`` covers the cache and the new tokens: (B, cache.length + T). ``last_only``: return only
        the last position's logits (B, 1, V), read from the graph's ``last_logits`` output, so that the full
        (B, T, V) logits stay where they were computed. ``capacity`` (preallocated cache, at prefill): the slots
        to allocate, the prompt and every token to come (default: T + ``reserve``). ``greedy``: return only the
        next greedy token per sequence (the graph's ``next_token``, an argmax on the device; graphs without that
        output: the argmax of the last logits, on the host), no logits.
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, t = input_ids.shape
        if self.packed:
            return self._forward_packed(input_ids, attention_mask, position_ids, cache, last_only, capacity, greedy)
        if self.preallocated:
            return self._forward_preallocated(input_ids, attention_mask, position_ids, cache, last_only, capacity,
                                              greedy)
        cache = cache or self.empty_cache(b)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=self.mask_dtype)
        if attention_mask.shape != (b, cache.length + t):
            raise ValueError(
                f"attention_mask must be (batch, past + new) = {(b, cache.length + t)}, got {attention_mask.shape}"
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, t)
        feeds: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.position_dtype is not None:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=self.position_dtype)
        if self.selects_logits:
            feeds["logits_positions"] = _logits_positions(b, t, last_only or greedy)
        host: dict[str, np.ndarray] = {}
        routing = cache.routing if self.gated else None  # None at prefill: the graph decides
        if self.gated and routing is None:  # every sequence may run every layer; run_layer is not read
            feeds["routing_decisions"] = np.ones((b, len(self.routed_layers)), dtype=np.bool_)
            host = {f"run_layer.{i}": np.array(True) for i in self.routed_layers}
        for i in self.kv_layers:
            if routing is not None and f"past_key_values.{i}.key" in routing.feeds:
                continue  # a layer no sequence runs: its empty past is one of the fixed inputs
            k, v = cache.past[i]
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        dropped = routing.dropped if routing is not None else frozenset()
        wanted = [n for n in self.output_names if n not in _LOGITS and n not in dropped]
        fetched = self._fetched(last_only, greedy)
        wanted.append(fetched)
        session = self.prefill_session if routing is None else self.session
        if self.io_binding:
            if routing is not None and routing.binding is None:
                routing.binding = session.io_binding()
                for name, value in routing.feeds.items():
                    routing.binding.bind_ortvalue_input(name, value)
                for name, value in routing.host.items():
                    routing.binding.bind_cpu_input(name, value)
            outputs = self._run_io_binding(feeds, host, wanted, session=session,
                                           binding=None if routing is None else routing.binding)
        else:
            if routing is not None:
                feeds.update(routing.feeds)
                host = routing.host
            outputs = self._run_plain(feeds, host, wanted, session=session)
        logits, next_token = self._read(fetched, outputs[fetched], last_only, greedy)

        if not self.gated:
            past = {i: (outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]) for i in self.kv_layers}
            return StepOutput(logits=logits, cache=Cache(past=past, length=cache.length + t), next_token=next_token)
        if routing is None:  # prefill: the decisions the graph took, held from now on
            routing = self._routing(outputs["decisions"], b)
        new = Cache(past={}, length=cache.length + t, routing=routing)
        for i in self.kv_layers:
            if f"present.{i}.key" in routing.dropped:  # no sequence runs this layer from now on: it keeps no cache
                new.past[i] = (self._empty(b), self._empty(b))
            else:
                new.past[i] = (outputs[f"present.{i}.key"], outputs[f"present.{i}.value"])
        return StepOutput(logits=logits, cache=new, next_token=next_token)

    def _routing(self, decisions_value: Any, batch: int) -> _Routing:
        """What a prefill that returned ``decisions_value`` decided, and the inputs every later step feeds alike."""
        decisions = _host(decisions_value).astype(np.bool_)
        active = self.run_flags(decisions)
        feeds: dict[str, Any] = {"routing_decisions": decisions_value}
        dropped = {"decisions"}
        for i in self.gated_kv_layers:
            if not active[i]:  # a layer that keeps no cache gets an empty past; its present is never fetched
                for kind in ("key", "value"):
                    feeds[f"past_key_values.{i}.{kind}"] = self._empty(batch)
                    dropped.add(f"present.{i}.{kind}")
        host = {f"run_layer.{i}": np.array(active[i], dtype=np.bool_) for i in self.routed_layers}
        return _Routing(decisions=decisions, active=active, feeds=feeds, host=host, dropped=frozenset(dropped))

    def _fetched(self, last_only: bool, greedy: bool) -> str:
        """The one logits-like output a step copies off the device."""
        if greedy and "next_token" in self.output_names:
            return "next_token"
        if (last_only or greedy) and "last_logits" in self.output_names:
            return "last_logits"
        return "logits"

    @staticmethod
    def _read(name: str, value: Any, last_only: bool, greedy: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(logits, next_token)`` on the host from the fetched output."""
        host = _host(value)
        if name == "next_token":
            return None, host.reshape(-1).astype(np.int64)
        logits = host[:, None] if name == "last_logits" else (host[:, -1:] if (last_only or greedy) else host)
        if greedy:  # a graph without next_token: the argmax on the host (float32: numpy's float16 argmax is slow)
            return None, logits[:, -1].astype(np.float32).argmax(-1).astype(np.int64)
        return logits, None

    def _forward_preallocated(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                              position_ids: np.ndarray | None, cache: Cache | None, last_only: bool,
                              capacity: int | None, greedy: bool = False) -> StepOutput:
        b, t = input_ids.shape
        cache = cache or self._prefill_cache(b, t, capacity)
        total = cache.length + t
        if total > cache.capacity:
            cache = self._grow(cache, max(total, 2 * cache.capacity))
        attention_mask = np.ascontiguousarray(attention_mask, dtype=self.mask_dtype)
        if attention_mask.shape != (b, total):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(b, total)}, got {attention_mask.shape}")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, t)
        full_mask = np.zeros((b, cache.capacity), dtype=self.mask_dtype)
        full_mask[:, :total] = attention_mask
        feeds = {"input_ids": input_ids, "attention_mask": full_mask,
                 "position_ids": np.ascontiguousarray(position_ids, dtype=self.position_dtype),
                 "cache_position": np.arange(cache.length, total, dtype=np.int64)}
        if self.selects_logits:
            feeds["logits_positions"] = _logits_positions(b, t, last_only or greedy)
        fetched = self._fetched(last_only, greedy)
        logits_value = self._run_preallocated(cache, feeds, fetched, t)
        logits, next_token = self._read(fetched, logits_value, last_only, greedy)
        return StepOutput(logits=logits, cache=Cache(past=cache.past, length=total, capacity=cache.capacity),
                          next_token=next_token)

    def _run_preallocated(self, cache: Cache, feeds: dict[str, Any], fetched: str, t: int) -> Any:
        """Run a step whose presents are the pasts' buffers; a decode step (``t`` 1) as a CUDA graph replay."""
        b = feeds["input_ids"].shape[0]
        if self.cuda_graph and t == 1:
            key = (b, cache.capacity)
            if key not in self._graphs:
                self._graphs[key] = _GraphStep(self, cache, len(self._graphs))
            return self._graphs[key].run(feeds, fetched)
        buffers = {}
        for i, (k, v) in cache.past.items():
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
            buffers[f"present.{i}.key"], buffers[f"present.{i}.value"] = k, v  # the write lands in the buffer
        options = None
        if self.cuda_graph:  # prefill (or any multi-token step): outside the captured decode graph
            options = self._ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", "-1")
        return self._run_io_binding(feeds, {}, [fetched], buffers, options)[fetched]

    def _prefill_cache(self, batch: int, t: int, capacity: int | None) -> Cache:
        """The empty preallocated cache a prompt of ``t`` tokens starts from: ``capacity`` slots (at least ``t``),
        default ``t`` + ``reserve``."""
        return self.empty_cache(batch, t + self.reserve if capacity is None else max(int(capacity), t))

    def _forward_packed(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None,
                        cache: Cache | None, last_only: bool, capacity: int | None, greedy: bool) -> StepOutput:
        """A step of a GroupQueryAttention graph: the caller's layout (any padding) in, packed rows to the graph,
        logits back in the caller's layout. Each sequence's filled slots are its real tokens so far, which the
        caller's ``attention_mask`` counts."""
        b, t = input_ids.shape
        cache = cache or self._prefill_cache(b, t, capacity)
        attention_mask = np.asarray(attention_mask)
        if attention_mask.shape != (b, cache.length + t):
            raise ValueError(f"attention_mask must be (batch, past + new) = {(b, cache.length + t)}, "
                             f"got {attention_mask.shape}")
        real = attention_mask > 0
        filled = real[:, : cache.length].sum(axis=1)
        lengths = real.sum(axis=1)
        order = None
        if cache.length == 0:  # prefill: each row's real tokens to the front (a stable sort keeps their order)
            if not lengths.all():
                raise ValueError("every sequence of a prompt needs at least one real token")
            order = np.argsort(~real, axis=1, kind="stable")
            input_ids = np.take_along_axis(input_ids, order, axis=1)
            position_ids = (np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)) if position_ids is None
                            else np.take_along_axis(np.asarray(position_ids), order, axis=1))
        else:
            if not real[:, cache.length:].all():
                raise ValueError("a GroupQueryAttention graph takes every token after the prompt as real")
            if t > 1 and b > 1:
                raise ValueError("GroupQueryAttention takes steps of more than one token after the prompt for "
                                 "batch 1 only; decode one token per step")
            if position_ids is None:
                position_ids = filled[:, None] + np.arange(t, dtype=np.int64)
        if int(lengths.max()) > cache.capacity:
            cache = self._grow(cache, max(int(lengths.max()), 2 * cache.capacity))
        # the mask's width is the op's total_sequence_length: the prompt's at prefill (its "first prompt" rule), the
        # buffers' at a decode step (one shape at every step), the filled slots at a longer step
        width = t if order is not None else (cache.capacity if t == 1 else int(lengths.max()))
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(self.mask_dtype)
        last = (lengths - filled - 1)[:, None]  # each row's last real token in the step
        positions = last if (last_only or greedy) else _logits_positions(b, t, last=False)
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64), "attention_mask": mask,
                 "position_ids": np.ascontiguousarray(position_ids, dtype=self.position_dtype),
                 "logits_positions": np.ascontiguousarray(positions, dtype=np.int64)}
        fetched = self._fetched(last_only, greedy)
        logits_value = self._run_preallocated(cache, feeds, fetched, t)
        logits, next_token = self._read(fetched, logits_value, last_only, greedy)
        if logits is not None and order is not None and logits.shape[1] == t:
            logits = np.take_along_axis(logits, np.argsort(order, axis=1)[:, :, None], axis=1)  # caller's layout
        return StepOutput(logits=logits, next_token=next_token,
                          cache=Cache(past=cache.past, length=cache.length + t, capacity=cache.capacity))

    def _run_plain(self, feeds: dict[str, Any], host: dict[str, np.ndarray], wanted: list[str],
                   session: Any = None) -> dict[str, Any]:
        values = (session or self.session).run(wanted, {**feeds, **host})
        return dict(zip(wanted, values))

    def _run_io_binding(self, feeds: dict[str, Any], host: dict[str, np.ndarray], wanted: list[str],
                        buffers: dict[str, Any] | None = None, options: Any = None,
                        session: Any = None, binding: Any = None) -> dict[str, Any]:
        """Run ``session`` (default: the graph's) with IO binding: ``feeds`` on the device, ``host`` inputs in host
        memory, ``wanted`` outputs left where ONNX Runtime puts them, ``buffers`` outputs written into the given
        OrtValues (not returned). ``binding``: one of ``session``'s bindings with the other inputs already bound
        (its outputs are bound anew)."""
        session = session or self.session
        if binding is None:
            binding = session.io_binding()
        else:
            binding.clear_binding_outputs()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device_type, 0)
            binding.bind_ortvalue_input(name, value)
        for name, value in host.items():
            binding.bind_cpu_input(name, value)  # the If conditions: host memory, as ORT's CUDA If reads them
        for name, value in (buffers or {}).items():
            binding.bind_ortvalue_output(name, value)
        for name in wanted:  # outputs not bound (the full logits in a generate loop) never leave the device
            binding.bind_output(name, self.device_type, 0)
        session.run_with_iobinding(binding, options)
        return dict(zip(wanted, binding.get_outputs()[len(buffers or {}):]))

    # ---- generation --------------------------------------------------------------------------------------------
    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding. Returns the new tokens (B, n); after a sequence's EOS it gets ``pad_token_id``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b = input_ids.shape[0]
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        done = np.zeros(b, dtype=bool)
        out: list[np.ndarray] = []
        step = self.forward(input_ids, attention_mask, cache=None, greedy=True,
                            capacity=input_ids.shape[1] + max_new_tokens)
        for n in range(max_new_tokens):
            token = step.next_token
            token = np.where(done, pad, token)
            out.append(token)
            done |= np.isin(token, list(eos)) if eos else False
            if n == max_new_tokens - 1 or done.all():
                break
            attention_mask = np.concatenate([attention_mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            step = self.forward(token[:, None], attention_mask, cache=step.cache, greedy=True)
        return np.stack(out, axis=1) if out else np.zeros((b, 0), dtype=np.int64)


class _GraphStep:
    """One decode step of a preallocated-cache graph as ONNX Runtime replays it from a CUDA graph: every input and
    output bound once to a device buffer of its own, the inputs refreshed in place before each run. ONNX Runtime
    runs it normally a few times, then captures it under its graph id and replays it from then on."""

    def __init__(self, lm: OrtCausalLM, cache: Cache, graph_id: int):
        ort, device = lm._ort, lm.device_type
        b, capacity = int(next(iter(cache.past.values()))[0].shape()[0]), cache.capacity
        shapes = {"input_ids": ((b, 1), np.int64), "attention_mask": ((b, capacity), lm.mask_dtype),
                  "position_ids": ((b, 1), lm.position_dtype), "cache_position": ((1,), np.int64),
                  "logits_positions": ((b, 1), np.int64)}
        shapes = {name: shape for name, shape in shapes.items() if name in lm.input_names}
        self.session = lm.session
        self.binding = lm.session.io_binding()
        self.inputs = {}
        self.dtypes = {name: dtype for name, (_, dtype) in shapes.items()}
        for name, (shape, dtype) in shapes.items():
            self.inputs[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=dtype), device, 0)
            self.binding.bind_ortvalue_input(name, self.inputs[name])
        for i, (k, v) in cache.past.items():
            for kind, value in (("key", k), ("value", v)):
                self.binding.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.binding.bind_ortvalue_output(f"present.{i}.{kind}", value)
        outputs = {o.name: o for o in lm.session.get_outputs()}
        vocab = int(outputs["logits"].shape[-1])
        logits_dtype = _ORT_TO_NUMPY[outputs["logits"].type]
        self.outputs = {"logits": ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1, vocab), logits_dtype), device, 0)}
        if "last_logits" in outputs:
            self.outputs["last_logits"] = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, vocab), logits_dtype), device, 0)
        if "next_token" in outputs:
            self.outputs["next_token"] = ort.OrtValue.ortvalue_from_numpy(np.zeros((b, 1), np.int64), device, 0)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, feeds: dict[str, np.ndarray], output: str) -> Any:
        for name, value in self.inputs.items():
            value.update_inplace(np.ascontiguousarray(feeds[name], dtype=self.dtypes[name]))
        self.session.run_with_iobinding(self.binding, self.options)
        return self.outputs[output]


_PHASES_MANIFEST = "phase_graphs.json"  # rtexport.onnx.phase_graphs.MANIFEST_NAME (this module imports no rtexport)


def _read_phases(manifest: Path) -> dict[str, Any]:
    """``phase_graphs.json``: the phase graphs' paths (``graphs``) and where each weight lies (``initializers``)."""
    import json

    record = json.loads(manifest.read_text())
    if record.get("format") != "rtexport.phase_graphs/1":
        raise ValueError(f"{manifest}: not an rtexport phase-graphs record")
    return {"graphs": {phase: manifest.parent / name for phase, name in record["graphs"].items()},
            "initializers": record["initializers"], "source": record.get("source", "model.onnx")}


class _SharedWeights:
    """The weights ``entries`` (``phase_graphs.json``'s ``initializers``) of the files in ``folder``, each read once
    as an OrtValue that does not own its memory, to be given to several sessions: on the CPU, views of a read-only
    memory map; on CUDA, one device copy viewed through DLPack (ONNX Runtime uses such an initializer in place when
    it sits on the device its kernels read: two phase sessions measured the device memory of one session; on the
    CPU it still prepacks a MatMul's weights per session)."""

    def __init__(self, folder: Path, entries: list[dict[str, Any]], device_type: str):
        import onnxruntime as ort

        maps: dict[str, np.memmap] = {}
        self._owners: list[Any] = []  # what the shared values view: memory maps' arrays, device copies
        self.values: dict[str, Any] = {}
        for e in entries:
            if e["file"] not in maps:
                maps[e["file"]] = np.memmap(folder / e["file"], dtype=np.uint8, mode="r")
            array = maps[e["file"]][e["offset"]:e["offset"] + e["length"]].view(np.dtype(e["dtype"]))
            array = array.reshape(e["dims"])
            if device_type == "cpu":
                owner, value = array, ort.OrtValue.ortvalue_from_numpy(array)
            else:
                owner = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device_type, 0)
                value = ort.OrtValue.from_dlpack(owner)
            self._owners.append(owner)
            self.values[e["name"]] = value

    def add_to(self, options: Any) -> Any:
        for name, value in self.values.items():
            options.add_initializer(name, value)
        return options


def _provider_name(provider: Any) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _with_cuda_graph(provider: Any) -> Any:
    """CUDAExecutionProvider (a name or a (name, options) pair) with ``enable_cuda_graph``; others unchanged."""
    name, options = (provider, {}) if isinstance(provider, str) else provider
    if name != "CUDAExecutionProvider":
        return provider
    return (name, {**options, "enable_cuda_graph": "1"})


_LOGITS = ("logits", "last_logits", "next_token")


def _logits_positions(batch: int, seq_len: int, last: bool) -> np.ndarray:
    """``logits_positions`` (B, K) for a step of ``seq_len`` tokens: the last position, or every position."""
    positions = np.arange(seq_len - 1 if last else 0, seq_len, dtype=np.int64)
    return np.ascontiguousarray(np.broadcast_to(positions, (batch, positions.size)))


def _host(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()
