"""One rewrite of an exported graph: a ``torch.any`` (Cast bool→number, ReduceMax, Cast→bool) becomes one
``ReduceMax`` over the bools (ONNX opset 20 and later reduce bools).

torch.onnx writes ``torch.any`` as three nodes, and ONNX Runtime launches a kernel for each: a gated prefill
evaluates "does some sequence run this layer" once per routed layer, so that is 3 nodes per routed layer on the
path to the layer's ``If``, whose condition ONNX Runtime reads on the host. One ``ReduceMax`` gives the same bool
(the maximum of bools is their "any"; over no element it is false, as ``torch.any`` is, where the float maximum
would be -inf and cast to true). ONNX Runtime's CPU provider reduces bools; where the CUDA provider does not, it
runs the node on the CPU after the one device→host copy that the ``If`` needed anyway.
"""

from __future__ import annotations

from typing import Any

BOOL_REDUCE_OPSET = 20  # ReduceMax takes bool from opset 20
_BOOL = 9  # onnx.TensorProto.BOOL
_GRAPH = 5  # onnx.AttributeProto.GRAPH: an If's branch
# nodes whose output is bool whatever their inputs, and nodes that only move a tensor's elements (their output is
# bool when their input is)
_BOOL_OPS = {"And", "Or", "Xor", "Not", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "IsNaN",
             "IsInf"}
_LAYOUT_OPS = {"Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten", "Transpose", "Expand"}


def _attr(node: Any, name: str) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def _is_bool(name: str, producers: dict[str, Any], bool_values: set[str]) -> bool:
    """Whether value ``name`` is bool: a bool input, or made by a comparison/logical node, through layout nodes."""
    while name not in bool_values:
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type in _BOOL_OPS:
            return True
        if node.op_type == "Cast":
            return _attr(node, "to") == _BOOL
        if node.op_type not in _LAYOUT_OPS:
            return False
        name = node.input[0]
    return True


def _rewrite(graph: Any, outer: dict[str, Any], bool_values: set[str]) -> int:
    """Rewrite ``graph`` and its subgraphs in place; returns how many ``any``\\ s were rewritten."""
    local = {o: n for n in graph.node for o in n.output}
    producers = {**outer, **local}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    count, dropped = 0, set()
    for node in graph.node:
        if node.op_type != "Cast" or _attr(node, "to") != _BOOL or id(node) in dropped:
            continue
        reduce = producers.get(node.input[0])
        if reduce is None or reduce.op_type != "ReduceMax" or id(reduce) in dropped:
            continue
        cast_in = producers.get(reduce.input[0])
        if cast_in is None or cast_in.op_type != "Cast" or not _is_bool(cast_in.input[0], producers, bool_values):
            continue
        # each intermediate value read by the next node only, and none of them a graph output
        inner = [reduce.output[0], cast_in.output[0]]
        if any(len(consumers.get(v, [])) != 1 or v in graph_outputs for v in inner):
            continue
        if reduce.output[0] not in local or cast_in.output[0] not in local:  # made in an outer graph: leave it
            continue
        reduce.input[0] = cast_in.input[0]
        reduce.output[0] = node.output[0]
        dropped.update({id(cast_in), id(node)})
        count += 1
    if dropped:
        kept = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
    for node in graph.node:
        for a in node.attribute:
            if a.type == _GRAPH:
                count += _rewrite(a.g, producers, bool_values | {i.name for i in a.g.input})
    return count


def reduce_bool_any(model: Any) -> int:
    """Rewrite every Cast→ReduceMax→Cast ``any`` of a bool tensor in ``model`` (an ``onnx.ModelProto``, its
    ``If`` branches included) into one bool ``ReduceMax``. Models below opset 20 are left as they are. Returns how
    many were rewritten."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < BOOL_REDUCE_OPSET:
        return 0
    bool_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == _BOOL}
    return _rewrite(model.graph, {}, bool_inputs)
