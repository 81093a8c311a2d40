"""Speed of rtexport's pruned folders against the hand-pruned ideal and the full model, side by side in one run.

A model of a named shape (default: Llama-3-8B) with random weights is built on the device. For each plan (attention
skipped in the deepest layers except the last, as in ../shared/tools/h200-attention-ceiling.py) rtexport's
``prune()`` writes a pruned folder, which is loaded back the way users load it (``load_pruned``: transformers,
``trust_remote_code=True``, the folder's own modeling code) and the folder is then deleted (disk). The ideal is the
full model with those layers' attention sub-blocks removed by hand (``rtexport.bench.attention_removed``). All
variants are timed cell by cell by ``rtexport.bench.compare`` (prefill; decode through a static cache, the step
captured in a CUDA graph), with ``--rounds`` sweeps pooled. Speedup = full / variant; the folder's share of the
ideal's speedup = speedup_pruned / speedup_ideal (goal: ≥ 0.97 in every cell).

Before timing, the pruned model's logits are compared with the ideal's (same weights: the same function), and the
static caches' bytes are recorded (the pruned model's holds only its kept attention layers). ``--compile-check``
also runs transformers ``generate(cache_implementation="static")`` (its compiled decode step: inductor, CUDA graphs)
on pruned models and counts dynamo graphs, graph breaks and CUDA-graph skips, and compares the tokens.

GPU run (repository root; rtexport need not be installed):
    PYTHONPATH=. python3 examples/benchmarks/pruned_speed.py --out $OUT
CPU smoke run:
    python examples/benchmarks/pruned_speed.py --shape llama-tiny --device cpu --dtype float32 \\
        --skip 1-2 --prefill 1x32 2x16 --decode 1x32+8 --rounds 1 --out /tmp/pruned_speed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from rtexport.bench import Cell, attention_removed, compare, format_table, time_decode  # noqa: E402
from rtexport.fsutil import write_json_atomic, write_text_atomic  # noqa: E402
from rtexport.models.loading import parse_dtype, wrap_model  # noqa: E402
from rtexport.models.shapes import random_model  # noqa: E402
from rtexport.planning import SkipPlan  # noqa: E402
from rtexport.pruning import load_pruned, prune  # noqa: E402
from rtexport.versions import device_description, package_versions  # noqa: E402


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def layer_range(text: str) -> list[int]:
    """'23-30' -> [23..30]; '3,5,7' -> [3, 5, 7]."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def prefill_cell(text: str) -> Cell:
    b, s = text.lower().split("x")
    return Cell.prefill(int(b), int(s))


def decode_cell(text: str) -> Cell:
    b, rest = text.lower().split("x")
    p, n = rest.split("+")
    return Cell.decode(int(b), int(p), int(n))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def logits_agreement(ideal: torch.nn.Module, pruned: torch.nn.Module, vocab: int, device: torch.device) -> dict:
    """The same weights, the same function: compare last-position logits on a random prompt."""
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(1)).to(device)
    a = ideal(input_ids=ids, use_cache=False).logits.float()
    b = pruned(input_ids=ids, use_cache=False).logits.float()
    rel = ((a - b).norm() / a.norm()).item()
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "relative_l2": rel,
        "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "logit_std": a.std().item(),
    }


