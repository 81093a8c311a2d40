"""Static and gated ONNX export through ``torch.onnx.export(dynamo=True)``.

The output folder holds ``model.onnx`` with its weights in ``model.onnx.data`` (external data, always: graphs over
2 GB need it and one layout for every size keeps the loaders and checks the same), the tokenizer files when the model
has a tokenizer, and ``export_info.json`` that says what made the graph (mode, dtype, opset, layout, versions). A
gated export also holds ``prefill.onnx`` and ``decode.onnx`` (``phase_graphs.py``: the two phases as graphs of
their own, over the same weights file) and ``phase_graphs.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactMismatch, DataError
from ..fsutil import atomic_directory, file_sha256, read_artifact, write_json_atomic
from ..routing.config import parse_layers
from .bool_reduce import reduce_bool_any
from .graph_model import (ATTENTION_KINDS, EXPORT_DOMAIN, KV_CACHES, LOGITS, MODES, PREALLOCATED_OPSET, DecoderGraph,
                          GraphSpec, build_spec, prefill_always_from_rates)
from .phase_graphs import write_phase_graphs

GRAPH_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
INFO_NAME = "export_info.json"
INFO_FORMAT = "rtexport.onnx_export/1"
ONNX_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
OPSETS = range(17, 25)
DEFAULT_OPSET = 23
FUSED_ATTENTION_OPSET = 23  # ONNX Attention (with grouped-query heads, past/present) is opset 23


def _canonical_dtype(dtype: str | torch.dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        for name, value in ONNX_DTYPES.items():
            if value == dtype and name in ("float32", "float16"):
                return name, value
    elif dtype in ONNX_DTYPES:
        value = ONNX_DTYPES[dtype]
        return ("float32" if value == torch.float32 else "float16"), value
    raise DataError(f"ONNX export supports float32 and float16, not {dtype}")


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("rtexport", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _example_inputs(graph: DecoderGraph, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    """Tracing inputs: sizes that no two dimensions share (and none is 0 or 1), so nothing gets specialised."""
    spec = graph.spec
    b, t, p = 2, 3, 5
    # a preallocated cache: a buffer of 11 slots, this step writing slots 5-7
    cache_len = 11 if graph.kv_cache == "preallocated" else p
    vocab = int(graph.embed_tokens.weight.shape[0])
    ids = torch.randint(0, vocab, (b, t), device=device)
    mask = torch.ones(b, (p + t) if graph.kv_cache == "growing" else cache_len, dtype=torch.int64, device=device)
    pos = torch.arange(p, p + t, device=device)[None].expand(b, t).contiguous()
    past = []
    for i in spec.kv_layers:
        shape = (b, graph.num_kv_heads, cache_len, graph.head_dim)
        past += [torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)]
    # selected logits: 4 positions of the 3 tokens (a length no other dimension has; repeats are allowed)
    selected = torch.tensor([[2, 0, 1, 2]], device=device).expand(b, 4).contiguous()
    if graph.attention == "gqa":
        # GroupQueryAttention: a mask of 7 slots (a width no other dimension has), no cache_position
        mask = torch.ones(b, 7, dtype=torch.int64, device=device)
        example: tuple[Any, ...] = (ids, mask, pos, past, None, None, None)
    elif graph.kv_cache == "preallocated":
        example = (ids, mask, pos, past, None, None, torch.arange(p, p + t, device=device))
    elif spec.mode == "static":
        example = (ids, mask, pos, past, None, None, None)
    else:
        decisions = torch.ones(b, len(spec.routed_layers), dtype=torch.bool, device=device)
        run = [torch.tensor(True, device=device) for _ in spec.routed_layers]
        example = (ids, mask, pos, past, decisions, run, None)
    return example + ((selected,) if graph.logits == "selected" else (None,))


@contextlib.contextmanager
def _quiet_exporter_registry():
    """torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent: not our users'
    concern. Raises that one logger's level for the export and restores it."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def prefill_select_for_this_torch() -> str:
    """``cond`` where torch.export traces the gated graph's nested ``cond`` (torch >= 2.13; torch 2.11 fails inside
    dynamo with "'Integer' object has no attribute 'node'", seen on the GPU machine), else ``logical``."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "cond" if (major, minor) >= (2, 13) else "logical"


def _dynamic_shapes(graph: DecoderGraph) -> tuple[Any, ...]:
    from torch.export import Dim

    spec = graph.spec
    batch, seq = Dim("batch_size"), Dim("sequence_length")
    selected = {0: batch, 1: Dim("logits_length")} if graph.logits == "selected" else None
    if graph.attention == "gqa":
        # the mask has its own width (the prompt's length at prefill, the buffers' at decode)
        cache, total = Dim("cache_length"), Dim("total_sequence_length")
        kv = [{0: batch, 2: cache} for _ in range(2 * len(spec.kv_layers))]
        return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv, None, None, None, selected)
    if graph.writes_at_cache_position:
        # the mask and every buffer share the cache's length; cache_position is as long as the new tokens
        cache = Dim("cache_length")
        kv = [{0: batch, 2: cache} for _ in range(2 * len(spec.kv_layers))]
        return ({0: batch, 1: seq}, {0: batch, 1: cache}, {0: batch, 1: seq}, kv, None, None, {0: seq}, selected)
    total, past = Dim("total_sequence_length"), Dim("past_sequence_length")
    # one past length for every layer, routed or not: a routed layer's sub-block runs only with the whole cache (the
    # decisions are fixed at prefill). A layer no sequence runs is fed an empty cache, which only its skip branch
    # reads (it returns it unchanged); ONNX Runtime does not hold inputs to their symbolic dimensions, and the
    # graph's inputs name that layer's length apart (see _dim_names)
    kv = [{0: batch, 2: past} for _ in range(2 * len(spec.kv_layers))]
    shapes: tuple[Any, ...] = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv)
    if spec.mode == "gated":
        shapes += ({0: batch}, [None for _ in spec.routed_layers])
    else:
        shapes += (None, None)
    return shapes + (None, selected)


def _dim_names(graph: DecoderGraph) -> dict[str, list[str | None]]:
    """Readable names for the symbolic dimensions of every graph input and output (None: a fixed size). A
    preallocated cache's pasts and presents span the buffer (``cache_length``), and so does its mask where the graph
    writes at ``cache_position`` (a GroupQueryAttention graph's mask has its own width); selected logits are as many
    as their positions (``logits_length``)."""
    spec = graph.spec
    preallocated = graph.kv_cache == "preallocated"
    scored = "logits_length" if graph.logits == "selected" else "sequence_length"
    names: dict[str, list[str | None]] = {
        "input_ids": ["batch_size", "sequence_length"],
        "attention_mask": ["batch_size", "cache_length" if graph.writes_at_cache_position
                           else "total_sequence_length"],
        "position_ids": ["batch_size", "sequence_length"],
        "logits_positions": ["batch_size", "logits_length"],
        "logits": ["batch_size", scored, None],
        "last_logits": ["batch_size", None],
        "next_token": ["batch_size", None],
    }
    if graph.writes_at_cache_position:
        names["cache_position"] = ["sequence_length"]
    for i in spec.kv_layers:
        past = f"past_sequence_length_{i}" if spec.routes_attention(i) else "past_sequence_length"
        present = f"present_sequence_length_{i}" if spec.routes_attention(i) else "total_sequence_length"
        if preallocated:
            past = present = "cache_length"
        for kind in ("key", "value"):
            names[f"past_key_values.{i}.{kind}"] = ["batch_size", None, past, None]
            names[f"present.{i}.{kind}"] = ["batch_size", None, present, None]
    if spec.mode == "gated":
        names["routing_decisions"] = ["batch_size", None]
        names["decisions"] = ["batch_size", None]
    return names


def _finish_graph(path: Path, graph: DecoderGraph, metadata: dict[str, str]) -> None:
    """Name the symbolic dimensions of inputs and outputs and add metadata; the weights file is not touched.
    A graph that writes its preallocated cache with ``TensorScatter`` gets those nodes in the ONNX domain, at opset 24."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if graph.writes_at_cache_position:
        _declare_tensor_scatter(model)
    reduce_bool_any(model)  # a gated prefill's "some sequence runs it": one node per routed layer, not three
    names = _dim_names(graph)
    for value in list(model.graph.input) + list(model.graph.output):
        wanted = names.get(value.name)
        if wanted is None:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, name in zip(dims, wanted):
            if name is not None and not dim.HasField("dim_value"):
                dim.dim_param = name
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    _drop_stack_traces(model.graph)
    onnx.save(model, str(path))


def _declare_tensor_scatter(model: Any) -> None:
    """Move the traced ``rtexport::TensorScatter`` nodes to the ONNX domain and declare opset 24 (from 23: the ops
    of these graphs mean the same at 24, where ``Attention`` only gains an optional input)."""
    for node in model.graph.node:
        if node.domain == EXPORT_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != EXPORT_DOMAIN]
    for o in kept:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, PREALLOCATED_OPSET)
    del model.opset_import[:]
    model.opset_import.extend(kept)
    # the exporter's onnxscript functions, if any, carry their own opset imports; none is needed by these graphs
    for f in model.functions:
        for o in f.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, PREALLOCATED_OPSET)


