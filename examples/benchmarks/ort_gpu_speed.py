"""ONNX Runtime (CUDA EP) speed of rtexport's graphs, side by side in one run:

* gated graph (every routed attention block in an ONNX ``If``; the routers decide at prefill, the decisions are fed
  back as host inputs at decode) against the static graph with the same active layers;
* ORT CUDA EP (static graph) against PyTorch SDPA running the same pruned model (rtexport's pruned folder), with
  its decode step replayed as a CUDA graph (static cache) and run eagerly.

A random-weight Llama-shaped model (``--shape``), fp16; the deepest ``--skip`` routed layers (never the last) are
dropped. The gated graph's routers are set on the measuring machine so that, on the benchmark prompt, they choose
exactly the static plan's layers (kept: weight 0, score 0.5 → run; skipped: a weight opposite to the prompt's pooled
hidden state), so both graphs run the same layers and the difference is the ``If`` machinery.

Two phases, because the graphs should come from the exporter users get (torch >= 2.13 traces the gated graph's
nested ``If``; the GPU machine's torch 2.11 does not) and a 1B fp16 graph's weights (2.5 GB) cannot be carried:

    # here (torch 2.13): export both graphs and keep them without their weights (a few MB)
    python examples/benchmarks/ort_gpu_speed.py export --shape llama3.2-1b --skip 4 --out graphs-1b
    # on the GPU machine: build the same-shaped model there, write the graphs' weights from it, measure
    python3 examples/benchmarks/ort_gpu_speed.py bench --graphs graphs-1b --out $OUT

``--attention fused`` (the default) exports opset 23 with one ONNX ``Attention`` node per layer; ``--attention
explicit`` exports opset 18 with MatMul/Softmax attention. ``bench --placement`` also opens each graph once with
ONNX Runtime's verbose log and reports, from that log, how many Memcpy nodes the CUDA EP added and which kernel the
``Attention`` nodes chose (flash, memory-efficient, unfused) at prefill and at decode.

The sessions' samples are interleaved (one decode, ``--reps`` prefills per session and round, in an order rotated
every round). ``ratios`` divides medians; ``paired_ratios`` is the median of the ratios of the samples taken in the
same round, which the machine's drifting host load (a decode step here is partly host-bound) moves less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rtexport.bench import time_decode, time_prefill
from rtexport.bench_run import ort_decode_once, ort_prefill_once
from rtexport.models.loading import wrap_model
from rtexport.models.shapes import random_model
from rtexport.planning import SkipPlan
from rtexport.routing import RoutedModel

@contextlib.contextmanager
def _stderr_to(path: Path):
    """ONNX Runtime logs from C++ to file descriptor 2: send it to ``path`` for the duration."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def placement_report(graph_dir: Path, providers: list[str], vocab: int, prompt: int, log_path: Path) -> dict:
    """Open the graph with the verbose log, run one prefill and two decode steps; count what the log says."""
    import numpy as np
    import onnxruntime as ort

    from rtexport.onnx.runtime import OrtCausalLM

    so = ort.SessionOptions()
    so.log_severity_level = 0
    ort.set_default_logger_severity(0)
    try:
        with _stderr_to(log_path):
            lm = OrtCausalLM(graph_dir, providers=providers, session_options=so)
            ids = np.random.default_rng(0).integers(0, vocab, size=(1, prompt), dtype=np.int64)
            mask = np.ones_like(ids)
            step = lm.forward(ids, mask, last_only=True)
            for _ in range(2):
                mask = np.concatenate([mask, np.ones((1, 1), dtype=mask.dtype)], axis=1)
                step = lm.forward(step.logits[:, -1].argmax(-1)[:, None].astype(np.int64), mask, cache=step.cache,
                                  last_only=True)
            del lm
    finally:
        ort.set_default_logger_severity(2)
    text = log_path.read_text(errors="replace")
    memcpy = [int(m.group(1)) for m in re.finditer(r"(\d+) Memcpy nodes are added to the graph", text)]
    kernels: dict[str, int] = {}
    for m in re.finditer(r"(ONNX Attention: using [A-Za-z ]+?|Attention: using unified unfused path)\s*\((.*?)\)", text):
        key = f"{m.group(1).strip()} ({m.group(2)})"  # one prefill then two decode steps, in that order
        kernels[key] = kernels.get(key, 0) + 1
    cpu_nodes = len(re.findall(r"Force fallback to CPU execution for node", text))
    return {"memcpy_nodes_added": memcpy, "sum_memcpy": sum(memcpy), "attention_kernels": kernels,
            "nodes_forced_to_cpu": cpu_nodes, "log": str(log_path)}


