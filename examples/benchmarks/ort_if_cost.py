"""What one ONNX ``If`` costs ONNX Runtime per run, next to a plain node: the fixed price a gated graph pays per
routed layer and step.

Three graphs of ``--nodes`` steps on a (1, ``--width``) fp16 tensor, each step a chain of ``--branch-nodes`` ``Neg``
nodes: in the main graph; inside an ``If`` each (condition a host-side bool input, as ``run_layer.{i}``); and inside two nested ``If``\\ s (as a gated
graph's decode step: the prefill-flag ``If`` holding the block's ``If``). The input stays on the device (IO
binding); the median time per run, over ``--runs`` runs after a warm-up, is divided by ``--nodes``: the overhead
per step is what the ``If`` adds to a step's chain.

    PYTHONPATH=/tmp/parts-unpacked python3 examples/benchmarks/ort_if_cost.py --out $OUT/if_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def _chain(name: str, source: str, out: str, length: int) -> list[onnx.NodeProto]:
    """``length`` Neg nodes from ``source`` to ``out`` (a stand-in for a block's kernels)."""
    names = [source] + [f"{name}_{k}" for k in range(length - 1)] + [out]
    return [helper.make_node("Neg", [names[k]], [names[k + 1]]) for k in range(length)]


def _branch(name: str, source: str, depth: int, length: int) -> onnx.GraphProto:
    out = f"{name}_y"
    if depth == 1:
        nodes = _chain(name, source, out, length)
    else:
        nodes = [helper.make_node("If", ["c"], [out], then_branch=_branch(name + "t", source, depth - 1, length),
                                  else_branch=_branch(name + "e", source, depth - 1, length))]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT16, None)])


def build(nodes: int, width: int, depth: int, length: int = 1) -> bytes:
    """``depth`` 0: plain chains of ``length`` Neg nodes; 1: each chain in an If; 2: in two nested Ifs."""
    graph_nodes, prev = [], "x0"
    for i in range(nodes):
        out = f"x{i + 1}"
        if depth == 0:
            graph_nodes += _chain(f"m{i}", prev, out, length)
        else:
            graph_nodes.append(helper.make_node("If", ["c"], [out], then_branch=_branch(f"t{i}", prev, depth, length),
                                                else_branch=_branch(f"e{i}", prev, depth, length)))
        prev = out
    graph = helper.make_graph(graph_nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT16, [1, width]),
                                                 helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT16, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model.SerializeToString()


def time_graph(model: bytes, width: int, runs: int, provider: str) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=[provider, "CPUExecutionProvider"])
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    x = ort.OrtValue.ortvalue_from_numpy(np.ones((1, width), dtype=np.float16), device, 0)
    cond = ort.OrtValue.ortvalue_from_numpy(np.array(True))
    binding = session.io_binding()
    binding.bind_ortvalue_input("x0", x)
    binding.bind_ortvalue_input("c", cond)
    binding.bind_output(session.get_outputs()[0].name, device, 0)
    return median_run_us(session, binding, warmup=20, runs=runs)


def median_run_us(session, binding, warmup: int, runs: int) -> float:
    """The median time of one ``run_with_iobinding`` in µs, over ``runs`` runs after ``warmup``."""
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run_with_iobinding(binding)
        samples.append(1e6 * (time.perf_counter() - t))
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--branch-nodes", type=int, default=1, help="nodes inside each If branch (a chain of Neg)")
    ap.add_argument("--provider", default="CUDAExecutionProvider")
    ap.add_argument("--out", default="if_cost.json")
    args = ap.parse_args()
    import onnxruntime as ort

    result = {"ort": ort.__version__, "provider": args.provider, "nodes": args.nodes, "width": args.width}
    result["branch_nodes"] = args.branch_nodes
    for depth, label in ((0, "plain"), (1, "if"), (2, "nested_if")):
        us = time_graph(build(args.nodes, args.width, depth, args.branch_nodes), args.width, args.runs, args.provider)
        result[label] = {"us_per_run": round(us, 1), "us_per_step": round(us / args.nodes, 2)}
    result["if_overhead_us"] = round(result["if"]["us_per_step"] - result["plain"]["us_per_step"], 2)
    result["nested_if_overhead_us"] = round(result["nested_if"]["us_per_step"] - result["plain"]["us_per_step"], 2)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