def _drop_stack_traces(graph: Any) -> None:
    """Remove the exporter's per-node Python stack traces (``pkg.torch.onnx.stack_trace``), at any depth.

    Inside ``If`` branches each trace repeats the whole nesting (tens of KB per node): they made a Llama-3-8B gated
    graph's model.onnx 100 MB instead of 4 MB. The node names and name scopes stay."""
    import onnx

    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_stack_traces(attr.g)


def make_readable(folder: Path) -> None:
    """Staging folders and atomic writes start private (0700/0600); a finished artifact is shared like any file."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for item in folder.iterdir():
        if item.is_file():
            item.chmod((0o777 if os.access(item, os.X_OK) else 0o666) & ~mask)


def _share_transposed_weights(model: Any) -> None:
    """Linear layers export as ``MatMul(x, Transpose(W))`` and the optimizer folds each transpose into a new weight.
    Give every weight one transpose, in the main graph, named ``{W}.T`` (instead of ``val_123``), so the graph's
    weights keep the model's parameter names and a weight used in several ``If`` branches (a gated graph's routed
    attention sits in its prefill and its decode branch) is stored once, not once per branch."""
    import onnx_ir as ir
    from onnx_ir.traversal import RecursiveGraphIterator

    main = model.graph
    first = main.node(0) if main.num_nodes() else None
    shared: dict[tuple[str, tuple[int, ...]], Any] = {}
    for node in list(RecursiveGraphIterator(main)):
        if node.op_type != "Transpose" or not node.inputs or node.inputs[0] is None:
            continue
        weight = node.inputs[0]
        if not weight.is_initializer() or weight.graph is not main:
            continue
        perm = tuple(node.attributes.get_ints("perm", ()) or ())
        key = (weight.name, perm)
        if key not in shared:
            hoisted = ir.node("Transpose", [weight], attributes={"perm": list(perm)} if perm else None)
            if first is None:
                main.append(hoisted)
            else:
                main.insert_before(first, hoisted)
            # a 2-D weight's transpose is {W}.T; any other permutation names itself
            plain = perm in ((), (1, 0))
            hoisted.outputs[0].name = f"{weight.name}.T" + ("" if plain else "_" + "_".join(map(str, perm)))
            shared[key] = hoisted.outputs[0]
        node.outputs[0].replace_all_uses_with(shared[key], replace_graph_outputs=True)
        node.graph.remove(node, safe=True)


def check_graph(path: str | Path) -> None:
    """``onnx.checker`` by path (works for graphs over 2 GB); raise ArtifactMismatch with its first line."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactMismatch(f"ONNX graph not found: {path}")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactMismatch(f"{path} is not a valid ONNX graph: {first}") from None


