"""Where a gated graph's decode step and prefill lose time against the static graph: the same step in other
layouts, timed side by side on ONNX Runtime with the static graph, by prompt length; optionally with each prefill's
device timeline (``gpu_timeline.py``) and its host time split between ONNX Runtime and the runner's Python.

A gated graph (``export_onnx(mode="gated")``) holds its decoder twice inside one ``If`` on the prefill flag; the
decode branch runs one ``If`` per routed layer on the host input ``run_layer.{i}``. From that graph this script
derives, by rewriting the ONNX file (no re-export; the weights file is shared):

* ``flat``: the decode branch lifted into the main graph (no prefill ``If``), the per-layer ``If``\\ s kept: what
  the nesting costs (the export's own ``decode.onnx`` since this measurement: ``rtexport/onnx/phase_graphs.py``);
* ``inlined``: ``flat`` with every per-layer ``If`` replaced by the branch the plan takes (taken for a kept layer,
  the pass-through for a skipped one): the gated decode step's nodes without any ``If``, i.e. what the ``If``\\ s
  cost. It still has the gated graph's per-sequence ``Where`` and split residual adds, so ``inlined`` against the
  static graph is what the rest of the gated layout costs.
* ``flat_max``: ``flat`` whose skip branches return each value through ``Max(v, v)`` instead of an ``Identity`` of
  an outer value: what that ``Identity`` costs;
* ``part:A-B`` (with ``--all-run``): ``flat`` with only the taken branch's nodes A..B-1 inside each ``If`` and the
  others moved out: which node kinds cost more inside an ``If``.
* ``prefill_inlined``: the export's ``prefill.onnx`` with every per-layer ``If`` replaced by the branch the plan
  takes. Its routers still score every routed layer (the decisions output), but no condition goes to the host: what
  the prefill's device-to-host copy per routed layer costs, apart from the routers' own kernels. (Here and in
  ``prefill_masked`` the unused conditions are dropped since session 10: their bool ``ReduceMax``
  (``rtexport/onnx/bool_reduce.py``) ran on the CPU after a host copy, and the layouts were not copy-free.)
* ``prefill_masked``: the export's ``prefill.onnx`` with every per-layer ``If`` replaced by its taken branch: every
  routed block runs for the whole batch and each sequence keeps its output only where its router says run (the
  taken branch's ``Where``). No condition goes to the host and nothing depends on knowing the plan: the exact gated
  prefill (same logits, same decisions; a layer no sequence runs returns a cache that the runner drops), paying the
  skipped blocks' compute instead of the host copies.
* ``prefill_kv_early``: the export's ``prefill.onnx`` with each routed layer's K and V projections moved before the
  wait for its condition, so the device computes them while the host enters the ``If``; a skipped layer computes
  them for nothing.
* ``prefill_qkv_early``: the same with the Q, K and V projections and their rotary embeddings;
  ``prefill_qkv_run`` only for the layers the plan runs (an exact prior of which layers run).
* ``prefill_masked_run``: ``prefill_masked`` for the layers the plan runs (no ``If``, no host copy: each runs for
  the whole batch and is masked per sequence, exact whatever the routers decide), an ``If`` for the others.

(Session 10's run 1 also timed ``prefill_no_sigmoid``, ``prefill_lean`` and ``prefill_inlined_lean``, rewrites of
session 9's routers, with this script as of commit 1e91894. Exports have compared logits and read no per-layer flag
at prefill since, so on them those rewrites changed nothing, and they were removed.)

The decode layouts compute the decode step only (a prefill through them would use the held decisions); the
benchmark prefills with the gated graph and continues with each layout on that cache. Their greedy tokens must equal
the gated graph's. A prefill layout is timed on prefills only; its first greedy token and its decisions must equal
the gated graph's.

    # here: a tiny check on the CPU (derive, run, compare)
    python examples/benchmarks/ort_gated_layouts.py selfcheck
    # on the GPU machine, on graphs from `ort_gpu_speed.py export --modes static,gated` (weights written there)
    python3 examples/benchmarks/ort_gated_layouts.py bench --graphs graphs-8b --batches 1,8 --out $OUT
    # prefills only, by prompt length, with the runner's prefill.onnx, another prefill graph of the gated folder,
    # and each prefill's device timeline and host split
    python3 examples/benchmarks/ort_gated_layouts.py bench --graphs graphs-8b --prompt 128,1024 --prefill-only \
        --prefill-phase --layouts prefill_inlined --prefill-graph old=prefill_old.onnx --timeline --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper  # noqa: E402

LAYOUTS = ("flat", "inlined", "flat_max")  # and "part:A-B" (see derive)
PREFILL_LAYOUTS = ("prefill_inlined", "prefill_masked", "prefill_kv_early", "prefill_qkv_early", "prefill_qkv_run",
                   "prefill_masked_run")


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def _route_layer(node: onnx.NodeProto) -> int | None:
    """The layer of a per-layer ``If`` (its condition is ``run_layer.{i}``), else None."""
    cond = node.input[0]
    return int(cond.split(".")[1]) if node.op_type == "If" and cond.startswith("run_layer.") else None


def _inline(node: onnx.NodeProto, branch: onnx.GraphProto) -> list[onnx.NodeProto]:
    """``branch``'s nodes, then one Identity per output renaming it to the ``If`` node's output."""
    return [*branch.node, *(helper.make_node("Identity", [b.name], [o], name=f"{o}_inlined")
                            for b, o in zip(branch.output, node.output))]


def _part_if(node: onnx.NodeProto, start: int, end: int) -> list[onnx.NodeProto]:
    """The per-layer ``If`` ``node`` with only its taken branch's nodes ``[start, end)`` left inside; the taken
    branch's other nodes move before and after it, into the enclosing graph. For timing where a node's cost comes
    from: both branches hold those nodes, so the result computes the gated graph's step only while every routed
    layer runs."""
    taken = _branch(node, "then_branch")
    body = list(taken.node)
    before, inside, after = body[:start], body[start:end], body[end:]
    made = {o for n in inside for o in n.output}
    wanted = [o for o in dict.fromkeys([*(i for n in after for i in n.input), *(o.name for o in taken.output)])
              if o in made]
    dtype = taken.output[0].type.tensor_type.elem_type  # every value handed over is an activation of this type

    def copy_of_inside(suffix: str) -> onnx.GraphProto:
        # both branches hold the same nodes (so their outputs' shapes agree): the timing needs the taken one only
        names = {o: f"{o}__{suffix}" for o in made}
        body = []
        for n in inside:
            m = copy.deepcopy(n)
            m.name = f"{n.name}__{suffix}"
            m.input[:] = [names.get(i, i) for i in m.input]
            m.output[:] = [names[o] for o in m.output]
            body.append(m)
        return helper.make_graph(body, f"{node.name}_part_{suffix}", [],
                                 [helper.make_tensor_value_info(names[o], dtype, None) for o in wanted])

    then, other = copy_of_inside("then"), copy_of_inside("else")
    part = helper.make_node("If", [node.input[0]], wanted, name=f"{node.name}_part", then_branch=then,
                            else_branch=other)
    renames = [helper.make_node("Identity", [b.name], [o], name=f"{o}_part_out")
               for b, o in zip(taken.output, node.output)]
    return [*before, part, *after, *renames]


def _skip_by_max(node: onnx.NodeProto) -> onnx.NodeProto:
    """The per-layer ``If`` ``node`` whose skip branch returns each value through ``Max(v, v)`` (a kernel that
    writes the If's output) instead of an ``Identity`` of a value from outside the branch."""
    node = copy.deepcopy(node)
    for attr in node.attribute:
        if attr.name == "else_branch":
            for n in attr.g.node:
                if n.op_type == "Identity":
                    n.op_type = "Max"
                    n.input.append(n.input[0])
    return node


def derive(model: onnx.ModelProto, layout: str, skip: set[int]) -> onnx.ModelProto:
    """The decode step of the gated graph ``model`` in ``layout``: "flat" (the export's own ``decode.onnx``:
    ``rtexport.onnx.phase_graphs.lift_phase``), "inlined" (``skip``: the routed layers no sequence runs), "flat_max"
    (flat, the skip branches returning through Max) or "part:A-B" (flat, with only the taken branch's nodes A..B-1
    inside each per-layer ``If``; valid while every routed layer runs). The result has the gated graph's inputs and
    outputs and shares its weights."""
    from rtexport.onnx.phase_graphs import lift_phase

    part = None
    if layout == "prefill_inlined":
        return _without_dead_nodes(_prefill_inlined(lift_phase(model, "prefill"), skip))
    if layout == "prefill_masked":
        return _without_dead_nodes(_prefill_inlined(lift_phase(model, "prefill"), set()))
    routed = {int(i.name.split(".")[1]) for i in model.graph.input if i.name.startswith("run_layer.")}
    if layout == "prefill_masked_run":
        return _without_dead_nodes(_prefill_inlined(lift_phase(model, "prefill"), set(), only=routed - skip))
    if layout == "prefill_kv_early":
        return _kv_early(lift_phase(model, "prefill"))
    if layout in ("prefill_qkv_early", "prefill_qkv_run"):
        return _early(lift_phase(model, "prefill"), routed - skip if layout == "prefill_qkv_run" else None,
                      (".q_proj.weight.T", ".k_proj.weight.T", ".v_proj.weight.T"), rotary=True)
    if layout.startswith("part:"):
        part = tuple(int(v) for v in layout[5:].split("-"))
    elif layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS + PREFILL_LAYOUTS} or part:A-B, got {layout!r}")
    derived = lift_phase(model, "decode")
    nodes: list[onnx.NodeProto] = []
    for node in derived.graph.node:
        layer = _route_layer(node)
        if layout == "inlined" and layer is not None:
            nodes += _inline(node, _branch(node, "else_branch" if layer in skip else "then_branch"))
        elif part is not None and layer is not None:
            nodes += _part_if(node, *part)
        elif layout == "flat_max" and layer is not None:
            nodes.append(_skip_by_max(node))
        else:
            nodes.append(node)
    del derived.graph.node[:]
    derived.graph.node.extend(nodes)
    return derived


