"""Stage: ONNX export, attention kinds and host/device placement.

* ``attention="fused"`` (the default at opset 23) exports each layer's attention as one ONNX ``Attention`` node,
  inside the ``If`` branches of a gated graph too; ``"explicit"`` keeps MatMul/Softmax; both match PyTorch.
* No graph mixes a value that ONNX Runtime computes on the host (from input shapes) into device arithmetic: such a
  value would cost a host-to-device copy at every step. The check follows ONNX Runtime's CUDA placement rules (see
  ``host_to_device_values``); the graphs before this check had 1 (static) and 10 (gated, 7 routed layers) such
  values, the Memcpy counts ONNX Runtime reported for them on an H200.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from conftest import build_model
from onnx_cases import ROUTED_LAYERS, exported, random_sequences

from rtexport.errors import DataError
from rtexport.evaluation.parity import left_pad, positions
from rtexport.models.loading import wrap_model
from rtexport.onnx.export import export_onnx, load_export_info
from rtexport.onnx.runtime import OrtCausalLM

ATOL = 1e-4

# inputs that ONNX Runtime's CUDA kernels read in host memory, and ops whose outputs it leaves in host memory
HOST_INPUTS = {"Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1},
               "ConstantOfShape": {0}, "Range": {0, 1, 2}, "If": {0}, "Tile": {1}, "ReduceSum": {1},
               "ReduceMean": {1}, "ReduceMax": {1}, "Split": {1}, "TopK": {1}, "Pad": {1, 2},
               "GroupQueryAttention": {6}}  # its total_sequence_length
HOST_OUTPUTS = {"Shape", "Size"}


def cpu_only_outputs(model) -> frozenset:
    """Outputs of nodes ONNX Runtime's CUDA provider has no kernel for, which it therefore runs on the CPU: a
    ``ReduceMax`` over bools (``rtexport/onnx/bool_reduce.py``). Found by ONNX shape inference's value types."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types, bool_reduces = {}, []

    def walk(graph):
        for v in list(graph.input) + list(graph.value_info) + list(graph.output):
            types[v.name] = v.type.tensor_type.elem_type
        for n in graph.node:
            if n.op_type == "ReduceMax":
                bool_reduces.append(n)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(inferred.graph)
    return frozenset(o for n in bool_reduces if types.get(n.input[0]) == onnx.TensorProto.BOOL for o in n.output)


def host_to_device_values(graph, host_inputs=frozenset(), outer_host=frozenset(), outer_small=frozenset(),
                          cpu_outputs=frozenset()):
    """Values computed on the host that a device node reads as device data, under ONNX Runtime's CUDA placement:
    Shape/Size outputs are on the host, a node whose every input is on the host (or a small constant, or a graph
    input) runs on the host (``GetCpuPreferredNodes``), everything else runs on the device. Recurses into ``If``
    branches. Returns ``[(value, consumer op), ...]``."""
    small = set(outer_small)
    for t in graph.initializer:
        if math.prod(t.dims) <= 100:
            small.add(t.name)
    small |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    graph_inputs = {i.name for i in graph.input}
    host = set(outer_host) | {o for n in graph.node if n.op_type in HOST_OUTPUTS or cpu_outputs & set(n.output)
                              for o in n.output}
    host_nodes = set()
    for k, n in enumerate(graph.node):
        if n.op_type in HOST_OUTPUTS or n.op_type in ("Constant", "If") or cpu_outputs & set(n.output):
            continue
        declared = HOST_INPUTS.get(n.op_type, set())
        data = [(j, i) for j, i in enumerate(n.input) if i and j not in declared]
        if not any(i in host for _, i in data):
            continue
        if all(i in host or i in small or i in graph_inputs for _, i in data):
            host_nodes.add(k)
            host |= set(n.output)
    found = []
    for k, n in enumerate(graph.node):
        declared = HOST_INPUTS.get(n.op_type, set())
        for j, i in enumerate(n.input):
            if (i and k not in host_nodes and j not in declared and i in host and i not in small
                    and not cpu_outputs & set(n.output)):
                found.append((i, n.op_type))
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                found += host_to_device_values(a.g, host_inputs, frozenset(host | (host_inputs & graph_inputs)),
                                               frozenset(small), cpu_outputs)
    return found


