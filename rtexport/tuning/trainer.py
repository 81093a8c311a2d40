"""The router tuner: trains only the routers of a frozen model, with a capacity term that steers the skip ratio.

loss = task loss + capacity_weight * relu(execution_rate - (1 - target_skip))

The task loss is the causal-LM loss on the tuning text (``objective="lm"``, the paper's) or the KL divergence from
the same frozen model with every gate open (``objective="kl"``: self-distillation; it asks the routed model to keep
the full model's whole next-token distribution, not only the probability of the text's next token).

``execution_rate`` is the mean of the straight-through gates over routed layers and sequences (tokens for
token-level routing), so the hinge's gradient reaches the router scores. After training, one global threshold is
calibrated on calibration text so that the skip ratio hits ``target_skip``; execution rates and perplexity are then
measured on held-out text that neither training nor calibration saw.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ArtifactMismatch, DataError
from ..fsutil import write_json_atomic
from ..models.loading import LoadedModel
from ..routing.config import parse_layers
from ..routing.routed import RoutedModel
from ..versions import package_versions
from .data import load_blocks, split_blocks, with_repeats
from .optim import build_optimizer

CHECKPOINT_DIR = "checkpoint"
OBJECTIVES = ("lm", "kl")


@dataclass
class TuneSettings:
    target: str = "attn"
    granularity: str = "sequence"
    layers: str | list[int] | None = None
    target_skip: float | None = 0.25
    capacity_weight: float = 5.0
    seq_len: int = 512
    max_samples: int | None = 256
    batch_size: int = 4
    grad_accum: int = 1
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-2
    weight_decay: float = 0.0
    optimizer: str = "shared-adam"
    gates: str = "sampled"  # threshold (the paper: hard 0.5 threshold + STE) or sampled (Bernoulli + STE)
    objective: str = "lm"  # lm (next-token loss on the text) or kl (distil the full model's distribution)
    repeat_fraction: float = 0.0  # share of training blocks whose second half repeats the first (in-context copying)
    seed: int = 0
    threshold: float = 0.5
    calibration_blocks: int = 32
    eval_blocks: int = 32
    checkpoint_every: int = 10
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    data: str | None = None
    eval_data: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.target_skip is not None and not 0.0 <= self.target_skip < 1.0:
            raise DataError(f"--target-skip must be in [0, 1), got {self.target_skip}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1")
        if self.gates not in ("threshold", "sampled"):
            raise DataError(f"--gates must be threshold or sampled, got {self.gates!r}")
        if self.objective not in OBJECTIVES:
            raise DataError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= self.repeat_fraction <= 1.0:
            raise DataError(f"--repeat-fraction must be in [0, 1], got {self.repeat_fraction}")
        if self.steps is not None and self.steps < 1:
            raise DataError("--steps must be at least 1")
        if self.lr <= 0:
            raise DataError("--lr must be positive")


@dataclass
class TuneResult:
    output_dir: Path
    routed: RoutedModel
    steps: int
    threshold: float
    heldout_skip_ratio: float
    execution_rates: dict[int, float]
    base_perplexity: float | None
    routed_perplexity: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _batches_for_step(order: torch.Tensor, step_in_epoch: int, batch_size: int, grad_accum: int) -> list[torch.Tensor]:
    per_step = batch_size * grad_accum
    idx = order[step_in_epoch * per_step : (step_in_epoch + 1) * per_step]
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size) if len(idx[i : i + batch_size])]


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def _execution_rate(routed: RoutedModel) -> torch.Tensor:
    gates = list(routed.state.gates.values())
    return torch.stack([g.float().mean() for g in gates]).mean()


def tuning_loss(
    routed: RoutedModel,
    ids: torch.Tensor,
    keep_rate: float | None,
    capacity_weight: float,
    fused_loss: bool = False,
    loss_chunk_tokens: int = 8192,
    objective: str = "lm",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch of router tuning (``routed`` in mode "train"): (loss, task loss, execution rate).

    loss = task loss + capacity_weight * relu(execution_rate - keep_rate). With ``objective="lm"`` the task loss is
    the LM loss; ``fused_loss`` then computes it chunk by chunk from the final hidden states (rtexport.tuning.loss)
    instead of through ``labels=``, never holding the full logits; both give the same loss and gradients up to
    rounding. With ``objective="kl"`` it is the mean KL divergence from the same model with every gate open (no
    gradient through that teacher pass), computed chunk by chunk the same way.
    """
    mask = torch.ones_like(ids)
    if objective == "kl":
        from .loss import final_hidden_states, linear_kl_divergence

        norm_path = routed.adapter.final_norm
        with torch.no_grad(), routed.mode("open"):
            teacher = final_hidden_states(routed.base_model, norm_path, ids, mask, call=routed)
        student = final_hidden_states(routed.base_model, norm_path, ids, mask, call=routed)
        head = routed.base_model.get_output_embeddings()
        task = linear_kl_divergence(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]),
                                    head.weight, getattr(head, "bias", None), chunk_tokens=loss_chunk_tokens)
    elif fused_loss:
        from .loss import causal_lm_loss

        task = causal_lm_loss(routed.base_model, routed.adapter.final_norm, ids, mask,
                              chunk_tokens=loss_chunk_tokens, call=routed)
    else:
        task = routed(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    rate = _execution_rate(routed)
    loss = task.float()
    if keep_rate is not None:
        loss = loss + capacity_weight * torch.relu(rate - keep_rate)
    return loss, task, rate


@torch.no_grad()
def collect_scores(
    routed: RoutedModel, blocks: torch.Tensor, batch_size: int, threshold: float | None = None
) -> dict[int, torch.Tensor]:
    """Router scores per routed layer over ``blocks`` (hard routing at ``threshold``): layer -> (N,) or (N*T,)."""
    device = next(routed.base_model.parameters()).device
    thr = routed.state.threshold if threshold is None else threshold
    with routed.mode("hard"), routed.threshold(thr), routed.recording() as rec:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i : i + batch_size].to(device)
            routed(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return {layer: torch.cat([s.reshape(-1) for s in v]) for layer, v in rec.items()}


def execution_rates(scores: dict[int, torch.Tensor], threshold: float) -> tuple[dict[int, float], dict[int, float]]:
    """Per routed layer: the share of decisions that run it at ``threshold``, and its mean router score."""
    rates = {i: float((s >= threshold).float().mean()) for i, s in scores.items()}
    means = {i: float(s.float().mean()) for i, s in scores.items()}
    return rates, means


def calibrate_threshold(
    routed: RoutedModel, blocks: torch.Tensor, target_skip: float, batch_size: int, rounds: int = 4
) -> float:
    """One global threshold so that ``target_skip`` of the routed decisions skip on ``blocks``.

    Later layers' scores depend on earlier layers' decisions, so the quantile is re-taken a few times (fixed point).
    """
    thr = routed.state.threshold
    for _ in range(rounds):
        scores = collect_scores(routed, blocks, batch_size, thr)
        all_scores = torch.cat(list(scores.values())).double()
        if all_scores.numel() == 0:
            return thr
        new = float(torch.quantile(all_scores, target_skip)) if target_skip > 0 else float(all_scores.min()) - 1e-6
        # decisions are score >= thr: nudge the threshold just above the quantile score so it is skipped
        if target_skip > 0:
            above = all_scores[all_scores > new]
            new = (new + float(above.min())) / 2 if above.numel() else new + 1e-6
        if abs(new - thr) < 1e-9:
            break
        thr = new
    return thr


def _save_checkpoint(directory: Path, routed: RoutedModel, optimizer: torch.optim.Optimizer, step: int,
                     settings: TuneSettings, history: list[dict[str, float]], lora_params: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": step,
        "routers": {k: v.detach().cpu().clone() for k, v in routed.routers.state_dict().items()},
        "lora": {k: v.detach().cpu().clone() for k, v in lora_params.items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "settings": settings.to_dict(),
    }
    fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".tmp", dir=directory)
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, directory / "state.pt")