def _prefill_if_layers(prefill: onnx.ModelProto) -> dict[str, int]:
    """Node name -> routed layer for each per-layer ``If`` of a lifted prefill graph: the layer whose
    projections its taken branch reads (a ``prefill_always`` layer has no ``If`` there)."""
    layer_of = {}
    for node in prefill.graph.node:
        if node.op_type == "If":
            names = {w for n in _branch(node, "then_branch").node for w in n.input if w.endswith("_proj.weight.T")}
            layers = {int(w.split(".")[1]) for w in names if w.startswith("layers.")}
            if len(layers) != 1:
                raise SystemExit(f"{node.name}: not one routed layer's If (its branch reads layers {sorted(layers)})")
            layer_of[node.name] = layers.pop()
    return layer_of


def _prefill_inlined(prefill: onnx.ModelProto, skip: set[int], only: set[int] | None = None) -> onnx.ModelProto:
    """``prefill`` (a lifted prefill graph) with each per-layer ``If`` (of the layers in ``only``; None: all)
    replaced by the branch the plan takes (``skip``: the routed layers the plan skips)."""
    layer_of = _prefill_if_layers(prefill)
    nodes: list[onnx.NodeProto] = []
    for node in prefill.graph.node:
        if node.op_type == "If" and (only is None or layer_of[node.name] in only):
            nodes += _inline(node, _branch(node, "else_branch" if layer_of[node.name] in skip else "then_branch"))
        else:
            nodes.append(node)
    del prefill.graph.node[:]
    prefill.graph.node.extend(nodes)
    return prefill


