"""Whether a node inside an ONNX ``If`` costs ONNX Runtime's CUDA EP more than in the main graph, while the GPU is
busy.

The question came from ``ort_gated_layouts.py``'s first run, where a gated graph's per-layer ``If``\\ s seemed to
cost more as the batch grew (8% at batch 1, 15% at batch 8): that run's routers skipped no layer at batch 8, so its
gated rows did more work (BENCHMARKS.md, session 7). The answer here is no: 0.1-6 µs per ``If`` and step.

This script times ``--steps`` steps, each a large MatMul that keeps the GPU busy followed by one small
decode-shaped node X (``--op``: Neg, Where, RMSNormalization, RotaryEmbedding, Attention with a past, a small
MatMul; ``AttentionKV``, an Attention whose presents leave the ``If`` and the graph as a gated graph's do, was
added after the recorded runs and has not been measured), in three placements:

* ``main``: X in the main graph;
* ``if``: X inside an ``If`` on a host-side condition (the gated decode step's layout);
* ``main_then_if``: X in the main graph, then an ``If`` holding one Neg: whether a node's leftovers are settled
  by the next ``If``, whatever that ``If`` holds.

The time per step above ``main`` is what the placement costs the GPU.

    PYTHONPATH=/tmp/parts-unpacked python3 examples/benchmarks/ort_if_ops.py --out $OUT/if_ops.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_if_cost import median_run_us

F16 = TensorProto.FLOAT16
OPS = ("Neg", "Where", "RMSNormalization", "RotaryEmbedding", "Attention", "MatMul", "AttentionKV")
PLACEMENTS = ("main", "if", "main_then_if")
# the skip branch run (condition false): it returns the step's input as an Identity (as a gated graph's skip
# branch does) or through one Max(x, x) node
SKIP_PLACEMENTS = ("else_identity", "else_max")


class Shape:
    def __init__(self, batch: int, past: int, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                 busy_rows: int = 2048):
        self.batch, self.past, self.heads, self.kv_heads, self.head_dim = batch, past, heads, kv_heads, head_dim
        self.hidden = heads * head_dim
        self.busy_rows = busy_rows


def _inputs(s: Shape) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    kv = s.kv_heads * s.head_dim
    return {
        "big": rng.standard_normal((s.busy_rows, s.hidden)).astype(np.float16) * 0.01,
        "q": rng.standard_normal((s.batch, 1, s.hidden)).astype(np.float16),
        "q2": rng.standard_normal((s.batch, 1, s.hidden)).astype(np.float16),
        "k": rng.standard_normal((s.batch, 1, kv)).astype(np.float16),
        "v": rng.standard_normal((s.batch, 1, kv)).astype(np.float16),
        "past_k": rng.standard_normal((s.batch, s.kv_heads, s.past, s.head_dim)).astype(np.float16),
        "past_v": rng.standard_normal((s.batch, s.kv_heads, s.past, s.head_dim)).astype(np.float16),
        "mask": np.zeros((s.batch, 1, 1, s.past + 1), dtype=np.float16),
        "cos": np.ones((s.batch, 1, s.head_dim // 2), dtype=np.float16),
        "sin": np.zeros((s.batch, 1, s.head_dim // 2), dtype=np.float16),
        "sel": np.ones((s.batch, 1, 1), dtype=np.bool_),
        "c": np.array(True),
    }


def _op_node(op: str, s: Shape, x: str, y: str) -> onnx.NodeProto:
    """One X node from ``x`` (B, 1, hidden) to ``y`` (same shape)."""
    if op == "Neg":
        return helper.make_node("Neg", [x], [y])
    if op == "Where":
        return helper.make_node("Where", ["sel", x, "q2"], [y])
    if op == "RMSNormalization":
        return helper.make_node("RMSNormalization", [x, "scale"], [y], axis=-1, epsilon=1e-6)
    if op == "RotaryEmbedding":
        return helper.make_node("RotaryEmbedding", [x, "cos", "sin"], [y], num_heads=s.heads)
    if op in ("Attention", "AttentionKV"):  # AttentionKV: the presents leave the If and the graph, as a gated graph's
        return helper.make_node("Attention", [x, "k", "v", "mask", "past_k", "past_v"], [y, f"{y}_pk", f"{y}_pv"],
                                q_num_heads=s.heads, kv_num_heads=s.kv_heads, scale=s.head_dim ** -0.5)
    if op == "MatMul":
        return helper.make_node("MatMul", [x, "w_small"], [y])
    raise ValueError(op)


def _branch(nodes: list[onnx.NodeProto], out: str, name: str, presents: bool = False) -> onnx.GraphProto:
    outs = [out, f"{out}_pk", f"{out}_pv"] if presents else [out]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, F16, None) for o in outs])


def build(op: str, placement: str, s: Shape, steps: int) -> bytes:
    nodes = []
    big, x = "big", "q"
    kv = op == "AttentionKV"
    presents: list[str] = []
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [big, "w_big"], [f"big{i}"]))
        big = f"big{i}"
        y = f"x{i}"
        if placement == "main":
            nodes.append(_op_node(op, s, x, y))
            presents += [f"{y}_pk", f"{y}_pv"] if kv else []
        elif placement == "if":
            then = _branch([_op_node(op, s, x, f"t{i}")], f"t{i}", f"then{i}", kv)
            els = _branch([helper.make_node("Identity", [a], [b]) for a, b in
                           zip([x, "past_k", "past_v"][:3 if kv else 1], [f"e{i}", f"e{i}_pk", f"e{i}_pv"])],
                          f"e{i}", f"else{i}", kv)
            nodes.append(helper.make_node("If", ["c"], [y, f"{y}_pk", f"{y}_pv"] if kv else [y],
                                          then_branch=then, else_branch=els))
            presents += [f"{y}_pk", f"{y}_pv"] if kv else []
        elif placement in SKIP_PLACEMENTS:
            then = _branch([_op_node(op, s, x, f"t{i}")], f"t{i}", f"then{i}")
            keep = (helper.make_node("Identity", [x], [f"e{i}"]) if placement == "else_identity"
                    else helper.make_node("Max", [x, x], [f"e{i}"]))
            nodes.append(helper.make_node("If", ["c"], [y], then_branch=then,
                                          else_branch=_branch([keep], f"e{i}", f"else{i}")))
        else:  # main_then_if
            nodes.append(_op_node(op, s, x, f"m{i}"))
            presents += [f"m{i}_pk", f"m{i}_pv"] if kv else []
            then = _branch([helper.make_node("Neg", [f"m{i}"], [f"t{i}"])], f"t{i}", f"then{i}")
            els = _branch([helper.make_node("Identity", [f"m{i}"], [f"e{i}"])], f"e{i}", f"else{i}")
            nodes.append(helper.make_node("If", ["c"], [y], then_branch=then, else_branch=els))
        x = y
    arrays = _inputs(s)
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.BOOL if a.dtype == np.bool_ else F16, a.shape)
                    for n, a in arrays.items()]
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((s.hidden, s.hidden)) * 0.01).astype(np.float16), "w_big"),
             numpy_helper.from_array((rng.standard_normal((s.hidden, s.hidden)) * 0.01).astype(np.float16), "w_small"),
             numpy_helper.from_array(np.ones(s.hidden, dtype=np.float16), "scale")]
    graph = helper.make_graph(nodes, "g", graph_inputs,
                              [helper.make_tensor_value_info(n, F16, None) for n in [x, big, *presents]],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model.SerializeToString()


def time_model(model: bytes, s: Shape, runs: int, provider: str, condition: bool = True) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=[provider, "CPUExecutionProvider"])
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    used = {i.name for i in session.get_inputs()}
    binding = session.io_binding()
    for name, array in _inputs(s).items():
        array = np.array(condition) if name == "c" else array
        if name in used:
            place = "cpu" if name == "c" else device
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, place, 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, device, 0)
    return median_run_us(session, binding, warmup=10, runs=runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--past", type=int, default=1024)
    ap.add_argument("--busy-rows", type=int, default=2048, help="rows of the busy MatMul (x 4096 x 4096)")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--skip-branch", action="store_true",
                    help="also time the If's skip branch run (Identity, Max), against Neg in the main graph")
    ap.add_argument("--provider", default="CUDAExecutionProvider")
    ap.add_argument("--out", default="if_ops.json")
    args = ap.parse_args()
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # the unused initializers of some variants are not news
    s = Shape(args.batch, args.past, busy_rows=args.busy_rows)
    result = {"ort": ort.__version__, "provider": args.provider, "steps": args.steps, "batch": args.batch,
              "past": args.past, "busy_rows": args.busy_rows, "us_per_run": {}, "extra_us_per_step": {}}
    for op in args.ops.split(","):
        times = {p: time_model(build(op, p, s, args.steps), s, args.runs, args.provider) for p in PLACEMENTS}
        result["us_per_run"][op] = {p: round(t, 1) for p, t in times.items()}
        result["extra_us_per_step"][op] = {p: round((times[p] - times["main"]) / args.steps, 2)
                                           for p in PLACEMENTS[1:]}
        print(op, result["us_per_run"][op], result["extra_us_per_step"][op], flush=True)
    if args.skip_branch:
        times = {p: time_model(build("Neg", p, s, args.steps), s, args.runs, args.provider,
                               condition=p == "main") for p in ("main", *SKIP_PLACEMENTS)}
        result["skip_branch_us_per_run"] = {p: round(t, 1) for p, t in times.items()}
        result["skip_branch_extra_us_per_step"] = {p: round((times[p] - times["main"]) / args.steps, 2)
                                                   for p in SKIP_PLACEMENTS}
        print("skip branch", result["skip_branch_us_per_run"], result["skip_branch_extra_us_per_step"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
