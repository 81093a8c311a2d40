"""A gated graph's two phases as graphs of their own: ``prefill.onnx`` and ``decode.onnx``, next to ``model.onnx``.

A gated export (``prefill_select="cond"``) holds its decoder twice, under one ``If`` on the prefill flag: the prefill
branch runs the routers, the decode branch one ``If`` per routed layer on the host input ``run_layer.{i}``. That
graph serves both phases on its own, but ONNX Runtime runs every decode step's ~15 nodes per layer as a subgraph,
which costs more per node than the main graph. On the H200 (Llama-3-8B shape, fp16, BENCHMARKS.md session 7) the
decode step with its per-layer ``If``\\ s lifted into the main graph measured 0.99 of the static graph's step where
the same step inside the prefill ``If`` measured 1.05-1.06 (``examples/benchmarks/ort_gated_layouts.py``); through
the runner, 0.99-1.01 (session 8, with the inputs the prefill fixes bound once) against 1.02-1.04 for
``model.onnx`` alone.

So the export also writes each branch lifted into a graph of its own: the same inputs, outputs, metadata and node
names, the initializers that branch reads, and the same weights file (``model.onnx.data``, by reference: no byte of
weights is written twice). Every routed block is still inside its own ``If`` in both; only the prefill flag's
``If`` is gone, because the caller (``runtime.OrtCausalLM``) knows which phase it runs. A main-graph node that only
one branch of one ``If`` reads moves into that branch: in the decode graph, a routed layer's input norm (no router
reads it there) then runs only when the layer does. ``phase_graphs.json`` names the two graphs and where each weight
lies in the weights file, so that the runner (numpy and onnxruntime only) loads the weights once and gives the two
sessions the same tensors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..errors import ArtifactMismatch

PHASE_GRAPHS = {"prefill": "prefill.onnx", "decode": "decode.onnx"}
# what the runner reads to find them and to load their shared weights once (json: the runner imports no onnx)
MANIFEST_NAME = "phase_graphs.json"
MANIFEST_FORMAT = "rtexport.phase_graphs/1"
# TensorProto data types by the names numpy gives them
_DTYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 9: "bool", 2: "uint8", 3: "int8"}
# the prefill flag's If: then = the prefill branch, else = the decode branch (graph_model.DecoderGraph.forward)
_BRANCH = {"prefill": "then_branch", "decode": "else_branch"}


def _names_read(graph: Any, into: set[str]) -> set[str]:
    """Every value name a node of ``graph`` or of its subgraphs reads, added to ``into``."""
    for node in graph.node:
        node_reads(node, into)
    return into


def node_reads(node: Any, into: set[str]) -> set[str]:
    """The value names ``node`` and its subgraphs read, added to ``into``."""
    into.update(node.input)
    for attr in node.attribute:
        if attr.g is not None and attr.g.node:
            _names_read(attr.g, into)
        for g in attr.graphs:
            _names_read(g, into)
    return into


def lift_phase(model: Any, phase: str) -> Any:
    """``model`` (a gated graph with the prefill flag's ``If``, weights not loaded) with that ``If``'s ``phase``
    branch as its main graph. Raises ``ArtifactMismatch`` for any other layout."""
    from onnx import helper

    if phase not in PHASE_GRAPHS:
        raise ValueError(f"phase must be one of {sorted(PHASE_GRAPHS)}, got {phase!r}")
    flags = [n for n in model.graph.node if n.op_type == "If"]
    if len(flags) != 1 or len(flags[0].output) != len(model.graph.output):
        raise ArtifactMismatch("not a gated graph with one prefill If around its decoder (prefill_select 'cond')")
    flag = flags[0]
    branch = next(a.g for a in flag.attribute if a.name == _BRANCH[phase])
    # the main graph's other nodes that the branch reads (e.g. the transposed LM head of tied embeddings), in their
    # order; the prefill flag's own arithmetic goes with its If
    needed = _names_read(branch, {o.name for o in branch.output})
    before = []
    for node in reversed(model.graph.node):
        if node.op_type != "If" and any(o in needed for o in node.output):
            before.append(node)
            node_reads(node, needed)
    lifted = copy.deepcopy(model)
    graph = lifted.graph
    del graph.node[:]
    graph.node.extend(reversed(before))
    graph.node.extend(branch.node)
    # the branch's results under the graph's output names (a value cannot keep both names)
    graph.node.extend(helper.make_node("Identity", [b.name], [o], name=f"{o}_{phase}")
                      for b, o in zip(branch.output, flag.output))
    _sink_into_branches(graph)
    read = _names_read(graph, set())
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    return lifted


def _sink_into_branches(graph: Any) -> None:
    """Move every main-graph node whose results only one branch of one ``If`` reads into the front of that branch,
    so that it runs only when that branch does. In the decode graph that is each routed layer's input norm: its
    router is not there, and only the layer's run branch reads the norm, which a skipped layer then no longer
    computes."""
    moved = True
    while moved:
        moved = False
        readers: dict[str, set[tuple[int, str]]] = {o.name: {(-1, "output")} for o in graph.output}
        for k, node in enumerate(graph.node):
            for name in node.input:
                readers.setdefault(name, set()).add((k, "input"))
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    for name in _names_read(attr.g, set()):
                        readers.setdefault(name, set()).add((k, attr.name))
        for k in range(len(graph.node) - 1, -1, -1):
            node = graph.node[k]
            where = set().union(*(readers.get(o, set()) for o in node.output)) if node.output else set()
            if len(where) != 1:
                continue
            (target, branch), = where
            if target <= k or graph.node[target].op_type != "If" or branch not in _BRANCH.values():
                continue
            body = next(a.g for a in graph.node[target].attribute if a.name == branch)
            body.node.insert(0, copy.deepcopy(node))
            del graph.node[k]
            moved = True
            break


def external_entries(tensors: Any) -> list[dict[str, Any]]:
    """Where each of ``tensors`` (TensorProtos) whose bytes live in an external data file lies: name, file, offset,
    length, dims, ONNX data type. Tensors stored inside the graph are left out."""
    from onnx.external_data_helper import uses_external_data

    found = []
    for t in tensors:
        if not uses_external_data(t):
            continue
        kv = {e.key: e.value for e in t.external_data}
        found.append({"name": t.name, "file": kv.get("location"), "offset": int(kv.get("offset", 0)),
                      "length": int(kv["length"]) if "length" in kv else None, "dims": [int(d) for d in t.dims],
                      "data_type": int(t.data_type)})
    return found


def _shared_entries(model: Any) -> list[dict[str, Any]]:
    """The manifest's entries: the main graph's external initializers of types numpy holds, with that type's name
    (ONNX Runtime loads the others itself)."""
    return [{**e, "dtype": _DTYPES[e["data_type"]]} for e in external_entries(model.graph.initializer)
            if e["data_type"] in _DTYPES and e["length"] is not None]


def write_phase_graphs(folder: str | Path, graph_name: str = "model.onnx") -> dict[str, Path]:
    """``prefill.onnx``, ``decode.onnx`` and ``phase_graphs.json`` from ``folder/graph_name`` (a gated export),
    each written atomically; returns the files' paths by name."""
    import onnx

    from ..fsutil import write_bytes_atomic, write_json_atomic

    folder = Path(folder)
    model = onnx.load(str(folder / graph_name), load_external_data=False)
    paths, shared = {}, {}
    for phase, name in PHASE_GRAPHS.items():
        lifted = lift_phase(model, phase)
        shared.update({e["name"]: e for e in _shared_entries(lifted)})
        paths[name] = write_bytes_atomic(folder / name, lifted.SerializeToString())
        onnx.checker.check_model(str(paths[name]))  # by path: it finds the weights file next to the graph
    # "source": the graph these are the phases of; a runner given another graph of the folder runs that graph
    manifest = {"format": MANIFEST_FORMAT, "source": graph_name, "graphs": PHASE_GRAPHS,
                "initializers": list(shared.values())}
    paths[MANIFEST_NAME] = write_json_atomic(folder / MANIFEST_NAME, manifest)
    return paths