def _check_gated_layout(path: Path, spec: GraphSpec, prefill_select: str) -> None:
    """The If nodes a gated export must hold. "cond": one in the main graph (the prefill flag) and one per routed
    layer (the sub-block's) in each of its branches, except the prefill branch's ``prefill_always`` layers;
    "logical": one per routed layer in the main graph."""
    routed = len(spec.routed_layers)
    want = (1, 1 + 2 * routed - len(spec.prefill_always)) if prefill_select == "cond" else (routed, routed)
    have = (_count_ops(path, "If"), _count_ops(path, "If", subgraphs=True))
    if have != want:
        raise ArtifactMismatch(
            f"the exported graph holds {have[0]} If nodes ({have[1]} with their branches) for {routed} routed layers "
            f"(prefill_select {prefill_select!r} makes {want[0]} ({want[1]}))"
        )


def _count_ops(path: Path, op_type: str, *, subgraphs: bool = False) -> int:
    """Nodes of ``op_type`` in the main graph (``subgraphs``: also inside ``If`` branches, at any depth)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def count(graph: Any) -> int:
        n = 0
        for node in graph.node:
            n += node.op_type == op_type
            if subgraphs:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        n += count(attr.g)
                    n += sum(count(g) for g in attr.graphs)
        return n

    return count(model.graph)


def resolve_attention(attention: str, opset: int) -> str:
    """``"auto"``: the fused ONNX ``Attention`` node where the opset has it (23 and later), else explicit."""
    if attention == "auto":
        return "fused" if opset >= FUSED_ATTENTION_OPSET else "explicit"
    if attention not in ATTENTION_KINDS:
        raise DataError(f"attention must be auto, {', '.join(ATTENTION_KINDS)}; got {attention!r}")
    if attention == "fused" and opset < FUSED_ATTENTION_OPSET:
        raise DataError(f"fused attention needs opset {FUSED_ATTENTION_OPSET} or later (ONNX Attention), got {opset}")
    if attention == "gqa" and opset < FUSED_ATTENTION_OPSET:
        raise DataError(f"gqa attention needs opset {FUSED_ATTENTION_OPSET} or later (ONNX RotaryEmbedding), got {opset}")
    return attention


def check_export_options(*, mode: str, opset: int, attention: str, kv_cache: str, logits: str) -> str:
    """Refuse, in one line each, a combination of export settings that cannot be exported; returns the resolved
    attention. Needs no model, so a pipeline can check its settings before any work."""
    if mode not in MODES:
        raise DataError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if int(opset) not in OPSETS:
        raise DataError(f"--opset must be within {OPSETS.start}-{OPSETS.stop - 1}, got {opset}")
    if kv_cache not in KV_CACHES:
        raise DataError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    if logits not in LOGITS:
        raise DataError(f"--logits must be one of {', '.join(LOGITS)}, got {logits!r}")
    if kv_cache == "preallocated":
        if mode != "static":
            raise DataError("--kv-cache preallocated is for static graphs (a gated graph drops the cache of layers "
                            "no sequence runs)")
        if int(opset) < PREALLOCATED_OPSET - 1:
            raise DataError(f"--kv-cache preallocated needs --opset {PREALLOCATED_OPSET - 1} or later (its "
                            f"TensorScatter graph is declared at opset {PREALLOCATED_OPSET}), not {opset}")
    attention = resolve_attention(attention, int(opset))
    if attention == "gqa" and (kv_cache, logits) != ("preallocated", "selected"):
        # the op writes a preallocated cache, packed per sequence, so a batch's last tokens sit at different positions
        raise DataError("--attention gqa (ONNX Runtime's GroupQueryAttention) needs --kv-cache preallocated and "
                        "--logits selected")
    return attention


def build_graph_module(
    loaded: Any,
    *,
    mode: str = "static",
    plan: Any = None,
    routed: Any = None,
    dtype: str | torch.dtype = "float32",
    opset: int = DEFAULT_OPSET,
    attention: str = "auto",
    prefill_select: str | None = None,
    kv_cache: str = "growing",
    logits: str = "all",
    prefill_always: str | list[int] | None = "auto",
) -> DecoderGraph:
    """The ``DecoderGraph`` (the module torch.onnx traces) that :func:`export_onnx` exports for these arguments,
    after the same checks. Also what a caller needs to re-create an export's weights on another machine."""
    attention = check_export_options(mode=mode, opset=opset, attention=attention, kv_cache=kv_cache, logits=logits)
    _, torch_dtype = _canonical_dtype(dtype)
    model = loaded.model
    config = model.config
    if plan is not None:
        plan.check_model(loaded.fingerprint)
        if plan.num_layers != config.num_hidden_layers:
            raise ArtifactMismatch(f"the plan is for {plan.num_layers} layers, the model has {config.num_hidden_layers}")
    routers: dict[int, torch.Tensor] | None = None
    routed_layers: list[int] = []
    routed_target = "attn"
    threshold = 0.5
    if mode == "gated":
        if routed is None:
            raise DataError("gated export needs routers (a router folder or a RoutedModel)")
        routed.config.check_model(loaded.fingerprint)
        if routed.config.granularity != "sequence":
            raise ArtifactMismatch(
                "gated export needs sequence-level routers: token-level decisions change at every step and would "
                "need a device-side condition per If"
            )
        if routed.base_model is not model:
            raise ArtifactMismatch("the RoutedModel wraps a different model object than the one being exported")
        routers = {int(k): r.proj.weight for k, r in routed.routers.items()}
        routed_layers = list(routed.layers)
        routed_target = routed.config.target
        threshold = float(routed.state.threshold)
        if plan is not None and plan.target not in (routed_target, "block"):
            raise ArtifactMismatch(f"the plan drops {plan.target} sub-blocks but the routers gate {routed_target}")
    elif routed is not None:
        raise DataError("a static export takes a plan, not routers (make a plan from the routers first)")

    spec = build_spec(
        config,
        loaded.adapter,
        mode=mode,
        skip=list(plan.skip) if plan is not None else [],
        skip_target=plan.target if plan is not None else "attn",
        routed_layers=routed_layers,
        routed_target=routed_target,
        threshold=threshold,
    )
    prefill_select = prefill_select or prefill_select_for_this_torch()
    if mode == "gated":
        always = _prefill_always(prefill_always, routed.config, list(spec.routed_layers), prefill_select)
        spec = dataclasses.replace(spec, prefill_always=tuple(always))
    with torch.no_grad():
        return DecoderGraph(model, loaded.adapter, spec, routers, dtype=torch_dtype, attention=attention,
                            prefill_select=prefill_select, kv_cache=kv_cache, logits=logits)