def _without_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the main-graph nodes no output depends on (the inlined layouts' unused conditions)."""
    from rtexport.onnx.phase_graphs import node_reads

    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            node_reads(node, needed)  # what it and its branches read is needed too
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return model


def _kv_early(prefill: onnx.ModelProto) -> onnx.ModelProto:
    """Each per-layer ``If``'s K and V projections moved out of its taken branch, to just before the condition's
    reduction (after the host copy is queued, before the host waits for it): the device computes them while the
    host wakes and enters the ``If``. Skipped layers compute them for nothing."""
    return _early(prefill, None, (".k_proj.weight.T", ".v_proj.weight.T"), rotary=False)


def _early(prefill: onnx.ModelProto, layers: set[int] | None, projections: tuple[str, ...],
           rotary: bool) -> onnx.ModelProto:
    """The projections (MatMuls whose weight name ends with one of ``projections``) of each per-layer ``If`` in
    ``layers`` (None: every routed layer), with the rotary embeddings applied to them if ``rotary``, moved out of
    its taken branch to just before the condition's reduction: queued after the condition's host copy, so the
    device computes them while the host waits for the copy and enters the ``If``."""
    graph = prefill.graph
    layer_of = _prefill_if_layers(prefill)
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "If" or (layers is not None and layer_of[node.name] not in layers):
            nodes.append(node)
            continue
        taken = _branch(node, "then_branch")
        early = [n for n in taken.node if n.op_type == "MatMul" and n.input[1].endswith(projections)]
        if len(early) != len(projections):
            raise SystemExit(f"{node.name}: not every projection of {projections} in its taken branch")
        if rotary:
            made = {o for n in early for o in n.output}
            early += [n for n in taken.node if n.op_type == "RotaryEmbedding" and n.input[0] in made]
        rest = [n for n in taken.node if all(n is not e for e in early)]
        del taken.node[:]
        taken.node.extend(rest)
        # before the reduction that reads the copied condition (the last node before this If)
        reduce_at = max(i for i, n in enumerate(nodes) if node.input[0] in n.output)
        nodes[reduce_at:reduce_at] = early
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return prefill


def write_layouts(gated_dir: Path, skip: set[int], layouts=LAYOUTS) -> dict[str, Path]:
    """``gated_dir/decode_{layout}.onnx`` for each layout, next to (and reading) the gated graph's weights file."""
    model = onnx.load(gated_dir / "model.onnx", load_external_data=False)
    paths = {}
    for layout in layouts:
        name = layout if layout in PREFILL_LAYOUTS else f"decode_{layout.replace(':', '_')}"
        path = gated_dir / f"{name}.onnx"
        onnx.save(derive(model, layout, skip), path)
        paths[layout] = path
    return paths


def decode_after(prefill_lm, lm, ids: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
    """ms per token over ``steps`` greedy decode steps through ``lm`` after ``prefill_lm``'s prefill of ``ids``; and
    the tokens."""
    mask = np.ones_like(ids)
    step = prefill_lm.forward(ids, mask, greedy=True)
    tokens = [step.next_token]
    start = time.perf_counter()
    for _ in range(steps):
        mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=mask.dtype)], axis=1)
        step = lm.forward(step.next_token[:, None], mask, cache=step.cache, greedy=True)
        tokens.append(step.next_token)
    return 1000 * (time.perf_counter() - start) / steps, np.stack(tokens, axis=1)


