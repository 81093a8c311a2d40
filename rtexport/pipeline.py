"""tune-and-export: the stages in order, each skipped when its valid output already exists.

    tune -> plan -> prune (hf) -> export-onnx (static, gated) -> validate -> package-ort -> evaluate -> bench -> card

Every stage writes its artifact into the run folder plus a record ``stages/<name>.json`` (status, the key of the
settings and inputs it was made from, results, seconds). A rerun skips a stage whose record's key matches and whose
output is present, so an interrupted job resumes where it stopped; ``force=True`` redoes everything. ``report.json``
gathers every stage's record, the versions and the device.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import DataError, ValidationFailed
from .fsutil import read_json, write_json_atomic
from .versions import device_description, package_versions

FORMATS = ("hf", "ort-gpu", "both")


@dataclass
class PipelineSettings:
    model: str = "embedded:smollm2"
    output: str = "rtexport-out"
    target: str = "attn"
    skip_ratio: float = 0.25
    format: str = "both"
    layers: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    # tuning
    data: str | None = None
    seq_len: int = 256
    max_samples: int | None = 64
    batch_size: int = 4
    steps: int | None = 16
    lr: float = 1e-2
    optimizer: str = "shared-adam"
    gates: str = "sampled"
    objective: str = "lm"
    repeat_fraction: float = 0.0
    capacity_weight: float = 5.0
    seed: int = 0
    calibration_blocks: int = 16
    # export / validation
    onnx_modes: tuple[str, ...] = ("static", "gated")
    onnx_dtype: str = "auto"
    opset: int = 23
    attention: str = "auto"
    kv_cache: str = "growing"  # the static graph's KV cache: growing, or preallocated (CUDA-graph decode)
    logits: str = "all"  # the graphs' logits: all (every token, GenAI's layout) or selected (logits_positions input)
    atol: float | None = None
    validate_steps: int = 16
    # evaluation
    eval_tasks: str | None = "arc_easy,piqa"
    eval_limit: int | None = 100
    eval_backend: str = "auto"
    heldout_blocks: int = 16
    # benchmark
    bench: bool = True
    bench_reps: int = 3
    # hub
    push_to_hub: str | None = None
    private: bool = False
    dry_run: bool = False
    force: bool = False
    command: str | None = None

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 0.0 <= self.skip_ratio < 1.0:
            raise DataError(f"--skip-ratio must be in [0, 1), got {self.skip_ratio}")
        if self.target != "attn" and self.format != "hf":
            raise DataError("ONNX export covers --target attn; use --format hf for mlp or block routing")
        if self.format != "hf":  # a bad --opset/--attention fails now, not after tuning
            from .onnx.export import check_export_options

            # the static graph's settings (the gated graph is exported with ONNX Attention when these ask for gqa)
            check_export_options(mode="static", opset=self.opset, attention=self.attention, kv_cache=self.kv_cache,
                                 logits=self.logits)

    def key(self, *names: str) -> str:
        d = asdict(self)
        blob = json.dumps({n: d[n] for n in names}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRecord:
    name: str
    status: str
    key: str
    seconds: float = 0.0
    output: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Pipeline:
    """One run folder, its stages, and the shared state between them (the loaded model is loaded once)."""

    def __init__(self, settings: PipelineSettings, *, progress: bool = True, console: Any = None):
        settings.validate()
        self.s = settings
        self.out = Path(settings.output)
        self.progress = progress
        if console is None:
            from rich.console import Console

            console = Console(stderr=True, quiet=not progress)
        self.console = console
        self._loaded = None
        self.records: dict[str, StageRecord] = {}
        self.failed_validation: list[str] = []

    # ---- shared state ------------------------------------------------------------------------------------------
    @property
    def loaded(self):
        if self._loaded is None:
            from .models.loading import load_model

            dtype = self.s.dtype
            if dtype == "auto":
                import torch

                cuda = self.s.device.startswith("cuda") or (self.s.device == "auto" and torch.cuda.is_available())
                dtype = "bfloat16" if cuda else "float32"
            with self.console.status(f"loading {self.s.model}"):
                self._loaded = load_model(self.s.model, revision=self.s.revision, dtype=dtype, device=self.s.device,
                                          trust_remote_code=self.s.trust_remote_code)
        return self._loaded

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def wants_hf(self) -> bool:
        return self.s.format in ("hf", "both")

    def wants_onnx(self) -> bool:
        return self.s.format in ("ort-gpu", "both")

    # ---- stage bookkeeping ---------------------------------------------------------------------------------------
    def _record_path(self, name: str) -> Path:
        return self.path("stages", f"{name}.json")

    def _valid_record(self, name: str, key: str, output: str | None) -> StageRecord | None:
        p = self._record_path(name)
        if self.s.force or not p.is_file():
            return None
        try:
            rec = StageRecord(**read_json(p))
        except (TypeError, json.JSONDecodeError):
            return None
        if rec.key != key or rec.status != "done":
            return None
        if output is not None and not self.path(output).exists():
            return None
        return rec

    def run_stage(self, name: str, key: str, output: str | None, fn: Callable[[], dict[str, Any]],
                  always: bool = False) -> StageRecord:
        """Run ``fn`` unless a valid record of this stage (same key, output present) exists; ``always`` reruns it."""
        rec = None if always else self._valid_record(name, key, output)
        if rec is not None:
            self.console.print(f"[dim]• {name}: up to date ({self._record_path(name)})[/]")
            rec.status = "done"
            self.records[name] = rec
            return rec
        self.console.print(f"[bold cyan]• {name}[/]")
        t0 = time.perf_counter()
        results = fn()
        rec = StageRecord(name=name, status="done", key=key, seconds=round(time.perf_counter() - t0, 2),
                          output=output, results=results)
        write_json_atomic(self._record_path(name), asdict(rec))
        self.records[name] = rec
        return rec

    def skip_stage(self, name: str, why: str) -> None:
        self.records[name] = StageRecord(name=name, status="not run", key="", results={"reason": why})

    # ---- stages ------------------------------------------------------------------------------------------------
    def candidates(self) -> list[int]:
        from .routing.config import parse_layers

        return parse_layers(self.s.layers, self.loaded.model.config.num_hidden_layers)

    def skip_count(self) -> int:
        from .planning import resolve_skip_count

        n = self.loaded.model.config.num_hidden_layers
        return resolve_skip_count(n, len(self.candidates()), self.s.skip_ratio, None)

    def stage_tune(self) -> StageRecord:
        from .tuning.trainer import TuneSettings, tune

        key = self.s.key("model", "revision", "dtype", "target", "layers", "skip_ratio", "data", "seq_len",
                         "max_samples", "batch_size", "steps", "lr", "optimizer", "gates", "objective", "repeat_fraction", "capacity_weight", "seed",
                         "calibration_blocks", "heldout_blocks")

        def run() -> dict[str, Any]:
            cand = self.candidates()
            settings = TuneSettings(
                target=self.s.target, layers=cand, target_skip=min(self.skip_count() / len(cand), 0.95),
                capacity_weight=self.s.capacity_weight, seq_len=self.s.seq_len, max_samples=self.s.max_samples,
                batch_size=self.s.batch_size, steps=self.s.steps, lr=self.s.lr, optimizer=self.s.optimizer, gates=self.s.gates,
                objective=self.s.objective, repeat_fraction=self.s.repeat_fraction,
                seed=self.s.seed, calibration_blocks=self.s.calibration_blocks, eval_blocks=self.s.heldout_blocks,
                data=self.s.data,
            )
            result = tune(self.loaded, settings, self.path("routers"), progress=self.progress)
            result.routed.unwrap()
            return {
                "threshold": result.threshold,
                "target_skip_of_routed": settings.target_skip,
                "heldout_skip_ratio": result.heldout_skip_ratio,
                "execution_rates": {str(k): v for k, v in sorted(result.execution_rates.items())},
                "base_perplexity": result.base_perplexity,
                "routed_perplexity": result.routed_perplexity,
                "steps": result.steps,
                "final": result.history[-1] if result.history else None,
            }

        return self.run_stage("tune", key, "routers", run)

    def stage_plan(self, tune_key: str) -> StageRecord:
        from .planning import make_plan

        key = _hash(tune_key, self.s.key("skip_ratio", "layers", "calibration_blocks"))

        def run() -> dict[str, Any]:
            k = self.skip_count()
            common = dict(skip_layers=k, data=self.s.data, seq_len=self.s.seq_len, blocks=self.s.calibration_blocks)
            rt = make_plan(self.loaded, method="router-tuning", routers=self.path("routers"), **common)
            ad = make_plan(self.loaded, method="attention-drop", layers=self.candidates(), target=self.s.target, **common)
            rt.save(self.path("plans", "router-tuning.json"))
            ad.save(self.path("plans", "attention-drop.json"))
            return {"router-tuning": rt.to_dict(), "attention-drop": ad.to_dict()}

        return self.run_stage("plan", key, "plans/router-tuning.json", run)

    def plan(self, method: str = "router-tuning"):
        from .planning import SkipPlan

        return SkipPlan.load(self.path("plans", f"{method}.json"))

    def stage_prune(self, plan_key: str) -> StageRecord:
        from .pruning import prune

        key = _hash(plan_key, self.s.key("dtype"))

        def run() -> dict[str, Any]:
            plan = self.plan()
            folder = prune(self.loaded, plan, self.path("model"))
            cfg = self.loaded.model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            per_layer = 2 * cfg.num_key_value_heads * head_dim * self.loaded.model.dtype.itemsize
            files = sorted(folder.glob("*.safetensors"))
            from .pruning import read_manifest

            manifest = read_manifest(folder)
            return {
                "parameters": manifest.get("parameters") or manifest.get("pruned_parameters"),
                "model_type": json.loads((folder / "config.json").read_text()).get("model_type"),
                "kept_attention_layers": plan.kv_layers(),
                "skipped_attention_layers": plan.skip,
                "weights_bytes": sum(f.stat().st_size for f in files),
                "kv_cache_bytes_per_token": {"base": per_layer * cfg.num_hidden_layers, "pruned": per_layer * len(plan.kv_layers())},
            }

        return self.run_stage("prune", key, "model/config.json", run)

    def _onnx_dtype(self) -> str:
        if self.s.onnx_dtype != "auto":
            return self.s.onnx_dtype
        return "float16" if self.loaded.device.type == "cuda" else "float32"

    def stage_export(self, plan_key: str) -> StageRecord:
        from .onnx.export import export_onnx, load_export_info
        from .tuning.trainer import load_tuned

        key = _hash(plan_key, self.s.key("onnx_modes", "onnx_dtype", "opset", "attention", "kv_cache", "logits"))

        def run() -> dict[str, Any]:
            results: dict[str, Any] = {}
            plan = self.plan()
            for mode in self.s.onnx_modes:
                target = self.path("onnx-build", mode)
                if mode == "static":
                    path = export_onnx(self.loaded, target, mode="static", plan=plan, dtype=self._onnx_dtype(), opset=self.s.opset,
                                       attention=self.s.attention, kv_cache=self.s.kv_cache, logits=self.s.logits)
                else:
                    routed = load_tuned(self.loaded, self.path("routers"))
                    try:
                        # GroupQueryAttention writes a preallocated cache, which a gated graph does not keep
                        attention = "auto" if self.s.attention == "gqa" else self.s.attention
                        path = export_onnx(self.loaded, target, mode="gated", routed=routed, dtype=self._onnx_dtype(), opset=self.s.opset,
                                           attention=attention, logits=self.s.logits)
                    finally:
                        routed.unwrap()
                info = load_export_info(path.parent)
                results[mode] = {"path": str(path.relative_to(self.out)), "dtype": self._onnx_dtype(), "opset": self.s.opset,
                                 "attention": info.get("attention"),
                                 "bytes": sum(f.stat().st_size for f in path.parent.glob("model.onnx*"))}
                if mode == "gated":  # the routed layers that run without an If at prefill (by execution rate)
                    results[mode]["prefill_always"] = list(info["spec"].get("prefill_always", []))
            return results

        return self.run_stage("export", key, "onnx-build", run)

    def stage_validate(self, export_key: str) -> StageRecord:
        from .evaluation.parity import parity_table, reference_for, validate
        from .tuning.trainer import load_tuned

        key = _hash(export_key, self.s.key("atol", "validate_steps"))

        def run() -> dict[str, Any]:
            results: dict[str, Any] = {}
            plan = self.plan()
            for mode in self.s.onnx_modes:
                routed = load_tuned(self.loaded, self.path("routers")) if mode == "gated" else None
                try:
                    with reference_for(self.loaded, plan if mode == "static" else None, routed) as reference:
                        report = validate(reference, self.path("onnx-build", mode), tokenizer=self.loaded.tokenizer,
                                          atol=self.s.atol, steps=self.s.validate_steps)
                finally:
                    if routed is not None:
                        routed.unwrap()
                self.console.print(parity_table(report))
                write_json_atomic(self.path("onnx-build", mode, "parity_report.json"), report.to_dict())
                results[mode] = {**report.to_dict(), "passed": report.passed}
            return results

        rec = self.run_stage("validate", key, None, run)
        self.failed_validation = [m for m, r in rec.results.items() if not r.get("passed")]
        return rec

    def stage_package_ort(self, validate_key: str) -> StageRecord:
        from .onnx.package import package_ort_gpu

        key = _hash(validate_key, "package")

        def run() -> dict[str, Any]:
            results = {}
            for mode in self.s.onnx_modes:
                dest = self.path("onnx", mode)
                report = self.path("onnx-build", mode, "parity_report.json")
                package_ort_gpu(self.path("onnx-build", mode), dest, report, allow_failed=True)
                results[mode] = {"path": str(dest.relative_to(self.out)), "files": sorted(p.name for p in dest.iterdir())}
            return results

        return self.run_stage("package-ort", key, "onnx", run)

    def stage_evaluate(self, plan_key: str) -> StageRecord:
        from .evaluation.plan_quality import evaluate_plans, mean_accuracy
        from .evaluation.tasks import choose_backend
        from .errors import MissingDependency
        from .tuning.data import load_blocks

        key = _hash(plan_key, self.s.key("eval_tasks", "eval_limit", "eval_backend", "heldout_blocks"))

        def run() -> dict[str, Any]:
            heldout, info = load_blocks(self.loaded.tokenizer, self.s.data, split="heldout", seq_len=self.s.seq_len,
                                        max_blocks=self.s.heldout_blocks)
            tasks = [t for t in (self.s.eval_tasks or "").split(",") if t]
            note, backend = None, None
            if tasks:
                try:
                    backend = choose_backend(self.s.eval_backend)
                except MissingDependency as e:
                    note, tasks = f"task accuracy not measured: {e}", []
                    self.console.print(f"[yellow]{note}[/]")
            entries = evaluate_plans(self.loaded, [self.plan("router-tuning"), self.plan("attention-drop")], heldout,
                                     tasks=tasks, limit=self.s.eval_limit, backend=self.s.eval_backend,
                                     batch_size=self.s.batch_size, progress=self.progress)
            for e in entries:
                e["mean_acc"] = mean_accuracy(e)
            return {"entries": entries, "backend": backend, "note": note, "heldout": info.to_dict(),
                    "heldout_blocks": int(heldout.shape[0]), "seq_len": self.s.seq_len}

        return self.run_stage("evaluate", key, None, run)

    def stage_bench(self, upstream_key: str) -> StageRecord:
        from . import bench_run as bench_mod

        key = _hash(upstream_key, self.s.key("bench_reps", "device"))

        def run() -> dict[str, Any]:
            return bench_mod.bench_run_folder(self.out, self.loaded, reps=self.s.bench_reps,
                                              onnx=self.wants_onnx(), hf=self.wants_hf(), progress=self.progress)

        return self.run_stage("bench", key, None, run)

    def report(self) -> dict[str, Any]:
        loaded = self.loaded
        cfg = loaded.model.config
        return {
            "format": "rtexport.report/1",
            "rtexport_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": self.s.command,
            "model": {
                **loaded.source.to_dict(),
                "fingerprint": loaded.fingerprint,
                "model_type": cfg.model_type,
                "num_layers": cfg.num_hidden_layers,
                "hidden_size": cfg.hidden_size,
                "parameters": sum(p.numel() for p in loaded.model.parameters()),
                "license": self._license(),
            },
            "settings": asdict(self.s),
            "device": device_description(loaded.device),
            "versions": package_versions(),
            "stages": {name: asdict(rec) for name, rec in self.records.items()},
        }

    def _license(self) -> str | None:
        if not hasattr(self, "_license_value"):
            from .packaging.licenses import license_for

            src = self.loaded.source
            self._license_value = license_for(src.model_id, local_path=src.local_path, gguf_file=src.gguf_file,
                                              revision=src.revision)
        return self._license_value

    def stage_card(self) -> StageRecord:
        from .packaging.card import render_card

        def run() -> dict[str, Any]:
            report = self.report()
            if self.wants_hf():
                render_card(report, self.path("model"))
                return {"cards": ["model/README.md"]}
            render_card(report, self.path("onnx"), onnx_paths={m: m for m in self.s.onnx_modes})
            return {"cards": ["onnx/README.md"]}

        return self.run_stage("card", "", None, run, always=True)

    def stage_push(self) -> StageRecord:
        from .packaging.hub import push_to_hub

        def run() -> dict[str, Any]:
            folder = self.path("model") if self.wants_hf() else self.path("onnx")
            result = push_to_hub(folder, self.s.push_to_hub, private=self.s.private, dry_run=self.s.dry_run)
            if self.wants_hf() and self.wants_onnx():
                extra = push_to_hub(self.path("onnx"), self.s.push_to_hub, private=self.s.private,
                                    dry_run=self.s.dry_run, path_in_repo="onnx")
                return {"model": _as_dict(result), "onnx": _as_dict(extra)}
            return {"model": _as_dict(result)}

        return self.run_stage("push", "", None, run, always=True)

    # ---- the whole job -----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.s.push_to_hub:  # a repo name the base model's licence forbids fails now, not after the slow stages
            from .models.loading import describe_source
            from .packaging.licenses import check_name

            check_name(self.s.push_to_hub.split("/")[-1], describe_source(self.s.model, self.s.revision).model_id)
        self.out.mkdir(parents=True, exist_ok=True)
        t = self.stage_tune()
        p = self.stage_plan(t.key)
        if self.wants_hf():
            self.stage_prune(p.key)
        else:
            self.skip_stage("prune", "--format ort-gpu")
        if self.wants_onnx():
            e = self.stage_export(p.key)
            v = self.stage_validate(e.key)
            self.stage_package_ort(v.key)
        else:
            for name in ("export", "validate", "package-ort"):
                self.skip_stage(name, "--format hf")
        self.stage_evaluate(p.key)
        if self.s.bench:
            self.stage_bench(p.key)
        else:
            self.skip_stage("bench", "--no-bench")
        self.stage_card()
        report = self.report()
        write_json_atomic(self.path("report.json"), report)
        if self.s.push_to_hub:
            if self.failed_validation and not self.s.dry_run:
                raise ValidationFailed(f"not pushing: parity checks failed for {', '.join(self.failed_validation)}")
            self.stage_push()
            report = self.report()
            write_json_atomic(self.path("report.json"), report)
        if self.failed_validation:
            raise ValidationFailed(
                f"parity checks failed for {', '.join(self.failed_validation)} (see {self.path('report.json')})"
            )
        return report


def _hash(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj


def tune_and_export(settings: PipelineSettings | None = None, *, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run the whole job; returns the report (also written to ``<output>/report.json``)."""
    settings = settings or PipelineSettings()
    for k, v in overrides.items():
        setattr(settings, k, v)
    if settings.command is None:
        settings.command = " ".join(["rtexport", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("rtexport") else None
    return Pipeline(settings, progress=progress).run()
