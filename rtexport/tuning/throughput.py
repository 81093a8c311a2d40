"""Router-tuning throughput: real tuning steps timed on the model's device, as tokens/s and model-FLOPs utilisation.

A step is what ``rtexport.tuning.trainer.tune`` runs (``tuning_loss``): the RoutedModel in mode "train", forward with
the LM loss plus the capacity hinge, backward, AdamW on the router parameters only, and the trainer's read-back of
the loss and execution rate. The backbone is frozen, so no weight gradient is computed, and autograd records
nothing below the first routed layer (no parameter there needs a gradient and neither does the input).

FLOP conventions (per token), both reported:

* ``4·N`` (the issue's MFU): N = every parameter a token is multiplied by: all decoder-layer parameters plus the
  output projection, i.e. the model's parameters minus the input-embedding table (a lookup, not a matmul) when the
  embeddings are untied. Forward 2N + backward-to-activations 2N.
* "real": what the step computes: forward 2·(layer matmul params + head) + causal attention 2·T·heads·head_dim per
  layer, and backward only from the loss down to the first routed layer: 2·(params) + attention at 2.5× its
  forward (flash backward: 5 matmuls against 2) for the layers above it, and in the first routed layer only what
  lies after its gate (the MLP, for ``target="attn"``). Norms, routers and elementwise work are not counted.

Peaks: the datasheet dense bf16 rate of the device (H100/H200 SXM: 989 TFLOP/s) and, when given or measured, the
rate a large bf16 matmul reaches on the device (``measure_matmul_ceiling``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..fsutil import write_json_atomic
from ..models.adapters import ArchitectureAdapter
from ..routing.routed import RoutedDecoderLayer, RoutedModel
from ..versions import device_description, package_versions
from .trainer import tuning_loss

# dense (no sparsity) bf16 tensor-core peaks from vendor datasheets, by device-name substring
DATASHEET_BF16_FLOPS: dict[str, float] = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 154.8e12}
PAPER_TOKENS = 2_000_000  # about what the Router-Tuning paper tuned on (under 15 minutes on one A6000)


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in DATASHEET_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def measure_matmul_ceiling(device: str | torch.device = "cuda", n: int = 8192, reps: int = 10) -> float:
    """FLOP/s of an n×n×n bf16 matmul on random data (median of ``reps`` after warm-up), as METHOD.md asks."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = _time_calls(lambda: a @ b, reps, device)
    return 2 * n**3 / (statistics.median(times) / 1e3)


def _time_calls(fn: Callable[[], Any], reps: int, device: torch.device) -> list[float]:
    """Milliseconds per call, each call bracketed by CUDA events (host clock on the CPU)."""
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize(device)
        out = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


# ---- FLOP accounting ------------------------------------------------------------------------------------------------
def _matrix_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def flop_counts(model: nn.Module, adapter: ArchitectureAdapter, routed_layers: list[int], target: str,
                seq_len: int) -> dict[str, Any]:
    """Parameter counts and FLOP per token under both conventions (see the module docstring)."""
    params = {id(p): p for p in model.parameters()}
    n_total = sum(p.numel() for p in params.values())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb is head
    n_emb = emb.numel()
    n_mfu = n_total if tied else n_total - n_emb
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn_core = 2 * seq_len * heads * head_dim  # causal QK^T and PV, forward, per token per layer
    layers = []
    for layer in adapter.decoder_layers(model):
        inner = layer.layer if isinstance(layer, RoutedDecoderLayer) else layer
        layers.append((_matrix_params(adapter.attention(inner)), _matrix_params(adapter.feed_forward(inner))))
    n_head = head.numel()
    forward = 2 * (sum(a + m for a, m in layers) + n_head) + len(layers) * attn_core
    first = min(routed_layers)
    backward = 2 * n_head
    for i, (a, m) in enumerate(layers):
        if i > first:
            backward += 2 * (a + m) + 2.5 * attn_core
        elif i == first and target == "attn":
            backward += 2 * m
    return {
        "params_total": n_total,
        "params_input_embedding": n_emb,
        "tied_embeddings": tied,
        "params_N": n_mfu,
        "N_definition": "all parameters minus the input-embedding table (decoder layers + final norm + output head)"
        if not tied else "all parameters (tied embeddings: the table is the output head)",
        "flop_per_token_4N": 4 * n_mfu,
        "flop_per_token_real": int(forward + backward),
        "flop_per_token_real_forward": int(forward),
        "flop_per_token_real_backward": int(backward),
    }