@torch.no_grad()
def compile_check(model: torch.nn.Module, vocab: int, device: torch.device, prompt: int, new: int) -> dict:
    """transformers generate with a static cache and its compiled decode step: graphs, breaks, recompiles, tokens."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(2)).to(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kw)
    t0 = time.perf_counter()
    first = model.generate(ids, cache_implementation="static", **kw)
    torch.cuda.synchronize() if device.type == "cuda" else None
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = model.generate(ids, cache_implementation="static", **kw)
    torch.cuda.synchronize() if device.type == "cuda" else None
    second_s = time.perf_counter() - t0
    return {
        "prompt": prompt,
        "new_tokens": new,
        "first_call_s": first_s,
        "second_call_s": second_s,
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "graph_breaks": dict(counters["graph_break"]),
        "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0),
        "static_equals_dynamic_tokens": bool(torch.equal(first, dynamic)),
        "static_repeat_equal": bool(torch.equal(first, second)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--skip", nargs="+", default=["23-30", "15-30"], help="attention layers skipped, one set per plan")
    ap.add_argument("--prefill", nargs="*", default=["1x2048", "8x1024"], help="BxS")
    ap.add_argument("--decode", nargs="*", default=["1x2048+128", "8x1024+128"], help="BxP+N")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/rtexport_pruned_speed")
    ap.add_argument("--keep-folders", action="store_true")
    ap.add_argument("--compile-check", nargs="*", default=None, metavar="MODEL",
                    help="pruned models (e.g. pruned-16; none given: all) to run through compiled static generate")
    ap.add_argument("--out", default=os.environ.get("OUT", "pruned_speed_out"))
    args = ap.parse_args(argv)
    started = time.perf_counter()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    cells = [prefill_cell(c) for c in args.prefill] + [decode_cell(c) for c in args.decode]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": package_versions(),
        "device": device_description(device),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    log(json.dumps({k: report[k] for k in ("versions", "device")}))

    t0 = time.perf_counter()
    full = random_model(args.shape, device=device, dtype=dtype)
    report["build_s"] = time.perf_counter() - t0
    n_layers = int(full.config.num_hidden_layers)
    vocab = int(full.config.vocab_size)
    report["parameters"] = sum(p.numel() for p in full.parameters())
    log(f"built {args.shape}: {report['parameters'] / 1e9:.2f}B parameters in {report['build_s']:.1f} s")
    # preflight: the decode step captures and runs on this model before any folder is written (fails fast)
    report["preflight_full_ms_per_step"] = time_decode(full, 1, 64, 8, warmup=0, reps=1).median_ms
    log(f"preflight decode (full, b1, 64+8): {report['preflight_full_ms_per_step']:.3f} ms/step")
    loaded = wrap_model(full, model_id=f"random:{args.shape}")

    models: dict[str, Any] = {"full": full}
    pairs: dict[str, str] = {}
    report["plans"] = {}
    for spec in args.skip:
        skip = layer_range(spec)
        tag = str(len(skip))
        plan = SkipPlan(base_model=loaded.source.model_id, fingerprint=loaded.fingerprint, num_layers=n_layers,
                        target="attn", method="manual", skip=skip)
        folder = workdir / f"pruned-{tag}"
        t0 = time.perf_counter()
        prune(loaded, plan, folder, dtype=dtype)
        write_s = time.perf_counter() - t0
        size = dir_bytes(folder)
        t0 = time.perf_counter()
        pruned = load_pruned(folder, dtype=dtype, device=str(device))
        load_s = time.perf_counter() - t0
        model = pruned.model
        info = {
            "skip": skip,
            "folder_bytes": size,
            "write_s": write_s,
            "load_s": load_s,
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "kv_layers": pruned.kv_layers,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        if not args.keep_folders:
            shutil.rmtree(folder)
        with attention_removed(full, skip) as ideal:
            info["logits_vs_ideal"] = logits_agreement(ideal, model, vocab, device)
            ideal_tokens = time_decode(ideal, 2, 64, 16, warmup=0, reps=1).tokens
        pruned_tokens = time_decode(model, 2, 64, 16, warmup=0, reps=1).tokens
        info["greedy_tokens_equal_ideal"] = (ideal_tokens == pruned_tokens).float().mean().item()
        report["plans"][tag] = info
        log(f"plan skip {spec}: folder {size / 1e9:.2f} GB written in {write_s:.1f} s, loaded in {load_s:.1f} s "
            f"({info['class']}); logits vs ideal {info['logits_vs_ideal']}; greedy tokens (b2, 64+16) equal to "
            f"the ideal's: {info['greedy_tokens_equal_ideal']:.3f}")
        models[f"ideal-{tag}"] = (lambda s=skip: attention_removed(full, s))
        models[f"pruned-{tag}"] = model
        pairs[f"pruned-{tag}"] = f"ideal-{tag}"
        write_json_atomic(out / "pruned_speed.json", report)

    order = ["full"] + [n for tag in report["plans"] for n in (f"ideal-{tag}", f"pruned-{tag}")]
    result = compare({n: models[n] for n in order}, cells, pairs=pairs, rounds=args.rounds, log=log)
    report["result"] = result
    report["table"] = format_table(result)
    write_json_atomic(out / "pruned_speed.json", report)
    write_text_atomic(out / "pruned_speed.md", report["table"] + "\n")

    if args.compile_check is not None:
        report["compile_check"] = {}
        for name in args.compile_check or [f"pruned-{tag}" for tag in report["plans"]]:
            try:
                report["compile_check"][name] = compile_check(models[name], vocab, device, 128, 16)
            except Exception as e:  # noqa: BLE001 - a diagnostic: record what failed, keep the timings
                report["compile_check"][name] = {"error": repr(e)[:2000]}
            log(f"compile check {name}: {report['compile_check'][name]}")
            write_json_atomic(out / "pruned_speed.json", report)

    kv = {n: {k: v["kv_cache_bytes"] for k, v in result["models"][n].items() if v["kv_cache_bytes"] is not None}
          for n in order}
    log("static KV cache bytes per decode cell: " + json.dumps(kv))
    report["total_s"] = time.perf_counter() - started
    write_json_atomic(out / "pruned_speed.json", report)
    log(f"total {report['total_s']:.0f} s")
    log("\n" + report["table"])
    worst = min(v for share in result["share"].values() for v in share.values()) if result["share"] else None
    if worst is not None:
        log(f"\nlowest share of the ideal's speedup: {worst:.3f} (goal ≥ 0.97)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