def all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def load(case_or_path):
    path = case_or_path.onnx_dir / "model.onnx" if hasattr(case_or_path, "onnx_dir") else case_or_path
    return onnx.load(str(path), load_external_data=False)


@pytest.mark.parametrize("arch,mode", [("llama", "static"), ("qwen2", "static"), ("llama", "gated"), ("qwen2", "gated")])
def test_default_export_has_one_attention_node_per_attention_layer(arch, mode):
    case = exported(arch, mode)
    model = load(case)
    info = load_export_info(case.onnx_dir)
    assert info["attention"] == "fused" and info["opset"] == 23
    nodes = list(all_nodes(model.graph))
    attention = [n for n in nodes if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    assert not [n for n in nodes if n.op_type == "Softmax"]
    # the rotary embedding is ONNX's own node (two per attention), and the Attention node takes the past K/V itself:
    # no reshape, transpose or concat around it
    assert len([n for n in nodes if n.op_type == "RotaryEmbedding"]) == 2 * len(attention)
    assert not [n for n in nodes if n.op_type in ("Transpose", "Neg")]
    # (a gated graph's prefill branch slices and gathers its routers' inputs and decisions; its decode branch has
    # none of that)
    decode = next((a.g for n in model.graph.node if n.op_type == "If" for a in n.attribute if a.name == "else_branch"),
                  model.graph)
    assert not [n for n in all_nodes(decode) if n.op_type in ("Reshape", "Concat")]
    assert all(len(n.input) >= 6 and n.input[4].startswith("past_key_values.") for n in attention)
    # grouped-query heads go in as they are (4 query heads on 2 KV heads): no Expand repeats the cache
    producers = {o: n for n in nodes for o in n.output}

    def reads_cache(value, depth=0):
        p = producers.get(value)
        if value.startswith("past_key_values.") or depth > 6:
            return value.startswith("past_key_values.")
        return p is not None and p.op_type != "Shape" and any(reads_cache(i, depth + 1) for i in p.input[:1] if i)

    assert not [n.name for n in nodes if n.op_type == "Expand" and reads_cache(n.input[0])]
    if mode == "gated":
        # the decoder sits in both branches of the prefill If: each attention twice, none in the main graph
        assert len(attention) == 2 * len(info["spec"]["attention_layers"])
        assert not [n for n in model.graph.node if n.op_type == "Attention"]
    else:
        assert len(attention) == len(info["spec"]["attention_layers"])


@pytest.mark.parametrize("arch,mode", [("llama", "static"), ("llama", "gated"), ("qwen2", "gated")])
def test_no_host_value_feeds_device_arithmetic(arch, mode):
    case = exported(arch, mode)
    model = load(case)
    host_inputs = frozenset(i.name for i in model.graph.input if i.name.startswith("run_layer."))
    found = host_to_device_values(model.graph, host_inputs, cpu_outputs=cpu_only_outputs(model))
    assert found == []
    if mode == "gated":
        # run_layer.{i} is read as an If condition only, and at decode only: at prefill the routers read which
        # sequences may run a layer from routing_decisions, one (B, R) input copied to the device once (a flag
        # and'ed with each router's decisions was one host-to-device copy and one kernel per routed layer)
        for n in model.graph.node:
            if n.op_type == "If":
                branches = {a.name: a.g for a in n.attribute}
                prefill, decode = branches["then_branch"], branches["else_branch"]
                readers = [(m.op_type, j) for m in all_nodes(decode) for j, i in enumerate(m.input)
                           if i.startswith("run_layer.")]
                assert readers == [("If", 0)] * len(ROUTED_LAYERS)
                assert not [m for m in all_nodes(prefill) if any(i.startswith("run_layer.") for i in m.input)]
    if mode == "gated":
        ifs = [n for n in model.graph.node if n.op_type == "If"]
        assert len(ifs) == 1
        # the prefill If's condition comes from input shapes only (host-side), never from device data
        producers = {o: n for n in model.graph.node for o in n.output}
        for n in ifs:
            stack, seen = [n.input[0]], set()
            while stack:
                v = stack.pop()
                if v in seen or v not in producers:
                    continue
                seen.add(v)
                p = producers[v]
                assert p.op_type not in ("MatMul", "Sigmoid", "Gather") or p.op_type == "Shape", p.op_type
                if p.op_type != "Shape":
                    stack += [i for i in p.input if i]


def test_the_check_sees_host_values_in_device_arithmetic():
    """The placement check is not vacuous: a device Range plus a shape-derived offset is flagged."""
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "one"], ["n"], axis=0),
         helper.make_node("Range", ["zero", "n", "one"], ["r"]),
         helper.make_node("Add", ["r", "n"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["b"])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1])],
    )
    assert host_to_device_values(g) == [("n", "Add")]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_explicit_and_fused_agree_with_torch(arch, tmp_path):
    """A 2-layer model exported both ways: padded prefill and a step through the cache, against PyTorch."""
    model = build_model(arch, num_hidden_layers=2, seed=6)
    loaded = wrap_model(model)
    paths = {kind: export_onnx(loaded, tmp_path / kind, mode="static", attention=kind) for kind in ("explicit", "fused")}
    assert not [n for n in load(paths["explicit"]).graph.node if n.op_type == "Attention"]
    assert load_export_info(tmp_path / "explicit")["attention"] == "explicit"
    batch = left_pad(random_sequences(3, seed=17, lo=3, hi=9))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    more = torch.randint(0, 256, (3, 2), generator=torch.Generator().manual_seed(2))
    full = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        ref_full = model(input_ids=torch.cat([ids, more], 1), attention_mask=full, position_ids=positions(full)).logits
    for kind, path in paths.items():
        lm = OrtCausalLM(path)
        step = lm.forward(ids.numpy(), mask.numpy())
        assert float((torch.as_tensor(step.logits) - ref).abs()[mask > 0].max()) <= ATOL, kind
        out = lm.forward(more.numpy(), full.numpy(), cache=step.cache)
        assert float((torch.as_tensor(out.logits) - ref_full[:, -2:]).abs().max()) <= ATOL, kind


