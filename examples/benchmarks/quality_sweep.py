"""Router-Tuning plans against Attention-Drop plans on a real model, on equal terms.

For each tuning variant (optimizer, learning rate, capacity weight) routers are tuned on the embedded corpus, and the
variant with the lowest perplexity on the *calibration* split (training text, never the held-out text) at the
reference ratio is kept. Then, for every skip ratio, routers are tuned for that ratio and the Router-Tuning plan is
compared with the Attention-Drop plan (same candidate layers, same calibration text): perplexity on held-out text and
zero-shot accuracy on the offline multiple-choice tasks.

    python examples/benchmarks/quality_sweep.py --model embedded:smollm2 --layers 8-28 --out sweep/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rtexport.evaluation.compare import quality_table
from rtexport.evaluation.plan_quality import evaluate_plans, mean_accuracy
from rtexport.models.loading import load_model
from rtexport.planning import (greedy_loss_search, measure_similarity, plan_from_loss_search, plan_from_routed,
                               plan_from_similarity)
from rtexport.routing.config import parse_layers
from rtexport.tuning.data import load_blocks
from rtexport.tuning.trainer import TuneSettings, tune

_T, _S = dict(gates="threshold"), dict(gates="sampled")
VARIANTS = {
    # session 1 (thresholded straight-through gates, the paper's; then Bernoulli-sampled gates), LM objective
    "adamw-1e-3": dict(optimizer="adamw", lr=1e-3, capacity_weight=5.0, **_T),
    "adamw-1e-4": dict(optimizer="adamw", lr=1e-4, capacity_weight=5.0, **_T),
    "shared-adam-1e-3": dict(optimizer="shared-adam", lr=1e-3, capacity_weight=5.0, **_T),
    "shared-adam-1e-2": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, **_T),
    "shared-adam-1e-3-cap1": dict(optimizer="shared-adam", lr=1e-3, capacity_weight=1.0, **_T),
    "adamw-1e-3-3ep": dict(optimizer="adamw", lr=1e-3, capacity_weight=5.0, epochs=3.0, **_T),
    "sampled-adamw-1e-3": dict(optimizer="adamw", lr=1e-3, capacity_weight=5.0, **_S),
    "sampled-adamw-1e-3-3ep": dict(optimizer="adamw", lr=1e-3, capacity_weight=5.0, epochs=3.0, **_S),
    "sampled-shared-adam-1e-2": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, **_S),
    "sampled-shared-adam-1e-2-3ep": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, epochs=3.0, **_S),
    # session 2: self-distillation (KL from the full model) and longer blocks (same number of tokens)
    "kl-sampled-shared-adam-1e-2": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, objective="kl", **_S),
    "kl-sampled-shared-adam-1e-2-3ep": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, objective="kl", epochs=3.0, **_S),
    "kl-sampled-adamw-1e-3": dict(optimizer="adamw", lr=1e-3, capacity_weight=5.0, objective="kl", **_S),
    "kl-shared-adam-1e-2": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, objective="kl", **_T),
    "kl-sampled-shared-adam-1e-2-s1024": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, objective="kl",
                                              seq_len=1024, max_samples=128, batch_size=4, **_S),
    "sampled-shared-adam-1e-2-s1024": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0,
                                           seq_len=1024, max_samples=128, batch_size=4, **_S),
    "kl-sampled-shared-adam-1e-2-rep25": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, objective="kl",
                                              repeat_fraction=0.25, **_S),
    "sampled-shared-adam-1e-2-rep25": dict(optimizer="shared-adam", lr=1e-2, capacity_weight=5.0, repeat_fraction=0.25, **_S),
}
# the variants the session-2 selection run compared (BENCHMARKS.md); the copy-block variants were evaluated beside the
# selected one with --also
SESSION2 = [k for k in VARIANTS if (k.startswith("kl-") or k.endswith("-s1024")) and not k.endswith("-rep25")]
SESSION2 += ["sampled-shared-adam-1e-2"]


def rt_plan(loaded, routed, calib, k, batch_size):
    return plan_from_routed(routed, calib, batch_size=batch_size, base_model=loaded.source.model_id,
                            fingerprint=loaded.fingerprint, num_layers=loaded.model.config.num_hidden_layers, skip_layers=k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--layers", default="8-28")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--ratios", default="0.125,0.25,0.375,0.5")
    ap.add_argument("--reference-ratio", type=float, default=0.25)
    ap.add_argument("--variants", default=",".join(SESSION2), help="comma-separated names from VARIANTS")
    ap.add_argument("--also", default="", help="variants evaluated at every ratio beside the selected one")
    ap.add_argument("--select-only", action="store_true", help="stop after choosing the variant (no task evaluation)")
    ap.add_argument("--no-loss-search", action="store_true",
                    help="leave out the reference plans of a greedy search by calibration perplexity")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,piqa,hellaswag,boolq,openbookqa,winogrande,lambada")
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--heldout-blocks", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="sweep")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    n = loaded.model.config.num_hidden_layers
    cand = parse_layers(args.layers, n)
    heldout, _ = load_blocks(loaded.tokenizer, None, split="heldout", seq_len=args.seq_len, max_blocks=args.heldout_blocks)
    calib, _ = load_blocks(loaded.tokenizer, None, split="train", seq_len=args.seq_len, max_blocks=32)
    ratios = [float(r) for r in args.ratios.split(",")]
    counts = {r: int(r * n + 0.5) for r in ratios}
    log: dict = {"model": args.model, "layers": cand, "counts": {str(r): k for r, k in counts.items()}, "variants": {}}

    def tuned(name, k, **variant):
        kw = dict(layers=cand, target_skip=k / len(cand), seq_len=args.seq_len, max_samples=args.max_samples,
                  batch_size=args.batch_size, epochs=args.epochs, eval_blocks=16, calibration_blocks=32, checkpoint_every=0)
        settings = TuneSettings(**{**kw, **variant})
        r = tune(loaded, settings, out / f"routers-{name}-{k}", progress=False, measure_perplexity=False)
        return r

    # Attention Drop: one similarity measurement, one plan per ratio
    with torch.no_grad():
        sim = measure_similarity(loaded.model, loaded.adapter,
                                 [{"input_ids": calib[i:i + 8].to(loaded.device)} for i in range(0, calib.shape[0], 8)],
                                 target="attn", layers=cand)
    ad_plans = {r: plan_from_similarity(sim, base_model=loaded.source.model_id, fingerprint=loaded.fingerprint,
                                        num_layers=n, target="attn", skip_layers=counts[r]) for r in ratios}
    log["attention_drop_similarity"] = {str(k): v for k, v in sim.items()}

    # variant selection on the calibration split at the reference ratio
    k_ref = counts[args.reference_ratio]
    best, best_ppl = None, float("inf")
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        result = tuned(name, k_ref, **VARIANTS[name])
        plan = rt_plan(loaded, result.routed, calib, k_ref, args.batch_size)
        result.routed.unwrap()
        entry = evaluate_plans(loaded, [plan], calib, include_base=False, progress=False)[0]
        log["variants"][name] = {"skip": plan.skip, "calibration_ppl": entry["perplexity"],
                                 "heldout_skip_ratio": result.heldout_skip_ratio, "seconds": time.perf_counter() - t0}
        print(f"variant {name}: skip {plan.skip} calibration ppl {entry['perplexity']:.3f}", flush=True)
        if entry["perplexity"] < best_ppl:
            best, best_ppl = name, entry["perplexity"]
    ad_calib = evaluate_plans(loaded, [ad_plans[args.reference_ratio]], calib, include_base=False, progress=False)[0]
    log["attention_drop_calibration_ppl"] = ad_calib["perplexity"]
    print(f"attention-drop: skip {ad_plans[args.reference_ratio].skip} calibration ppl {ad_calib['perplexity']:.3f}")
    log["best_variant"] = best

    # reference: greedy removal by measured calibration perplexity (no training; ~candidates x layers passes)
    ls_plans = {}
    if not args.no_loss_search:
        t0 = time.perf_counter()
        removal = greedy_loss_search(loaded.model, calib, cand, max(counts.values()), batch_size=args.batch_size,
                                     progress=True)
        log["loss_search"] = {"removal": removal, "seconds": time.perf_counter() - t0}
        ls_plans = {r: plan_from_loss_search(removal, cand, base_model=loaded.source.model_id,
                                             fingerprint=loaded.fingerprint, num_layers=n, target="attn",
                                             skip_layers=counts[r]) for r in ratios}
    (out / "sweep.json").write_text(json.dumps(log, indent=1, default=float))  # kept if a later step is cut short
    if args.select_only:
        return

    # per ratio: tune for that ratio with the chosen variant, then evaluate both plans on held-out text and tasks
    plans, labels = [], ["base"]
    final = [best] + [v for v in args.also.split(",") if v and v != best]
    for r in ratios:
        for name in final:
            result = tuned(name, counts[r], **VARIANTS[name])
            plans.append(rt_plan(loaded, result.routed, calib, counts[r], args.batch_size))
            labels.append("router-tuning" if name == best else f"router-tuning ({name})")
            result.routed.unwrap()
        plans.append(ad_plans[r])
        labels.append("attention-drop")
        if r in ls_plans:
            plans.append(ls_plans[r])
            labels.append("loss-search (oracle on calibration text)")
    tasks = [t for t in args.tasks.split(",") if t]
    entries = evaluate_plans(loaded, plans, heldout, tasks=tasks, limit=args.limit, progress=False)
    for e, label in zip(entries, labels):
        e["mean_acc"] = mean_accuracy(e)
        e["method"] = label
    log["entries"] = entries
    log["seconds"] = time.perf_counter() - t_start
    (out / "sweep.json").write_text(json.dumps(log, indent=1, default=float))
    table = quality_table(entries)
    (out / "table.md").write_text(table)
    print(table)
    print(json.dumps({k: v for k, v in log["variants"].items()}, indent=1, default=float))


if __name__ == "__main__":
    main()