def prefill_agrees(gated, lm, ids: np.ndarray) -> dict:
    """A prefill layout against the gated graph on ``ids``: whether its first greedy token and decisions are the
    same, and the largest absolute difference of their last position's logits."""
    a = gated.forward(ids, np.ones_like(ids), last_only=True)
    b = lm.forward(ids, np.ones_like(ids), last_only=True)
    same = (a.logits.argmax(-1) == b.logits.argmax(-1)).all() and (a.cache.decisions == b.cache.decisions).all()
    diff = np.abs(a.logits.astype(np.float32) - b.logits.astype(np.float32)).max()
    return {"same_token_and_decisions": bool(same), "last_logits_max_abs_diff": float(diff)}


class _TimedSession:
    """A session whose runs (``run_with_iobinding``, ``run``) are timed (the rest passes through): what ONNX Runtime
    itself takes of a runner's step."""

    def __init__(self, session):
        self._session, self.seconds = session, []

    def _timed(self, method, *args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        return result

    def run_with_iobinding(self, *args, **kwargs):
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)

    def run(self, *args, **kwargs):  # a runner without IO binding (the CPU's default)
        return self._timed(self._session.run, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def host_breakdown(lm, ids: np.ndarray, calls: int) -> dict:
    """Medians over ``calls`` prefills of ``ids`` through ``lm``: the whole ``forward`` and, of it, ONNX Runtime's
    run (``run_with_iobinding``; the rest is the runner's binding and bookkeeping in Python)."""
    from rtexport.bench_run import ort_prefill_once

    timed = _TimedSession(lm.prefill_session)
    lm.prefill_session = timed
    try:
        forward = [ort_prefill_once(lm, ids) for _ in range(calls)]
    finally:
        lm.prefill_session = timed._session
    run = [1000 * s for s in timed.seconds]
    return {"forward_ms": round(statistics.median(forward), 3), "session_run_ms": round(statistics.median(run), 3),
            "runner_ms": round(statistics.median(f - r for f, r in zip(forward, run)), 3)}


def host_profile(lm, ids: np.ndarray, calls: int, top: int = 15) -> list[str]:
    """The runner's functions that take the most host time over ``calls`` prefills (cProfile, by own time)."""
    import cProfile
    import io
    import pstats

    from rtexport.bench_run import ort_prefill_once

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        ort_prefill_once(lm, ids)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def selfcheck(args) -> None:
    """A tiny random Llama with routers that skip some layers: each layout's greedy tokens equal the gated graph's."""
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from conftest import build_model, build_tokenizer

    from ort_gpu_speed import routers_choosing_plan

    from rtexport.models.loading import wrap_model
    from rtexport.onnx.export import export_onnx
    from rtexport.onnx.runtime import OrtCausalLM
    from rtexport.planning import SkipPlan

    model = build_model("llama", num_hidden_layers=6)
    loaded = wrap_model(model, tokenizer=build_tokenizer(), model_id="tiny-llama")
    ids = np.random.default_rng(0).integers(0, 250, size=(1, 12), dtype=np.int64)
    # the routers skip layer 3 (flat, inlined), then run every layer (the part:A-B layouts too)
    for skip_plan, layouts in (([3], LAYOUTS + PREFILL_LAYOUTS),
                               ([], (*LAYOUTS, *PREFILL_LAYOUTS, "part:5-6", "part:0-5", "part:6-9"))):
        plan = SkipPlan(base_model="tiny-llama", fingerprint=loaded.fingerprint, num_layers=6, target="attn",
                        method="manual", skip=skip_plan, candidates=[2, 3, 4])
        routed, _ = routers_choosing_plan(loaded, plan, torch.from_numpy(ids))
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) / "gated"
            export_onnx(loaded, folder, mode="gated", routed=routed)
            routed.unwrap()
            gated = OrtCausalLM(folder, providers=["CPUExecutionProvider"])
            decisions = gated.forward(ids, np.ones_like(ids)).cache.decisions
            skip = {i for r, i in enumerate(gated.routed_layers) if not decisions[:, r].any()}
            print("routers skip", sorted(skip))
            if skip != set(plan.skip):
                raise SystemExit(f"the routers skip {sorted(skip)}, not the plan's {plan.skip}")
            paths = write_layouts(folder, skip, layouts)
            _, reference = decode_after(gated, gated, ids, 16)
            for layout, path in paths.items():
                if layout in PREFILL_LAYOUTS:
                    agree = prefill_agrees(gated, OrtCausalLM(path, providers=["CPUExecutionProvider"]), ids)
                    print(layout, "against the gated graph's prefill:", agree)
                    # the same kernels on the same inputs: the logits are the gated prefill's, bit for bit
                    if not agree["same_token_and_decisions"] or agree["last_logits_max_abs_diff"] != 0.0:
                        raise SystemExit(1)
                    continue
                _, tokens = decode_after(gated, OrtCausalLM(path, providers=["CPUExecutionProvider"]), ids, 16)
                ok = bool((tokens == reference).all())
                print(layout, "greedy tokens equal the gated graph's:", ok)
                if not ok:
                    raise SystemExit(1)