def _load_checkpoint(directory: Path, settings: TuneSettings) -> dict[str, Any] | None:
    path = directory / "state.pt"
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = dict(payload["settings"])
    now = settings.to_dict()
    ignore = {"checkpoint_every", "eval_blocks"}
    diff = sorted(k for k in now if k not in ignore and saved.get(k) != now[k])
    if diff:
        raise ArtifactMismatch(f"--resume: the checkpoint in {directory} was made with other settings ({', '.join(diff)})")
    return payload


def tune(
    loaded: LoadedModel,
    settings: TuneSettings,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    measure_perplexity: bool = True,
) -> TuneResult:
    """Train routers on ``loaded.model`` (whose weights stay bit-identical) and save them to ``output_dir``."""
    settings.validate()
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / CHECKPOINT_DIR
    t0 = time.perf_counter()
    _seed_everything(settings.seed)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise DataError("router tuning needs a tokenizer")
    n_layers = model.config.num_hidden_layers
    layers = parse_layers(settings.layers, n_layers)

    blocks, data_info = load_blocks(tok, settings.data, seq_len=settings.seq_len, max_blocks=(
        None if settings.max_samples is None else settings.max_samples + settings.calibration_blocks))
    train_blocks, calib_blocks = split_blocks(blocks, settings.calibration_blocks / max(blocks.shape[0], 1), settings.seed)
    if train_blocks.shape[0] == 0:
        raise DataError("not enough text for training blocks: lower --seq-len or add data")
    train_blocks = with_repeats(train_blocks, settings.repeat_fraction, settings.seed)
    heldout_source = settings.eval_data if settings.eval_data is not None else settings.data
    try:
        heldout, heldout_info = load_blocks(tok, heldout_source, split="heldout" if heldout_source in (None, "embedded") else "validation",
                                            seq_len=settings.seq_len, max_blocks=settings.eval_blocks)
    except DataError:
        heldout, heldout_info = calib_blocks, data_info  # a dataset without a validation split: use the calibration split

    _freeze(model)
    routed = RoutedModel.from_model(
        model,
        target=settings.target,
        granularity=settings.granularity,
        layers=layers,
        threshold=settings.threshold,
        base_model_id=loaded.source.model_id,
        base_revision=loaded.source.revision,
        base_gguf_file=loaded.source.gguf_file,
        target_skip=settings.target_skip,
    )
    lora_params: dict[str, torch.nn.Parameter] = {}
    if settings.lora:
        from .lora import add_lora

        lora_params, routed.config.lora = add_lora(
            model, loaded.adapter, settings.lora_r, settings.lora_alpha, settings.lora_targets, settings.seed
        )
    params = routed.router_parameters() + list(lora_params.values())
    optimizer = build_optimizer(settings.optimizer, params, settings.lr, settings.weight_decay)

    per_step = settings.batch_size * settings.grad_accum
    steps_per_epoch = max(1, math.ceil(train_blocks.shape[0] / per_step))
    total = settings.steps if settings.steps is not None else max(1, int(math.ceil(settings.epochs * steps_per_epoch)))

    start, history = 0, []
    if resume:
        payload = _load_checkpoint(ckpt_dir, settings)
        if payload is not None:
            routed.routers.load_state_dict(payload["routers"])
            for k, v in payload["lora"].items():
                lora_params[k].data.copy_(v)
            optimizer.load_state_dict(payload["optimizer"])
            torch.set_rng_state(payload["rng"])
            if payload.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(payload["cuda_rng"])
            start, history = int(payload["step"]), list(payload["history"])
    elif ckpt_dir.exists():
        for f in ckpt_dir.glob("*"):
            f.unlink()

    device = next(model.parameters()).device
    keep_rate = None if settings.target_skip is None else 1.0 - settings.target_skip
    display = _Progress(total, enabled=progress)
    routed.state.stochastic = settings.gates == "sampled"
    with display, routed.mode("train"):
        display.advance_to(start)
        for step in range(start, total):
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = _epoch_order(train_blocks.shape[0], settings.seed, epoch)
            optimizer.zero_grad(set_to_none=True)
            micro = _batches_for_step(order, in_epoch, settings.batch_size, settings.grad_accum)
            lm_total, rate_total = 0.0, 0.0
            for idx in micro:
                ids = train_blocks[idx].to(device)
                loss, lm, rate = tuning_loss(routed, ids, keep_rate, settings.capacity_weight, objective=settings.objective)
                (loss / len(micro)).backward()
                lm_total += float(lm.detach()) / len(micro)
                rate_total += float(rate.detach()) / len(micro)
            optimizer.step()
            record = {"step": step + 1, "loss": round(lm_total, 6), "skip": round(1.0 - rate_total, 6)}
            history.append(record)
            display.update(step + 1, record)
            if settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 and step + 1 < total:
                _save_checkpoint(ckpt_dir, routed, optimizer, step + 1, settings, history, lora_params)
            if on_step is not None:
                on_step(step + 1, record)

    # ---- calibration and held-out measurement --------------------------------------------------------------------
    threshold = settings.threshold
    if settings.target_skip is not None and calib_blocks.shape[0] > 0:
        threshold = calibrate_threshold(routed, calib_blocks, settings.target_skip, settings.batch_size)
    routed.state.threshold = threshold
    routed.config.threshold = threshold
    scores = collect_scores(routed, heldout, settings.batch_size, threshold)
    rates, _ = execution_rates(scores, threshold)
    skip_ratio = 1.0 - sum(rates.values()) / max(len(rates), 1)
    base_ppl = routed_ppl = None
    if measure_perplexity:
        from ..evaluation.quality import perplexity

        with routed.mode("open"):
            base_ppl = perplexity(routed, heldout, batch_size=settings.batch_size)
        with routed.mode("hard"):
            routed_ppl = perplexity(routed, heldout, batch_size=settings.batch_size)

    routed.config.execution_rates = {str(k): round(v, 6) for k, v in sorted(rates.items())}
    routed.config.heldout = {
        "source": heldout_info.to_dict(),
        "blocks": int(heldout.shape[0]),
        "seq_len": settings.seq_len,
        "skip_ratio": round(skip_ratio, 6),
        "skip_ratio_of_all_layers": round(skip_ratio * len(rates) / n_layers, 6),
        "mean_router_score": {str(k): round(float(s.float().mean()), 6) for k, s in sorted(scores.items())},
        "base_perplexity": base_ppl,
        "routed_perplexity": routed_ppl,
    }
    routed.config.training = {
        **settings.to_dict(),
        "layers": layers,
        "train_blocks": int(train_blocks.shape[0]),
        "calibration_blocks": int(calib_blocks.shape[0]),
        "data_source": data_info.to_dict(),
        "steps_run": total,
        "final": history[-1] if history else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    routed.config.versions = package_versions()
    routed.save_pretrained(output_dir)
    if lora_params:
        from .lora import save_lora

        save_lora(lora_params, output_dir)
    write_json_atomic(output_dir / "history.json", history)
    return TuneResult(
        output_dir=output_dir,
        routed=routed,
        steps=total,
        threshold=threshold,
        heldout_skip_ratio=skip_ratio,
        execution_rates=rates,
        base_perplexity=base_ppl,
        routed_perplexity=routed_ppl,
        history=history,
        seconds=time.perf_counter() - t0,
    )


class _Progress:
    """A rich progress bar showing the LM loss and the current skip ratio (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]tuning routers"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  skip {task.fields[skip]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("tune", total=self.total, loss="-", skip="-")
        return self

    def advance_to(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def update(self, step: int, record: dict[str, float]) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=f"{record['loss']:.4f}", skip=f"{record['skip']:.1%}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def load_tuned(loaded: LoadedModel, router_dir: str | Path) -> RoutedModel:
    """Attach routers (and LoRA adapters, if tuned with them) from ``router_dir`` to ``loaded.model``."""
    router_dir = Path(router_dir)
    routed = RoutedModel.from_pretrained(loaded.model, router_dir)
    if routed.config.lora:
        from .lora import load_lora

        load_lora(loaded.model, loaded.adapter, routed.config.lora, router_dir)
    return routed