def test_fused_float16_runs_and_stays_close(tmp_path):
    model = build_model("llama", num_hidden_layers=2, seed=3)
    path = export_onnx(wrap_model(model), tmp_path / "fp16", mode="static", dtype="float16")
    assert len([n for n in load(path).graph.node if n.op_type == "Attention"]) == 2
    batch = left_pad(random_sequences(2, seed=4))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    out = OrtCausalLM(path).forward(ids.numpy(), mask.numpy())
    assert out.logits.dtype == np.float16 and np.isfinite(out.logits).all()
    assert float((torch.as_tensor(out.logits).float() - ref).abs()[mask > 0].max()) <= 0.02 * float(ref.abs().max())


def test_attention_kind_and_opset_checked(tmp_path):
    loaded = wrap_model(build_model("llama", num_hidden_layers=1))
    with pytest.raises(DataError, match="opset 23"):
        export_onnx(loaded, tmp_path / "a", attention="fused", opset=18)
    with pytest.raises(DataError, match="attention"):
        export_onnx(loaded, tmp_path / "a", attention="flash")
    assert not (tmp_path / "a").exists()


def test_gated_logical_prefill_select_matches_the_cond_graph(tmp_path):
    """The fallback for exporters that cannot trace the nested cond (torch < 2.13) computes the same thing."""
    from onnx_cases import randomise_routers

    from rtexport.routing import RoutedModel

    model = build_model("llama", num_hidden_layers=3, seed=8)
    loaded = wrap_model(model)
    routed = RoutedModel.from_model(model, layers=[1, 2])
    randomise_routers(routed, seed=3)
    try:
        paths = {sel: export_onnx(loaded, tmp_path / sel, mode="gated", routed=routed, prefill_select=sel)
                 for sel in ("cond", "logical")}
    finally:
        routed.unwrap()
    assert load_export_info(tmp_path / "logical")["prefill_select"] == "logical"
    count = {sel: sum(n.op_type == "If" for n in all_nodes(load(p).graph)) for sel, p in paths.items()}
    assert count == {"cond": 1 + 2 * 2, "logical": 2}
    batch = left_pad(random_sequences(3, seed=21, lo=3, hi=9))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    outs = {}
    for sel, path in paths.items():
        lm = OrtCausalLM(path)
        step = lm.forward(ids, mask)
        token = step.logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        full = np.concatenate([mask, np.ones((3, 1), dtype=mask.dtype)], axis=1)
        outs[sel] = (step.logits, lm.forward(token, full, cache=step.cache).logits)
    for a, b in zip(outs["cond"], outs["logical"]):
        assert np.abs(a - b)[..., :].max() <= 1e-5