def bench(args) -> None:
    import onnxruntime as ort
    import torch
    from graph_weights import fill, fill_gated, graph_module_from_info
    from ort_gpu_speed import _model_and_plan, paired_ratio, routers_choosing_plan

    from rtexport.bench_run import ort_decode_once, ort_prefill_once
    from rtexport.onnx.runtime import OrtCausalLM

    graphs, out = Path(args.graphs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads((graphs / "bench.json").read_text())
    device = args.device
    loaded, plan = _model_and_plan(record["shape"], len(record["skip"]), device,
                                   torch.float16 if device == "cuda" else torch.float32)
    vocab = loaded.model.config.vocab_size
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(p) for p in str(args.prompt).split(",")]
    # each (batch, length)'s prompt is the first rows and tokens of the largest one
    longest = np.random.default_rng(0).integers(0, vocab, size=(max(batches), max(lengths)), dtype=np.int64)
    cells = [(b, t) for b in batches for t in lengths]
    # --all-run: routers that run every routed layer (the part:A-B layouts need it); the static graph, which skips
    # the plan's layers, is then not timed
    router_plan = dataclasses.replace(plan, skip=[]) if args.all_run else plan
    # set on the largest prompt (each smaller one is a part of it): set on one sequence, routers can leave a larger
    # batch's other sequences running the plan's layers (the first run's b8 rows did)
    routed, chosen = routers_choosing_plan(loaded, router_plan, torch.from_numpy(longest).to(device))
    log = {"export": record, "ort": ort.__version__, "torch": torch.__version__, "prompts": lengths,
           "new_tokens": args.new_tokens, "batches": batches, "torch_routers_skip": chosen, "all_run": args.all_run,
           "prefill_only": args.prefill_only}
    t = time.perf_counter()
    fill_gated(graphs / "gated", loaded, routed)
    routed.unwrap()
    if not args.all_run:
        fill(graphs / "static", graph_module_from_info(loaded, graphs / "static", plan=plan))
    log["fill_seconds"] = round(time.perf_counter() - t, 1)
    del loaded, routed
    if device == "cuda":
        torch.cuda.empty_cache()
    paths = write_layouts(graphs / "gated", set(router_plan.skip), [v for v in args.layouts.split(",") if v])
    # --prefill-graph NAME=FILE: another prefill graph of the gated folder (over its weights file), timed as a layout
    extra = dict(v.split("=", 1) for v in args.prefill_graph)
    paths.update({name: graphs / "gated" / file for name, file in extra.items()})
    prefills = set(PREFILL_LAYOUTS) | set(extra)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    static = None if args.all_run else OrtCausalLM(graphs / "static", providers=providers)
    gated = OrtCausalLM(graphs / "gated", providers=providers, phase_graphs=False)  # model.onnx alone
    sessions = {} if static is None else {"static": static}
    sessions["gated"] = gated
    if args.prefill_phase:  # the export's prefill.onnx, as the runner prefills on CUDA
        sessions["gated_phases"] = OrtCausalLM(graphs / "gated", providers=providers, phase_graphs=True)
    # the prefill layouts read the phase runner's weight tensors (one copy on the device for all of them)
    shared = sessions.get("gated_phases")
    shared = shared if shared is not None and shared._weights is not None else None
    layouts = {name: OrtCausalLM(path, providers=providers, share_weights_with=shared if name in prefills else None)
               for name, path in paths.items()}
    decoding = not args.prefill_only
    results: dict = {}
    for b, length in cells:
        ids = longest[:b, :length]
        cell = f"b{b}" if len(lengths) == 1 else f"b{b}_t{length}"
        decisions = gated.forward(ids, np.ones_like(ids), greedy=True).cache.decisions
        log[f"ort_gated_skips_{cell}"] = [i for r, i in enumerate(gated.routed_layers) if not decisions[:, r].any()]
        if log[f"ort_gated_skips_{cell}"] != sorted(router_plan.skip):
            print(f"{cell}: the routers skip {log[f'ort_gated_skips_{cell}']}, not the plan's {router_plan.skip}: "
                  "the gated rows run other layers than the static graph", flush=True)
        if decoding:
            _, reference = decode_after(gated, gated, ids, 32)
            log[f"greedy_32_match_gated_{cell}"] = {
                name: bool((decode_after(gated, lm, ids, 32)[1] == reference).all())
                for name, lm in layouts.items() if name not in prefills}
        log[f"prefill_against_gated_{cell}"] = {name: prefill_agrees(gated, lm, ids) for name, lm in layouts.items()
                                               if name in prefills}
        if "gated_phases" in sessions:
            log[f"prefill_against_gated_{cell}"]["gated_phases"] = prefill_agrees(gated, sessions["gated_phases"], ids)
        timed = [*sessions, *(k for k in layouts if decoding or k in prefills)]
        res = {k: {"prefill_samples": [], "decode_samples": []} for k in timed}
        for name in timed:  # warm-up
            lm = sessions.get(name) or layouts[name]
            if name in sessions or name in prefills:
                ort_prefill_once(lm, ids)
            if name in ("static", "gated") and decoding:
                ort_decode_once(lm, ids, args.new_tokens)
            elif name not in sessions and name not in prefills:
                decode_after(gated, lm, ids, args.new_tokens)
        for round_ in range(args.rounds):
            shift = round_ % len(timed)
            for key in timed[shift:] + timed[:shift]:
                lm = sessions.get(key) or layouts[key]
                if key in sessions or key in prefills:
                    res[key]["prefill_samples"] += [ort_prefill_once(lm, ids) for _ in range(args.reps)]
                if key in ("static", "gated") and decoding:
                    res[key]["decode_samples"].append(ort_decode_once(lm, ids, args.new_tokens))
                elif key not in sessions and key not in prefills:
                    res[key]["decode_samples"].append(decode_after(gated, lm, ids, args.new_tokens)[0])
            print(f"{cell} round {round_}", {k: round((v["decode_samples"] or v["prefill_samples"])[-1], 3)
                                             for k, v in res.items()}, flush=True)
        for v in res.values():
            if v["decode_samples"]:
                v["decode_ms"] = statistics.median(v["decode_samples"])
            if v["prefill_samples"]:
                v["prefill_ms"] = statistics.median(v["prefill_samples"])
        # against the static graph; with --all-run (no static graph) against the layout without any If
        ref = "static" if static is not None else "inlined"
        base = res[ref]
        res[f"ratios_to_{ref}"] = {
            k: {**({"decode": round(res[k]["decode_ms"] / base["decode_ms"], 4)}
                   if "decode_ms" in res[k] and "decode_ms" in base else {}),
                **({"prefill": round(res[k]["prefill_ms"] / base["prefill_ms"], 4)}
                   if "prefill_ms" in res[k] and "prefill_ms" in base else {})}
            for k in timed if k != ref}
        # paired (ort_gpu_speed's): each prefill sample against the reference's sample at the same place in the
        # same round
        if base["prefill_samples"]:
            res[f"paired_prefill_ratios_to_{ref}"] = {
                k: round(paired_ratio(res[k]["prefill_samples"], base["prefill_samples"]), 4)
                for k in timed if k != ref and res[k]["prefill_samples"]}
        print(cell, json.dumps(res[f"ratios_to_{ref}"]), json.dumps(res.get(f"paired_prefill_ratios_to_{ref}")),
              flush=True)
        if args.timeline:
            from gpu_timeline import profile_calls

            res["timeline"] = {k: profile_calls(lambda lm=sessions.get(k) or layouts[k]: ort_prefill_once(lm, ids),
                                                args.reps)
                               for k in timed if k in sessions or k in prefills}
            print(cell, "timeline", json.dumps(res["timeline"]), flush=True)
            res["host"] = {k: host_breakdown(sessions.get(k) or layouts[k], ids, 4 * args.reps)
                           for k in timed if k in sessions or k in prefills}
            print(cell, "host", json.dumps(res["host"]), flush=True)
            res["host_profile"] = {k: host_profile(sessions.get(k) or layouts[k], ids, 8 * args.reps)
                                   for k in ("static", "gated_phases") if k in sessions}
            for k, lines in res["host_profile"].items():
                print(cell, "host profile", k, *lines, sep="\n", flush=True)
        results[cell] = res
        (out / "ort_gated_layouts.json").write_text(json.dumps({**log, "results": results}, indent=1))
    log["results"] = results
    (out / "ort_gated_layouts.json").write_text(json.dumps(log, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    sub.add_parser("selfcheck", help="derive the layouts of a tiny gated graph on the CPU and check their tokens")
    be = sub.add_parser("bench", help="time static, gated and the derived layouts on the GPU")
    be.add_argument("--graphs", required=True, help="a folder of `ort_gpu_speed.py export` (static and gated)")
    be.add_argument("--batches", default="1")
    be.add_argument("--prompt", default="1024", help="prompt length; a comma list times each")
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--reps", type=int, default=3)
    be.add_argument("--rounds", type=int, default=6)
    be.add_argument("--layouts", default=",".join(LAYOUTS + PREFILL_LAYOUTS),
                    help="flat, inlined, flat_max, prefill_inlined and part:A-B (needs --all-run)")
    be.add_argument("--all-run", action="store_true",
                    help="routers that run every routed layer; the static graph is not timed")
    be.add_argument("--prefill-graph", action="append", default=[], metavar="NAME=FILE",
                    help="also time FILE (a prefill graph in the gated folder, over its weights) as layout NAME")
    be.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the script")
    be.add_argument("--prefill-only", action="store_true", help="time prefills only (no decode steps)")
    be.add_argument("--prefill-phase", action="store_true",
                    help="also time the export's prefill.onnx (the runner's prefill on CUDA) as gated_phases")
    be.add_argument("--timeline", action="store_true",
                    help="then profile --reps prefills of each session on the device's timeline (gpu_timeline.py)")
    be.add_argument("--out", default="layouts")
    args = ap.parse_args()
    selfcheck(args) if args.phase == "selfcheck" else bench(args)


if __name__ == "__main__":
    main()
