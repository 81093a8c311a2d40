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
        epochs=epochs, lr=lr, optimizer=optimizer, gates=gates, seed=seed, eval_blocks=eval_blocks, checkpoint_every=checkpoint_every, lora=lora,
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
    method: str = typer.Option("router-tuning", help="router-tuning or attention-drop."),
    skip_ratio: Optional[float] = typer.Option(None, help="Fraction of all layers whose sub-block is dropped."),
    skip_layers: Optional[int] = typer.Option(None, help="Exact number of sub-blocks dropped."),
    layers: Optional[str] = typer.Option(None, help="Candidate layers for attention-drop (default: upper half, never the last)."),
    target: str = typer.Option("attn", help="attention-drop target: attn, mlp or block."),
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


@app.command("supported")
def supported() -> None:
    """List the supported model types."""
    from .models.adapters import supported_model_types

    for name in supported_model_types():
        print(name)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user errors print one line and exit non-zero, never a traceback."""
    import click

    try:
        rv = app(args=argv, standalone_mode=False)
        return int(rv) if isinstance(rv, int) else 0
    except RtexportError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        console.print("[bold red]interrupted[/]: outputs already written stay valid; rerun with --resume where offered")
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