def profile_decode(graph_dir: Path, providers: list[str], vocab: int, prompt: int, batch: int, steps: int,
                   prefix: Path) -> dict:
    """ONNX Runtime's profiler over ``steps`` decode steps after a prompt (:func:`summarize_profile`), and the
    steps' wall time per step measured around them (with the profiler's own overhead)."""
    import numpy as np
    import onnxruntime as ort

    from rtexport.onnx.runtime import OrtCausalLM

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    lm = OrtCausalLM(graph_dir, providers=providers, session_options=so)
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, prompt), dtype=np.int64)
    ms_per_step = ort_decode_once(lm, ids, steps)
    return summarize_profile(json.loads(Path(lm.session.end_profiling()).read_text()), steps) | {
        "wall_us_per_step": 1000 * ms_per_step}


def summarize_profile(events: list[dict], steps: int) -> dict:
    """Decode steps of an ONNX Runtime profile whose first ``model_run`` is the prefill: the run time per step, per op
    type the summed node time (µs per step) and node count per step (an ``If``'s time includes its branches), and per
    kind of executed ``If`` (by its number of direct child nodes) the ``If``'s own time: its duration minus its
    direct children's, i.e. what ONNX Runtime spends running a branch beyond the branch's kernels."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    decode_start = runs[1]["ts"]  # the first run is the prefill: its nodes are left out
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
             and e["ts"] >= decode_start]
    by_op: dict[str, list[float]] = {}
    for e in nodes:
        by_op.setdefault(e["args"].get("op_name", "?"), []).append(e["dur"])

    def within(inner: dict, outer: dict) -> bool:
        return inner is not outer and outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]

    ifs = [e for e in nodes if e["args"].get("op_name") == "If"]
    own: dict[int, list[float]] = {}
    for e in ifs:
        inside = [x for x in nodes if within(x, e)]
        nested = [x for x in inside if x["args"].get("op_name") == "If"]
        direct = [x for x in inside if not any(within(x, n) for n in nested)]
        own.setdefault(len(direct), []).append(e["dur"] - sum(x["dur"] for x in direct))
    return {
        "model_run_us_median": statistics.median(e["dur"] for e in runs[1:]),
        "ops": {k: {"us_per_step": round(sum(v) / steps, 1), "nodes_per_step": round(len(v) / steps, 1)}
                for k, v in sorted(by_op.items(), key=lambda kv: -sum(kv[1]))},
        "if_own_us": {f"{n} direct nodes": {"per_step": round(len(v) / steps, 2),
                                            "median_us": statistics.median(v)} for n, v in sorted(own.items())},
    }


def profile_summary_phase(args) -> None:
    """Summaries of saved ONNX Runtime profiles (``bench --profile`` writes them), as JSON."""
    out = {Path(p).name: summarize_profile(json.loads(Path(p).read_text()), args.steps) for p in args.profiles}
    text = json.dumps(out, indent=1)
    Path(args.out).write_text(text) if args.out else print(text)


# ONNX Runtime session settings a bench can compare (--ort-variants); "default" is ORT's own defaults
SESSION_VARIANTS = {
    # what rtexport.onnx.runtime.OrtCausalLM uses: ONNX Runtime's defaults
    "rtexport": None,
    # both of the two below (session 4's first runs called this "rtexport" while OrtCausalLM used it; it was
    # dropped again, its effect on the static graph's decode being -10% to +4% between runs)
    "tuned": {"enable_mem_pattern": False, "intra_op_num_threads": 1,
              "config": {"session.intra_op.allow_spinning": "0"}},
    # no memory pattern: ORT otherwise plans (and caches) a memory pattern per set of input shapes, and the KV
    # cache's length changes at every decode step, in the main graph and in every If branch run
    "no_mem_pattern": {"enable_mem_pattern": False},
    # one intra-op thread that does not spin: the CPU-side nodes are shape arithmetic
    "one_thread": {"intra_op_num_threads": 1, "config": {"session.intra_op.allow_spinning": "0"}},
}


def session_options(variant: str):
    import onnxruntime as ort

    if SESSION_VARIANTS[variant] is None:
        return None
    so = ort.SessionOptions()
    for key, value in SESSION_VARIANTS[variant].items():
        if key == "config":
            for k, v in value.items():
                so.add_session_config_entry(k, v)
        else:
            setattr(so, key, value)
    return so


def _model_and_plan(shape_name: str, skip_n: int, device: str, dtype: torch.dtype):
    model = random_model(shape_name, device=device, dtype=dtype).eval()
    loaded = wrap_model(model, None, model_id=f"random-{shape_name}")
    n = model.config.num_hidden_layers
    candidates = list(range(n // 2, n - 1))
    skip = candidates[-skip_n:]
    plan = SkipPlan(base_model=loaded.source.model_id, fingerprint=loaded.fingerprint, num_layers=n, target="attn",
                    method="manual", skip=skip, candidates=candidates)
    return loaded, plan


def export_phase(args) -> None:
    """Export the static and the gated graph of the shape (fp16) and keep them without their weights."""
    from graph_weights import strip

    from rtexport.onnx.export import export_onnx

    out = Path(args.out)
    loaded, plan = _model_and_plan(args.shape, args.skip, "cpu", torch.float16)
    model = loaded.model
    # distinct values for every vector (norm weights are all 1 in a random model; routers start at 0): the exporter
    # stores equal initializers once, and the measuring machine fills each name from its own model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dim() == 1:
                prm.add_(0.01 * torch.randn(prm.shape, generator=g).to(prm.dtype))
    routed = RoutedModel.from_model(model, layers=plan.candidates, base_model_id=loaded.source.model_id)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))
    opset = 23 if args.attention == "fused" else 18
    # "plan": the routed layers the benchmark's routers run (they are set to the plan's decisions where measured),
    # as "auto" picks them by measured execution rates; these routers are random and have none
    always = ([i for i in plan.candidates if i not in plan.skip] if args.prefill_always == "plan"
              else args.prefill_always)
    seconds = {}
    for mode in args.modes.split(","):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ortexport-") as work:  # the weights (GBs) are not kept
            folder = Path(work) / mode
            if mode == "gated":
                export_onnx(loaded, folder, mode="gated", routed=routed, dtype="float16", opset=opset,
                            attention=args.attention, prefill_select=args.prefill_select, logits=args.logits,
                            prefill_always=always)
                routed.unwrap()
            elif mode == "gqa":  # the preallocated cache written by ORT's GroupQueryAttention (selected logits)
                export_onnx(loaded, folder, mode="static", plan=plan, dtype="float16", opset=opset,
                            attention="gqa", kv_cache="preallocated", logits="selected")
            else:  # "static", or "preallocated": the static graph with a preallocated KV cache
                export_onnx(loaded, folder, mode="static", plan=plan, dtype="float16", opset=opset,
                            attention=args.attention,
                            kv_cache="preallocated" if mode == "preallocated" else "growing", logits=args.logits)
            seconds[mode] = round(time.perf_counter() - t, 1)
            strip(folder, out / mode)
        print(mode, "exported in", seconds[mode], "s", flush=True)
    record = {"shape": args.shape, "skip": plan.skip, "candidates": plan.candidates, "attention": args.attention,
              "prefill_select": args.prefill_select, "logits": args.logits, "prefill_always": always,
              "opset": opset, "torch": torch.__version__, "export_seconds": seconds}
    (out / "bench.json").write_text(json.dumps(record, indent=1))


def teacher_forced_logits(lm, prompt, tokens, prompt_mask=None):
    """``lm``'s last logits (B, steps, V) float32 at prefill and at each decode step, fed ``tokens`` after ``prompt``
    (under ``prompt_mask``: default, no padding)."""
    import numpy as np

    steps = tokens.shape[1]
    mask = np.ones_like(prompt) if prompt_mask is None else prompt_mask
    step = lm.forward(prompt, mask, last_only=True, capacity=prompt.shape[1] + steps)
    logits = [step.logits[:, -1].astype(np.float32)]
    for n in range(steps - 1):
        mask = np.concatenate([mask, np.ones((prompt.shape[0], 1), dtype=mask.dtype)], axis=1)
        step = lm.forward(tokens[:, n:n + 1], mask, cache=step.cache, last_only=True)
        logits.append(step.logits[:, -1].astype(np.float32))
    return np.stack(logits, axis=1)


def agreement(mine, ref, tokens) -> dict:
    """Teacher-forced logits ``mine`` against the reference's ``ref`` (both fed ``tokens``, the reference's greedy
    tokens): the largest difference per phase, the top-1 agreement, and the first step where ``mine``'s own greedy
    choice differs (first sequence)."""
    import numpy as np

    diff = np.abs(mine - ref).max(axis=(0, 2))
    top1 = (mine.argmax(-1) == ref.argmax(-1)).mean(axis=0)
    differs = np.nonzero(mine.argmax(-1)[0] != tokens[0])[0]
    return {"prefill_max_abs_diff": float(diff[0]), "decode_max_abs_diff": float(diff[1:].max()),
            "decode_top1_agreement": float(top1[1:].mean()), "logits_scale": float(np.abs(ref).max()),
            "first_differing_step": int(differs[0]) if differs.size else None}


def paired_ratio(samples: list[float], reference: list[float]) -> float:
    """The median of the ratios of the samples taken at the same place in the same round: the machine's load
    drifts over seconds, and both samples of a pair saw the same drift."""
    return statistics.median(a / b for a, b in zip(samples, reference))


def routers_choosing_plan(loaded, plan: SkipPlan, ids: torch.Tensor) -> tuple[RoutedModel, list[int]]:
    """Routers on ``plan.candidates`` that skip exactly ``plan.skip`` on the prompt ``ids``: a kept layer's router
    has weight 0 (score 0.5: run), a skipped one a weight opposite to the prompt's pooled hidden state. Returns the
    routed model and the layers it skips on ``ids``."""
    model, candidates, skip = loaded.model, plan.candidates, plan.skip
    routed = RoutedModel.from_model(model, layers=candidates, base_model_id=loaded.source.model_id)
    with torch.no_grad(), routed.recording():
        pooled = {}
        hooks = []
        for i in candidates:
            layer = loaded.adapter.decoder_layers(model)[i].layer
            norm = loaded.adapter.attention_norm(layer)
            hooks.append(norm.register_forward_hook(lambda m, a, o, i=i: pooled.__setitem__(i, o.float().mean(dim=(0, 1)))))
        routed(input_ids=ids)
        for h in hooks:
            h.remove()
        for i in candidates:
            w = torch.zeros_like(routed.routers[str(i)].proj.weight)
            if i in skip:
                w[0] = -pooled[i] / pooled[i].norm() * 8.0
            routed.routers[str(i)].proj.weight.copy_(w)
        routed(input_ids=ids)
        chosen = sorted(i for i, d in routed.decisions().items() if not bool(d.all()))
    return routed, chosen


def bench_phase(args) -> None:
    import onnxruntime as ort
    from graph_weights import fill, fill_gated, graph_module_from_info

    from rtexport.onnx.phase_graphs import MANIFEST_NAME as PHASES_MANIFEST
    from rtexport.onnx.runtime import OrtCausalLM
    from rtexport.pruning import load_pruned, prune

    graphs = Path(args.graphs)
    record = json.loads((graphs / "bench.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    loaded, plan = _model_and_plan(record["shape"], len(record["skip"]), args.device, dtype)
    assert plan.skip == record["skip"] and plan.candidates == record["candidates"], (plan, record)
    model, skip = loaded.model, plan.skip
    vocab = model.config.vocab_size
    # the prompt the ORT timings use (rtexport.bench_run's, seed 0): the routers are set on it
    import numpy as np

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(args.batch, args.prompt), dtype=np.int64))
    log = {"export": record, "shape": record["shape"], "skip": skip, "providers": ort.get_available_providers(),
           "ort": ort.__version__, "torch": torch.__version__, "batch": args.batch, "prompt": args.prompt,
           "new_tokens": args.new_tokens}

    routed, chosen = routers_choosing_plan(loaded, plan, ids.to(args.device))
    log["gated_skips_on_prompt"] = chosen
    print("gated routers skip", chosen, "plan", skip, flush=True)

    # "static" and one or more gated graphs ("gated", and e.g. an earlier layout exported from another commit under
    # another folder name), each measured against "static"
    # "preallocated" (the static graph with a preallocated KV cache, run with CUDA graphs) likewise
    infos = {d.name: json.loads((d / "export_info.json").read_text()) for d in graphs.iterdir()
             if (d / "export_info.json").is_file()}
    gated = sorted(name for name, info in infos.items() if info["mode"] == "gated")
    prealloc = sorted(name for name, info in infos.items() if info.get("kv_cache") == "preallocated")
    modes = ["static", *prealloc, *gated]
    t = time.perf_counter()
    for mode in gated:
        fill_gated(graphs / mode, loaded, routed)
    routed.unwrap()
    for mode in ["static", *prealloc]:
        fill(graphs / mode, graph_module_from_info(loaded, graphs / mode, plan=plan))
    log["fill_seconds"] = time.perf_counter() - t
    print("weights written", log["fill_seconds"], flush=True)

    # PyTorch SDPA on rtexport's pruned folder
    with tempfile.TemporaryDirectory(prefix="ortbench-") as work:  # the pruned folder is a full model's size
        prune(loaded, plan, Path(work) / "pruned")
        del model, loaded, routed
        torch.cuda.empty_cache() if args.device == "cuda" else None
        pruned = load_pruned(Path(work) / "pruned", dtype=dtype, device=args.device).model
    res = {}
    # PyTorch's eager decode once here; its prefill and CUDA-graph decode are sampled in the rounds below, interleaved
    # with the ONNX Runtime sessions (the pruned model stays on the GPU next to them)
    res["torch_pruned"] = {
        "decode_eager_ms": time_decode(pruned, args.batch, args.prompt, args.new_tokens, reps=3,
                                       cuda_graph=False).median_ms,
        "prefill_samples": [], "decode_samples": [],
    }
    print("torch eager decode", res["torch_pruned"]["decode_eager_ms"], flush=True)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    # every session open at once; the first variant's sessions are named after their graph alone, the others' get
    # "@variant"
    variants = list(dict.fromkeys(args.ort_variants.split(",")))
    sessions = {}
    for variant in variants:
        for mode in modes:
            key = mode if variant == variants[0] else f"{mode}@{variant}"
            # a gated export's phase graphs when it has them (the runner's choice on CUDA), on any device
            sessions[key] = OrtCausalLM(graphs / mode, providers=providers, session_options=session_options(variant),
                                        cuda_graph=mode in prealloc and args.device == "cuda", phase_graphs=True)
            if mode in gated and (graphs / mode / PHASES_MANIFEST).is_file():
                # the gated export's own single graph too (prefill If around both phases), next to its phase graphs
                sessions[f"{key}_single"] = OrtCausalLM(graphs / mode, providers=providers,
                                                        session_options=session_options(variant), phase_graphs=False)
                if args.unshared:  # the phase graphs with a copy of the weights each
                    sessions[f"{key}_unshared"] = OrtCausalLM(graphs / mode, providers=providers,
                                                              session_options=session_options(variant),
                                                              phase_graphs=True, share_weights=False)
    for mode in gated:  # the gated graph's own routers must choose the plan on that prompt too
        lm = sessions[mode]
        step = lm.forward(ids.numpy(), np.ones_like(ids.numpy()), last_only=True)
        chosen = [i for r, i in enumerate(lm.routed_layers) if not step.cache.decisions[:, r].all()]
        log["ort_gated_skips_on_prompt" + ("" if mode == "gated" else f"_{mode}")] = chosen
        print("ORT", mode, "graph skips", chosen, flush=True)
        del lm, step
    # warm-up, then rounds that interleave the sessions at the level of single samples (one decode of
    # --new-tokens steps, --reps prefills), in an order rotated every round: a host-bound step moves with the
    # machine's background load, which drifts over seconds, so each session must be sampled all along the run
    prompt = ids.numpy()
    for lm in sessions.values():
        ort_prefill_once(lm, prompt)
        ort_decode_once(lm, prompt, args.new_tokens)
    keys = ["torch", *sessions]
    for round_ in range(args.rounds):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if key == "torch":  # one sample of each: --reps prefills, one decode (a CUDA-graph replay on a GPU)
                r = res["torch_pruned"]
                r["prefill_samples"] += time_prefill(pruned, args.batch, args.prompt, warmup=1,
                                                     reps=args.reps).samples_ms
                r["decode_samples"] += time_decode(pruned, args.batch, args.prompt, args.new_tokens, warmup=1,
                                                   reps=1).samples_ms
                continue
            lm = sessions[key]
            pre = [ort_prefill_once(lm, prompt) for _ in range(args.reps)]
            dec = ort_decode_once(lm, prompt, args.new_tokens)
            r = res.setdefault(f"ort_{key}", {"prefill_samples": [], "decode_samples": [],
                                              "provider": lm.session.get_providers()[0]})
            r["prefill_samples"] += pre
            r["decode_samples"].append(dec)
        print(round_, {k: round(res["torch_pruned" if k == "torch" else f"ort_{k}"]["decode_samples"][-1], 3)
                       for k in keys}, flush=True)
    # a CUDA-graph session's captured decode step replayed alone (same inputs, no host-side step work): what the
    # step costs ONNX Runtime on the GPU plus one Run call, against the whole step measured above
    for key, lm in sessions.items():
        for step in getattr(lm, "_graphs", {}).values():
            replays = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(args.new_tokens):
                    step.session.run_with_iobinding(step.binding, step.options)
                replays.append(1000 * (time.perf_counter() - start) / args.new_tokens)
            res[f"ort_{key}"]["replay_only_ms"] = statistics.median(replays)
            print(key, "replay only", res[f"ort_{key}"]["replay_only_ms"], flush=True)
            break
    # the graphs agree: greedy tokens of every session against the static graph's (a CUDA-graph replay included)
    reference = sessions["static"].generate(prompt, max_new_tokens=32)
    log["greedy_32_matches_static"] = {key: bool((lm.generate(prompt, max_new_tokens=32) == reference).all())
                                       for key, lm in sessions.items()}
    print("greedy tokens match the static graph's:", log["greedy_32_matches_static"], flush=True)
    # where they part, and why: each session's logits against the static graph's on the static graph's own tokens
    # (teacher-forced), at prefill and at every decode step; GroupQueryAttention graphs also without CUDA graphs
    static_logits = teacher_forced_logits(sessions["static"], prompt, reference)
    log["agreement_with_static"] = {}
    for key, lm in sessions.items():
        if key == "static":
            continue
        log["agreement_with_static"][key] = agreement(teacher_forced_logits(lm, prompt, reference), static_logits,
                                                      reference)
        if getattr(lm, "packed", False):
            eager = OrtCausalLM(lm.path, providers=providers)
            log["agreement_with_static"][f"{key}_no_cuda_graph"] = agreement(
                teacher_forced_logits(eager, prompt, reference), static_logits, reference)
            del eager
    print("agreement with the static graph:", json.dumps(log["agreement_with_static"]), flush=True)
    if args.batch > 1:
        # a left-padded batch (sequence r loses its first r/8 of the prompt): the packed GroupQueryAttention cache
        # (each sequence from slot 0, its own write slot at every step) against the static graph's masked one
        import numpy as np

        padded = np.ones_like(prompt)
        for r in range(args.batch):
            padded[r, : r * args.prompt // 8] = 0
        reference = sessions["static"].generate(prompt, padded, max_new_tokens=32)
        static_logits = teacher_forced_logits(sessions["static"], prompt, reference, padded)
        log["agreement_with_static_left_padded"] = {
            key: agreement(teacher_forced_logits(lm, prompt, reference, padded), static_logits, reference)
            for key, lm in sessions.items() if key != "static" and not lm.gated}
        print("left-padded batch:", json.dumps(log["agreement_with_static_left_padded"]), flush=True)
    measured = list(sessions)
    del sessions
    if args.placement:
        log["placement"] = {}
        for mode in modes:
            log["placement"][mode] = placement_report(graphs / mode, providers, vocab, args.prompt,
                                                      out / f"ort_verbose_{mode}.log")
            print(mode, json.dumps({k: v for k, v in log["placement"][mode].items() if k != "log"}), flush=True)
    if args.profile:
        log["profile"] = {}
        for mode in modes:
            log["profile"][mode] = profile_decode(graphs / mode, providers, vocab, args.prompt, args.batch, 16,
                                                  out / f"ort_profile_{mode}")
            print(mode, json.dumps(log["profile"][mode])[:1500], flush=True)
    del pruned
    for r in [res["torch_pruned"], *(res[f"ort_{mode}"] for mode in measured)]:
        r["prefill_ms"] = statistics.median(r["prefill_samples"])
        r["decode_ms"] = statistics.median(r["decode_samples"])
    torch_ = res["torch_pruned"]
    ratios, paired = {}, {}
    for key in measured:
        mode, _, variant = key.partition("@")
        static = "static" + (f"@{variant}" if variant else "")
        for phase in ("prefill", "decode"):
            if mode != "static":
                mine, ref = res[f"ort_{key}"][f"{phase}_samples"], res[f"ort_{static}"][f"{phase}_samples"]
                ratios[f"{key}_over_{static}_{phase}"] = (res[f"ort_{key}"][f"{phase}_ms"]
                                                         / res[f"ort_{static}"][f"{phase}_ms"])
                paired[f"{key}_over_{static}_{phase}"] = paired_ratio(mine, ref)
            elif variant:
                ratios[f"{key}_over_static_{phase}"] = res[f"ort_{key}"][f"{phase}_ms"] / res["ort_static"][f"{phase}_ms"]
    for key in measured:
        if key.partition("@")[0] not in ("static", *prealloc):
            continue
        static = res[f"ort_{key}"]
        ratios |= {
            f"ort_{key}_speedup_vs_torch_prefill": torch_["prefill_ms"] / static["prefill_ms"],
            f"ort_{key}_speedup_vs_torch_cuda_graph_decode": torch_["decode_ms"] / static["decode_ms"],
            f"ort_{key}_speedup_vs_torch_eager_decode": torch_["decode_eager_ms"] / static["decode_ms"],
        }
    log.update(results=res, ratios=ratios, paired_ratios=paired, seconds=time.perf_counter() - t0)
    print("paired ratios:", json.dumps({k: round(v, 4) for k, v in paired.items()}), flush=True)
    (out / "ort_speed.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(ratios, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.endswith("samples")} for k, v in res.items()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    ex = sub.add_parser("export", help="export both graphs (torch >= 2.13) and keep them without weights")
    ex.add_argument("--shape", default="llama3.2-1b")
    ex.add_argument("--skip", type=int, default=4)
    ex.add_argument("--attention", choices=("fused", "explicit"), default="fused",
                    help="fused: opset 23, one ONNX Attention node per layer; explicit: opset 18 MatMul/Softmax")
    ex.add_argument("--prefill-select", choices=("cond", "logical"), default=None,
                    help="the gated graph's layout (rtexport.onnx.graph_model.PREFILL_SELECTS; default: this torch's)")
    ex.add_argument("--prefill-always", default="none",
                    help="the gated graph's routed layers without an If at prefill: none (default), plan (the "
                         "layers the plan keeps, which the measured routers run), or layers (export_onnx's)")
    ex.add_argument("--modes", default="gated,static", help="which graphs to export (comma-separated)")
    ex.add_argument("--logits", choices=("all", "selected"), default="selected",
                    help="selected (default): the LM head runs on the positions asked for (the last one in these "
                         "loops), as PyTorch's logits_to_keep=1 does; all: on every prompt token")
    ex.add_argument("--out", required=True)
    be = sub.add_parser("bench", help="write the graphs' weights from a model built here and measure")
    be.add_argument("--graphs", required=True, help="the export phase's --out folder")
    be.add_argument("--prompt", type=int, default=1024)
    be.add_argument("--batch", type=int, default=1)
    be.add_argument("--new-tokens", type=int, default=64)
    be.add_argument("--reps", type=int, default=5)
    be.add_argument("--rounds", type=int, default=16,
                    help="measurement rounds; each takes one decode sample and --reps prefill samples per session")
    be.add_argument("--device", default="cuda")
    be.add_argument("--out", default="ort-bench")
    be.add_argument("--placement", action="store_true",
                    help="also report Memcpy nodes and Attention kernel choices from ORT's verbose log")
    be.add_argument("--ort-variants", default="rtexport",
                    help="ONNX Runtime session settings to measure, comma-separated (the first is the main one): "
                         + ", ".join(SESSION_VARIANTS))
    be.add_argument("--profile", action="store_true",
                    help="also profile 16 decode steps of each graph with ONNX Runtime's profiler (time per op type)")
    be.add_argument("--unshared", action="store_true",
                    help="also time a gated export's phase graphs with a copy of the weights each")
    ps = sub.add_parser("profile-summary", help="summarise saved ORT profiles of bench --profile")
    ps.add_argument("profiles", nargs="+")
    ps.add_argument("--steps", type=int, default=16, help="decode steps the profile holds (bench --profile: 16)")
    ps.add_argument("--out", default=None)
    args = ap.parse_args()
    {"export": export_phase, "bench": bench_phase, "profile-summary": profile_summary_phase}[args.phase](args)


if __name__ == "__main__":
    main()