# ---- speed options ---------------------------------------------------------------------------------------------------
def compile_sub_blocks(model: nn.Module, adapter: ArchitectureAdapter) -> int:
    """``nn.Module.compile()`` the attention, MLP and both norms of every decoder layer, in place (regional
    compilation: identical layers share compiled code). Lasting; returns the number of modules compiled."""
    count = 0
    for layer in adapter.decoder_layers(model):
        inner = layer.layer if isinstance(layer, RoutedDecoderLayer) else layer
        for module in (adapter.attention_norm(inner), adapter.attention(inner),
                       adapter.feed_forward_norm(inner), adapter.feed_forward(inner)):
            module.compile()
            count += 1
    return count


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _layer_grad_probe(model: nn.Module, adapter: ArchitectureAdapter) -> Iterator[dict[int, bool]]:
    """layer index -> whether that decoder layer's output is recorded by autograd (requires grad)."""
    seen: dict[int, bool] = {}
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        def hook(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            seen[i] = bool(t.requires_grad)
        handles.append(layer.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def measure_tuning_throughput(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int = 2,
    compile: bool = False,
    fused_loss: bool = False,
    loss_chunk_tokens: int = 8192,
    target: str = "attn",
    granularity: str = "sequence",
    layers: list[int] | None = None,
    target_skip: float | None = 0.25,
    capacity_weight: float = 5.0,
    lr: float = 1e-3,
    peak_flops: float | None = None,
    measured_peak_flops: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``steps`` router-tuning steps of ``model`` (a causal LM, or a RoutedModel) on random token blocks.

    ``warmup`` untimed steps run first (at least one: the first also probes which layers autograd records, and
    includes any compilation; its wall time is ``first_step_s``). The model's weights are left as they were (routers are attached for the measurement and removed after, unless a
    RoutedModel is passed; requires_grad flags are restored). ``compile`` compiles the decoder sub-blocks in place
    (lasting). ``peak_flops`` defaults to the device's datasheet dense bf16 rate (None on the CPU: no MFU).
    Returns a JSON-able dict: step times (ms, CUDA events), tokens/s, seconds for 2M tokens, MFU under the 4·N and
    the real-FLOP conventions, peak memory, and checks (backbone got no gradient, routers did, lower layers untracked).
    """
    if min(batch_size, seq_len, steps) < 1 or warmup < 0:
        raise ValueError("batch_size, seq_len and steps must be at least 1, warmup at least 0")
    owns = not isinstance(model, RoutedModel)
    base = model if owns else model.base_model
    device = next(base.parameters()).device
    if peak_flops is None:
        peak_flops = datasheet_peak(device)
    vocab = base.get_input_embeddings().weight.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    batches = [torch.randint(0, vocab, (batch_size, seq_len), device=device, generator=gen)
               for _ in range(min(4, warmup + steps))]

    with _frozen(base):
        routed = RoutedModel.from_model(base, target=target, granularity=granularity, layers=layers) if owns else model
        try:
            return _run(routed, batches, steps, warmup, compile, fused_loss, loss_chunk_tokens, target_skip,
                        capacity_weight, lr, peak_flops, measured_peak_flops, device, seq_len, batch_size)
        finally:
            for p in routed.router_parameters():
                p.grad = None
            if owns:
                routed.unwrap()


def _run(routed: RoutedModel, batches: list[torch.Tensor], steps: int, warmup: int, compile: bool, fused_loss: bool,
         loss_chunk_tokens: int, target_skip: float | None, capacity_weight: float, lr: float,
         peak_flops: float | None, measured_peak_flops: float | None, device: torch.device, seq_len: int,
         batch_size: int) -> dict[str, Any]:
    base, adapter = routed.base_model, routed.adapter
    cuda = device.type == "cuda"
    compiled = compile_sub_blocks(base, adapter) if compile else 0
    optimizer = torch.optim.AdamW(routed.router_parameters(), lr=lr)
    keep_rate = None if target_skip is None else 1.0 - target_skip
    history: list[dict[str, float]] = []

    def step(ids: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, lm, rate = tuning_loss(routed, ids, keep_rate, capacity_weight, fused_loss, loss_chunk_tokens)
        loss.backward()
        optimizer.step()
        # the trainer reads these back every step (a host sync), so the measurement does too
        history.append({"lm_loss": float(lm.detach()), "execution_rate": float(rate.detach())})

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_step_s = None
    with routed.mode("train"):
        with _layer_grad_probe(base, adapter) as tracked:
            t = time.perf_counter()
            step(batches[0])
            if cuda:
                torch.cuda.synchronize(device)
            first_step_s = time.perf_counter() - t
        tracked = dict(tracked)
        for i in range(1, warmup):
            step(batches[i % len(batches)])
        backbone_grad = any(p.grad is not None for p in base.parameters())
        router_grads = [p.grad for p in routed.router_parameters()]
        routers_have_grad = all(g is not None and bool(torch.isfinite(g).all()) for g in router_grads) and any(
            bool(g.abs().sum() > 0) for g in router_grads if g is not None)
        it = iter(range(steps))
        times = _time_calls(lambda: step(batches[(warmup + next(it)) % len(batches)]), steps, device)
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None

    tokens = batch_size * seq_len
    median_ms = statistics.median(times)
    tok_s = tokens / (median_ms / 1e3)
    flops = flop_counts(base, adapter, routed.layers, routed.config.target, seq_len)
    first_tracked = min((i for i, g in tracked.items() if g), default=None)

    def util(per_token: float, peak: float | None) -> float | None:
        return None if not peak else tok_s * per_token / peak

    return {
        "device": device_description(device),
        "versions": package_versions(("torch", "transformers")),
        "settings": {
            "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "warmup": warmup, "compile": compile,
            "fused_loss": fused_loss, "loss_chunk_tokens": loss_chunk_tokens if fused_loss else None,
            "target": routed.config.target, "granularity": routed.config.granularity, "layers": routed.layers,
            "target_skip": target_skip, "capacity_weight": capacity_weight, "lr": lr,
            "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
        },
        "tokens_per_step": tokens,
        "step_ms": [round(x, 3) for x in times],
        "step_ms_median": round(median_ms, 3),
        "step_ms_spread": round(max(times) - min(times), 3),
        "tokens_per_s": round(tok_s, 1),
        "seconds_for_2M_tokens": round(PAPER_TOKENS / tok_s, 2),
        "first_step_s": round(first_step_s, 2),
        "compiled_modules": compiled,
        **flops,
        "peak_flops_datasheet": peak_flops,
        "peak_flops_measured": measured_peak_flops,
        "mfu_4N_datasheet": util(flops["flop_per_token_4N"], peak_flops),
        "mfu_4N_measured": util(flops["flop_per_token_4N"], measured_peak_flops),
        "real_flop_util_datasheet": util(flops["flop_per_token_real"], peak_flops),
        "real_flop_util_measured": util(flops["flop_per_token_real"], measured_peak_flops),
        "peak_memory_gib": None if peak_mem is None else round(peak_mem, 2),
        "checks": {
            "backbone_got_gradients": backbone_grad,
            "routers_got_gradients": routers_have_grad,
            "first_layer_tracked_by_autograd": first_tracked,
            "first_routed_layer": min(routed.layers),
            "lower_layers_untracked": first_tracked is not None and first_tracked >= min(routed.layers),
            "losses_finite": all(math.isfinite(h["lm_loss"]) for h in history),
        },
        "lm_loss_first_last": [round(history[0]["lm_loss"], 4), round(history[-1]["lm_loss"], 4)],
    }


def compare_losses(model: nn.Module, *, batch_size: int, seq_len: int, loss_chunk_tokens: int = 8192,
                   seed: int = 0) -> dict[str, float]:
    """The fused chunked loss against ``labels=`` on one random batch: |Δloss|, and the relative error of the router
    gradients of the LM loss alone (‖g_fused − g_hf‖ / ‖g_hf‖; no capacity term, which would dominate them)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    with _frozen(model):
        routed = RoutedModel.from_model(model)
        try:
            out = {}
            grads = {}
            with routed.mode("train"):
                for fused in (False, True):
                    for p in routed.router_parameters():
                        p.grad = None
                    loss, lm, _ = tuning_loss(routed, ids, None, 0.0, fused, loss_chunk_tokens)
                    loss.backward()
                    out["lm_loss_" + ("fused" if fused else "hf")] = float(lm.detach())
                    grads[fused] = torch.cat([p.grad.reshape(-1).float() for p in routed.router_parameters()])
            out["lm_loss_abs_diff"] = abs(out["lm_loss_fused"] - out["lm_loss_hf"])
            out["router_grad_rel_err"] = float((grads[True] - grads[False]).norm() / grads[False].norm().clamp_min(1e-30))
            return out
        finally:
            routed.unwrap()


# ---- script entry -----------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("variant", "batch", "step ms", "spread", "tok/s", "2M tok s", "MFU 4N/989", "MFU 4N/meas", "real/989",
            "peak GiB")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if "error" in r:
            lines.append(" | ".join([r["variant"], str(r["batch_size"]), r["error"]] + ["-"] * (len(head) - 3)))
            continue
        lines.append(" | ".join([
            r["variant"], str(r["settings"]["batch_size"]), _fmt(r["step_ms_median"], ".1f"),
            _fmt(r["step_ms_spread"], ".1f"), _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["seconds_for_2M_tokens"], ".1f"),
            _fmt(r["mfu_4N_datasheet"] and 100 * r["mfu_4N_datasheet"], ".1f"),
            _fmt(r["mfu_4N_measured"] and 100 * r["mfu_4N_measured"], ".1f"),
            _fmt(r["real_flop_util_datasheet"] and 100 * r["real_flop_util_datasheet"], ".1f"),
            _fmt(r["peak_memory_gib"], ".1f"),
        ]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..models.shapes import SHAPES, random_model

    ap = argparse.ArgumentParser(prog="python -m rtexport.tuning.throughput",
                                 description="Router-tuning throughput of a random-weight model of a named shape.")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8])
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--loss", nargs="+", choices=("hf", "fused"), default=["hf"],
                    help="hf: labels= through transformers; fused: chunked loss from the final hidden states")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="off",
                    help="compile decoder sub-blocks; 'both' runs every eager variant first, then compiled ones")
    ap.add_argument("--compile-batch-size", type=int, nargs="+", default=None,
                    help="batch sizes for the compiled variants (default: all of --batch-size)")
    ap.add_argument("--check", action="store_true", help="compare the fused loss with labels= first (one batch of 2)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip measuring the bf16 matmul ceiling")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default="throughput.json", help="where to write all results")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    report: dict[str, Any] = {"command": " ".join(["python -m rtexport.tuning.throughput", *sys.argv[1:]]),
                              "shape": args.shape, "runs": []}
    if device.type == "cuda" and not args.no_ceiling:
        report["matmul_ceiling_flops"] = measure_matmul_ceiling(device)
        print(f"bf16 8192^3 matmul ceiling: {report['matmul_ceiling_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    t = time.perf_counter()
    model = random_model(args.shape, device=device, dtype=getattr(torch, args.dtype))
    report["build_s"] = round(time.perf_counter() - t, 2)
    print(f"built {args.shape} on {device} in {report['build_s']} s", flush=True)
    if args.check:
        report["loss_check"] = compare_losses(model, batch_size=2, seq_len=args.seq_len)
        print("loss check:", report["loss_check"], flush=True)

    plan = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for compiled in modes:
        sizes = args.compile_batch_size if (compiled and args.compile_batch_size) else args.batch_size
        for loss in args.loss:
            for b in sizes:
                plan.append((compiled, loss, b))
    for compiled, loss, b in plan:
        name = f"{'compiled' if compiled else 'eager'}+{loss}"
        try:
            r = measure_tuning_throughput(model, batch_size=b, seq_len=args.seq_len, steps=args.steps,
                                          warmup=args.warmup, compile=compiled, fused_loss=loss == "fused",
                                          measured_peak_flops=report.get("matmul_ceiling_flops"))
            r["variant"] = name
        except torch.OutOfMemoryError:
            r = {"variant": name, "batch_size": b, "error": "out of memory"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["runs"].append(r)
        print(name, {k: r.get(k) for k in ("tokens_per_s", "step_ms_median", "mfu_4N_datasheet", "peak_memory_gib",
                                           "first_step_s", "checks", "error")}, flush=True)
        write_json_atomic(args.json, report)
    print(format_table(report["runs"]))
    print(f"wrote {Path(args.json).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