def _prefill_always(choice: str | list[int] | None, config: Any, routed_layers: list[int],
                    prefill_select: str) -> list[int]:
    """``export_onnx``'s ``prefill_always`` as a list of routed layers (see there)."""
    if choice is None or (isinstance(choice, str) and choice.strip().lower() in ("", "none")):
        return []
    if isinstance(choice, str) and choice.strip().lower() == "auto":
        # the logical layout has no prefill If to leave out
        if prefill_select != "cond":
            return []
        return prefill_always_from_rates(config.execution_rates, routed_layers)
    # GraphSpec refuses layers that are not routed, DecoderGraph a list on the logical layout
    return parse_layers(choice, config.num_layers)


def export_onnx(
    loaded: Any,
    output_dir: str | Path,
    *,
    mode: str = "static",
    plan: Any = None,
    routed: Any = None,
    dtype: str | torch.dtype = "float32",
    opset: int | None = None,
    save_tokenizer: bool = True,
    attention: str = "auto",
    prefill_select: str | None = None,
    kv_cache: str = "growing",
    logits: str = "all",
    prefill_always: str | list[int] | None = "auto",
) -> Path:
    """Export ``loaded`` (a ``LoadedModel``) to ``output_dir``; returns the path of ``model.onnx``.

    ``mode="static"``: the frozen ``plan`` (a ``SkipPlan``; ``None`` exports the whole model) decides which
    sub-blocks exist. ``mode="gated"``: ``routed`` (a ``RoutedModel`` with sequence-level routers on this model)
    puts each routed sub-block in an ``If``; a ``plan`` may also be given, and its skipped sub-blocks are left out.

    ``attention``: ``"fused"`` exports each layer's attention as one ONNX ``Attention`` node (opset 23 or later;
    ONNX Runtime's CUDA EP runs it with its flash / memory-efficient / fused-softmax kernels), ``"explicit"`` as
    MatMul/Softmax/MatMul with the KV heads repeated (any opset), ``"auto"`` fused when ``opset >= 23``.
    ``prefill_select`` (gated): ``"cond"`` or ``"logical"`` (see ``graph_model.PREFILL_SELECTS``); default: what
    this torch can export (:func:`prefill_select_for_this_torch`).
    ``kv_cache`` (static): ``"growing"`` (past in, past + new out) or ``"preallocated"`` (opset 24: one buffer per
    K and V written in place, fixed shapes at every decode step, so ONNX Runtime can replay it as a CUDA graph).
    ``opset``: default 23. A preallocated cache's graph is traced at opset 23 and declares 24 (its ``TensorScatter``
    nodes; nothing else in it differs between the two).
    ``logits``: ``"all"`` (``logits`` for every new token, what ORT GenAI reads) or ``"selected"`` (a
    ``logits_positions`` input names the positions to score: a generate loop asks for the last one, so a prefill
    does not run the LM head over the whole prompt).
    ``prefill_always`` (gated, ``prefill_select="cond"``): the routed layers that run at prefill without an ``If``,
    for the whole batch, each sequence keeping its output only where its router says run (the same logits and
    decisions; no device-to-host copy and no wait for the host, the compute of a block the batch skips instead):
    ``"auto"``, those the routers ran for at least ``graph_model.PREFILL_ALWAYS_RATE`` of the held-out sequences
    (``RouterConfig.execution_rates``; none without rates), ``None`` / ``"none"`` / ``[]``, none, or layers
    (``"16-22"`` or a list). After prefill every routed layer is in an ``If`` on its host flag.
    """
    started = time.perf_counter()
    if opset is None:
        opset = DEFAULT_OPSET
    dtype_name, torch_dtype = _canonical_dtype(dtype)
    graph = build_graph_module(loaded, mode=mode, plan=plan, routed=routed, dtype=dtype, opset=opset,
                               attention=attention, prefill_select=prefill_select, kv_cache=kv_cache, logits=logits,
                               prefill_always=prefill_always)
    spec, attention, prefill_select = graph.spec, graph.attention, graph.prefill_select
    output_dir = Path(output_dir)
    with torch.no_grad():
        device = next(graph.parameters()).device
        example = _example_inputs(graph, device, torch_dtype)
        with atomic_directory(output_dir) as staging, warnings.catch_warnings(), _quiet_exporter_registry():
            # the exporter's notes on dimension renaming and pytree deprecations are not for our users
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*treespec.*")
            # torch.export first: handing the ExportedProgram to torch.onnx keeps it from renaming dynamic axes
            # itself (it pairs them with inputs by position, which breaks on the scalar run_layer inputs); the
            # axes get their names in _finish_graph
            exported = torch.export.export(graph, example, dynamic_shapes=_dynamic_shapes(graph),
                                          strict=False)
            program = torch.onnx.export(
                exported,
                dynamo=True,
                input_names=graph.input_names(),
                output_names=graph.output_names(),
                opset_version=min(int(opset), PREALLOCATED_OPSET - 1) if graph.writes_at_cache_position else int(opset),
                external_data=True,
                optimize=False,
                verbose=False,
            )
            _share_transposed_weights(program.model)
            program.optimize()
            graph_path = staging / GRAPH_NAME
            program.save(str(graph_path), external_data=True)
            del program, exported
            if not (staging / DATA_NAME).is_file():
                raise ArtifactMismatch(f"the exporter wrote no {DATA_NAME} next to {GRAPH_NAME}")
            gated_kv = [i for i in spec.kv_layers if spec.routes_attention(i)]
            _finish_graph(graph_path, graph, {"rtexport.mode": mode, "rtexport.dtype": dtype_name,
                                             "rtexport.fingerprint": loaded.fingerprint,
                                             "rtexport.attention": attention,
                                             # layers whose attention sits in an If: their cache is dropped
                                             # while no sequence runs them (read by runtime.OrtCausalLM)
                                             "rtexport.gated_kv_layers": ",".join(map(str, gated_kv)),
                                             "rtexport.kv_cache": kv_cache,
                                             "rtexport.logits": logits})
            check_graph(graph_path)
            phase_files: dict[str, Path] = {}
            if mode == "gated":
                _check_gated_layout(graph_path, spec, prefill_select)
                if prefill_select == "cond":  # prefill.onnx and decode.onnx: each branch of the prefill If alone
                    phase_files = write_phase_graphs(staging, GRAPH_NAME)
            if attention == "fused":
                fused = _count_ops(graph_path, "Attention", subgraphs=True)
                # a gated graph's prefill If holds the decoder twice (prefill_select "cond"), weights stored once
                copies = 2 if mode == "gated" and prefill_select == "cond" else 1
                if fused != copies * len(spec.attention_layers):
                    raise ArtifactMismatch(
                        f"the exported graph holds {fused} ONNX Attention nodes for {len(spec.attention_layers)} "
                        f"attention layers (torch {torch.__version__} did not translate scaled_dot_product_attention); "
                        "export with attention='explicit'"
                    )
            if attention == "gqa":
                gqa = _count_ops(graph_path, "GroupQueryAttention")
                if gqa != len(spec.attention_layers) or _count_ops(graph_path, "Attention"):
                    raise ArtifactMismatch(f"the exported graph holds {gqa} GroupQueryAttention nodes for "
                                           f"{len(spec.attention_layers)} attention layers")
            if graph.writes_at_cache_position:
                writes = _count_ops(graph_path, "TensorScatter")
                if writes != 2 * len(spec.kv_layers):
                    raise ArtifactMismatch(f"the exported graph writes its KV buffers with {writes} TensorScatter "
                                           f"nodes, not 2 per attention layer ({len(spec.kv_layers)} layers)")
            if save_tokenizer and loaded.tokenizer is not None:
                loaded.tokenizer.save_pretrained(str(staging))
            final_opset = PREALLOCATED_OPSET if graph.writes_at_cache_position else int(opset)
            info = export_info(loaded, spec, graph, dtype_name, final_opset, plan, routed, staging)
            info["attention"] = attention
            info["kv_cache"] = kv_cache
            info["logits"] = logits
            for name, path in phase_files.items():
                info["files"][name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            info["phase_graphs"] = sorted(phase_files) or None
            info["export_seconds"] = round(time.perf_counter() - started, 1)
            write_json_atomic(staging / INFO_NAME, info)
            make_readable(staging)
    return output_dir / GRAPH_NAME


def export_info(loaded, spec: GraphSpec, graph: DecoderGraph, dtype_name: str, opset: int, plan, routed,
                folder: Path) -> dict[str, Any]:
    config = loaded.model.config
    tok = loaded.tokenizer
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    return {
        "format": INFO_FORMAT,
        "mode": spec.mode,
        "dtype": dtype_name,
        "opset": opset,
        "prefill_select": graph.prefill_select if spec.mode == "gated" else None,
        "graph": GRAPH_NAME,
        "external_data": DATA_NAME,
        "files": {
            GRAPH_NAME: {"bytes": (folder / GRAPH_NAME).stat().st_size, "sha256": file_sha256(folder / GRAPH_NAME)},
            DATA_NAME: {"bytes": (folder / DATA_NAME).stat().st_size},
        },
        "spec": spec.to_dict(),
        "inputs": graph.input_names(),
        "outputs": graph.output_names(),
        "model": {
            "model_type": getattr(config, "model_type", None),
            "source": loaded.source.to_dict(),
            "fingerprint": loaded.fingerprint,
            "num_hidden_layers": int(config.num_hidden_layers),
            "hidden_size": int(config.hidden_size),
            "num_attention_heads": graph.num_heads,
            "num_key_value_heads": graph.num_kv_heads,
            "head_dim": graph.head_dim,
            "vocab_size": int(graph.embed_tokens.weight.shape[0]),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": eos,
            "pad_token_id": (tok.pad_token_id if tok is not None else None) or getattr(config, "pad_token_id", None),
        },
        "plan": plan.to_dict() if plan is not None else None,
        "routers": (
            {"layers": list(routed.layers), "target": routed.config.target, "threshold": float(routed.state.threshold),
             "base_model": routed.config.base_model}
            if routed is not None else None
        ),
        "tokenizer": bool(tok is not None),
        "versions": _versions(),
    }


def load_export_info(folder: str | Path) -> dict[str, Any]:
    """Read and check ``export_info.json`` and the files it names (by path; the weights are not loaded)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    path = folder / INFO_NAME
    if not path.is_file():
        raise ArtifactMismatch(f"{folder} holds no {INFO_NAME}: not an rtexport ONNX export")
    info = read_artifact(path, what="rtexport ONNX export record", format=INFO_FORMAT)
    for name, meta in info.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise ArtifactMismatch(f"{folder} is incomplete: {name} is missing")
        if "bytes" in meta and f.stat().st_size != meta["bytes"]:
            raise ArtifactMismatch(f"{f} has {f.stat().st_size} bytes, export_info.json says {meta['bytes']}")
    return info
