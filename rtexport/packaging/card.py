"""The model card: README.md with Hub metadata, rendered from a pipeline report (``rtexport.report/1``).

Every number in the card is read from the report; what the report lacks is shown as "not measured". The YAML front
matter is built as a dict (:func:`card_metadata`) and written with ``yaml.safe_dump``; the markdown comes from
``templates/model_card.md.j2``, with the figures of :mod:`rtexport.packaging.plots` in ``plots/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ArtifactMismatch
from ..evaluation.compare import format_layers, quality_table
from ..fsutil import atomic_directory, read_artifact, write_text_atomic
from . import licenses, plots as figures

REPORT_FORMAT = "rtexport.report/1"
TEMPLATE_NAME = "model_card.md.j2"
CARD_NAME = "README.md"
NOTICE_NAME = "NOTICE"
PLOTS_DIR = "plots"
NOT_MEASURED = "not measured"
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
PAPERS = {
    "router-tuning": ("Router-Tuning", "https://arxiv.org/abs/2410.13184"),
    "attention-drop": ("Attention-Drop", "https://arxiv.org/abs/2406.15786"),
}
TARGETS = {"attn": "attention", "mlp": "MLP", "block": "decoder block"}


# ---- number formats (the test formats report values with these and looks for them in the card) --------------------
def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_ppl(x: Any) -> str:
    return NOT_MEASURED if _missing(x) else f"{float(x):.2f}"


def fmt_acc(x: Any) -> str:
    """An accuracy in [0, 1] as a percentage."""
    return NOT_MEASURED if _missing(x) else f"{100 * float(x):.1f}%"


def fmt_rate(x: Any) -> str:
    return NOT_MEASURED if _missing(x) else f"{100 * float(x):.1f}%"


def fmt_ratio(x: Any) -> str:
    return NOT_MEASURED if _missing(x) else f"{100 * float(x):.0f}%"


def fmt_speedup(x: Any) -> str:
    return NOT_MEASURED if _missing(x) else f"{float(x):.2f}×"


def fmt_seconds(x: Any) -> str:
    if _missing(x):
        return NOT_MEASURED
    x = float(x)
    if x >= 100:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{1e3 * x:.2f} ms"
    return f"{1e6 * x:.1f} µs"


def fmt_value(x: Any) -> str:
    """A parity measurement or tolerance."""
    if _missing(x):
        return NOT_MEASURED
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    x = float(x)
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.3g}"


def fmt_count(x: Any) -> str:
    if _missing(x):
        return NOT_MEASURED
    x = float(x)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def fmt_bytes(x: Any) -> str:
    if _missing(x):
        return NOT_MEASURED
    x = float(x)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def fmt_change(new: Any, old: Any) -> str:
    """Relative change of ``new`` against ``old`` ("+14.9%"), empty when either is missing."""
    if _missing(new) or _missing(old) or float(old) == 0:
        return ""
    return f"{100 * (float(new) / float(old) - 1):+.1f}%"


def fmt_points(new: Any, old: Any) -> str:
    """Difference of two accuracies in percentage points ("-2.0 pts"), empty when either is missing."""
    if _missing(new) or _missing(old):
        return ""
    return f"{100 * (float(new) - float(old)):+.1f} pts"


def compare_phrase(new: Any, old: Any, *, points: bool = False) -> str:
    """"12.3% lower" / "3.5 points higher" for ``new`` against ``old``; empty when either is missing."""
    if _missing(new) or _missing(old) or (not points and float(old) == 0):
        return ""
    if points:
        d = 100 * (float(new) - float(old))
        return f"{abs(d):.1f} points {'higher' if d > 0 else 'lower'}" if abs(d) >= 0.05 else "the same"
    d = 100 * (float(new) / float(old) - 1)
    return f"{abs(d):.1f}% {'higher' if d > 0 else 'lower'}" if abs(d) >= 0.05 else "the same"


FILTERS = {
    "ppl": fmt_ppl, "acc": fmt_acc, "rate": fmt_rate, "ratio": fmt_ratio, "speedup": fmt_speedup,
    "seconds": fmt_seconds, "value": fmt_value, "count": fmt_count, "nbytes": fmt_bytes, "layers": format_layers,
}


# ---- reading the report --------------------------------------------------------------------------------------------
def _read_report(report: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(report, Mapping):
        data = dict(report)
    else:
        data = read_artifact(report, what="rtexport pipeline report")
    if data.get("format") != REPORT_FORMAT:
        raise ArtifactMismatch(f"not an rtexport pipeline report (format {data.get('format')!r}, "
                               f"expected {REPORT_FORMAT!r})")
    return data


def _stage(report: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(status, results, the whole stage) of one stage; a stage that is absent has status "not run"."""
    stage = (report.get("stages") or {}).get(name) or {}
    return str(stage.get("status") or "not run"), dict(stage.get("results") or {}), dict(stage)


PACKAGING_STAGES = ("card", "push", "package")


def report_fingerprint(report: Mapping[str, Any]) -> str:
    """sha256 (first 16 hex digits) of the report's canonical JSON without its creation time and its packaging stages
    (which are written after the card), so the card names the measurements it was rendered from."""
    data = json.loads(json.dumps(report, default=str))
    data.pop("created", None)
    for name in PACKAGING_STAGES:
        (data.get("stages") or {}).pop(name, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _valid_repo_id(model_id: str | None) -> bool:
    if not model_id or os.path.isabs(model_id) or model_id.startswith((".", "~")) or ":" in model_id:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model_id)
    except Exception:  # HFValidationError: not a Hub id (a local folder or file)
        return False
    return True


def _short_name(model_id: str | None) -> str:
    return Path(str(model_id or "model").rstrip("/")).name or "model"


def package_name(report: Mapping[str, Any], name: str | None = None) -> str:
    """The derived model's name: ``name`` (checked against the base model's licence rule), or one made from the base
    model's name, the target and the skip ratio, conformed to the licence rule."""
    model_id = (report.get("model") or {}).get("model_id")
    if name:
        licenses.check_name(name, model_id)
        return name
    settings = report.get("settings") or {}
    target = settings.get("target") or "attn"
    ratio = settings.get("skip_ratio")
    suffix = f"rtexport-{target}" + ("" if _missing(ratio) else f"{round(100 * float(ratio))}")
    return licenses.conform_name(f"{_short_name(model_id)}-{suffix}", licenses.rule_for(model_id))


# ---- metadata --------------------------------------------------------------------------------------------------
def card_metadata(report: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The Hub YAML metadata of the card, as a dict (written with ``yaml.safe_dump``)."""
    report = _read_report(report)
    model = report.get("model") or {}
    model_id = model.get("model_id")
    meta: dict[str, Any] = {}
    if _valid_repo_id(model_id):
        meta["base_model"] = model_id
    meta["library_name"] = "transformers"
    license_id = licenses.license_id(model_id, model.get("license"))
    if license_id:
        meta["license"] = license_id
        rule = licenses.rule_for(model_id)
        if rule is not None:
            meta["license_link"] = rule.license_link
    tags = ["rtexport", "router-tuning"]
    prune_status, prune, _ = _stage(report, "prune")
    if prune_status == "done":
        tags.append("pruned")
        if prune.get("model_type"):
            tags.append(str(prune["model_type"]))
    export_status, export, _ = _stage(report, "export")
    if export_status == "done" and export:
        tags.append("onnx")
    meta["tags"] = list(dict.fromkeys(tags))
    meta["pipeline_tag"] = "text-generation"
    return meta


def front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card (``{}`` when it has none)."""
    import yaml

    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ArtifactMismatch("the model card's YAML block is not closed by a '---' line")
    data = yaml.safe_load(text[4:end + 1])
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArtifactMismatch("the model card's YAML block is not a mapping")
    return data


# ---- the card's content ----------------------------------------------------------------------------------------
def _plan(report: Mapping[str, Any], method: str) -> dict[str, Any] | None:
    _, results, _ = _stage(report, "plan")
    plan = results.get(method)
    return dict(plan) if isinstance(plan, Mapping) else None


def _int_keys(d: Mapping[Any, Any] | None) -> dict[int, float]:
    return {int(k): float(v) for k, v in (d or {}).items() if not _missing(v)}


def _entry_for(entries: Sequence[Mapping[str, Any]], method: str, skip: Sequence[int] | None,
               ratio: float | None) -> dict[str, Any] | None:
    """The evaluation entry of ``method`` with exactly these skipped layers, else the one nearest ``ratio``."""
    mine = [e for e in entries if e.get("method") == method]
    if skip is not None:
        for e in mine:
            if sorted(e.get("skipped_layers") or []) == sorted(skip):
                return dict(e)
    if ratio is None:
        return None
    near = [e for e in mine if not _missing(e.get("skip_ratio")) and abs(float(e["skip_ratio"]) - ratio) < 0.5 / 100]
    return dict(min(near, key=lambda e: abs(float(e["skip_ratio"]) - ratio))) if near else None


def _mean_acc(entry: Mapping[str, Any] | None) -> float | None:
    if not entry:
        return None
    value = entry.get("mean_acc")
    return None if _missing(value) else float(value)


def _quality(report: Mapping[str, Any], skip: list[int] | None, num_layers: int | None) -> dict[str, Any]:
    status, results, _ = _stage(report, "evaluate")
    entries = [dict(e) for e in results.get("entries") or [] if isinstance(e, Mapping)]
    settings = report.get("settings") or {}
    ratio = (len(skip) / num_layers) if skip is not None and num_layers else settings.get("skip_ratio")
    ratio = None if _missing(ratio) else float(ratio)
    base = next((dict(e) for e in entries if e.get("method") == "base"), None)
    rt = _entry_for(entries, "router-tuning", skip, ratio)
    if rt is not None and not _missing(rt.get("skip_ratio")):
        ratio = float(rt["skip_ratio"])
    ad = _entry_for(entries, "attention-drop", None, ratio)
    tasks: dict[str, int | None] = {}
    for e in entries:
        for task, r in (e.get("tasks") or {}).items():
            tasks.setdefault(task, (r or {}).get("n"))
    rows = []
    for label, entry, is_this in (("base model", base, False), ("Router-Tuning (this model)", rt, True),
                                  ("Attention-Drop, same skip ratio", ad, False)):
        if entry is None:
            continue
        ppl, acc = entry.get("perplexity"), _mean_acc(entry)
        rows.append({
            "label": label,
            "skipped": entry.get("skipped_layers") or [],
            "perplexity": ppl,
            "mean_acc": acc,
            "ppl_vs_base": "" if entry is base or base is None else fmt_change(ppl, base.get("perplexity")),
            "acc_vs_base": "" if entry is base or base is None else fmt_points(acc, _mean_acc(base)),
            "this": is_this,
        })
    return {
        "status": status,
        "entries": entries,
        "table": quality_table(entries) if entries else "",
        "rows": rows,
        "base": base,
        "router_tuning": rt,
        "attention_drop": ad,
        "ratio": ratio,
        "tasks": tasks,
        "backend": results.get("backend"),
        "note": results.get("note"),
        "ppl_rt_vs_ad": compare_phrase(rt.get("perplexity"), ad.get("perplexity")) if rt and ad else "",
        "acc_rt_vs_ad": compare_phrase(_mean_acc(rt), _mean_acc(ad), points=True) if rt and ad else "",
    }


def _speed(report: Mapping[str, Any]) -> dict[str, Any]:
    status, results, _ = _stage(report, "bench")
    rows = [dict(r) for r in results.get("rows") or [] if isinstance(r, Mapping) and r.get("cell") and r.get("variant")]
    cells = list(dict.fromkeys(str(r["cell"]) for r in rows))
    variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
    grid = {(str(r["cell"]), str(r["variant"])): r for r in rows}
    table = []
    for cell in cells:
        row = []
        for variant in variants:
            r = grid.get((cell, variant))
            if r is None or _missing(r.get("seconds")):
                row.append("–")
            else:
                row.append(fmt_seconds(r["seconds"]) + (f" ({fmt_speedup(r['speedup'])})"
                                                        if not _missing(r.get("speedup")) else ""))
        table.append((cell, row))
    device = dict(results.get("device") or report.get("device") or {})
    versions = dict(results.get("versions") or report.get("versions") or {})
    # the summary shows this model's variants, not the references (the full model, a hand-pruned ideal)
    headline = [(str(r["variant"]), str(r["cell"]), r["speedup"]) for r in rows
                if not str(r["variant"]).startswith(("full", "ideal")) and not _missing(r.get("speedup"))]
    return {
        "status": status, "rows": rows, "cells": cells, "variants": variants, "table": table,
        "device": device, "versions": versions, "method": results.get("method"), "note": results.get("note"),
        "headline": headline, "has_full": "full" in variants, "device_text": _device_text(device),
    }


def _device_text(device: Mapping[str, Any]) -> str:
    if not device:
        return NOT_MEASURED
    parts = [str(device.get("name") or device.get("type") or "unknown device")]
    if device.get("type") == "cuda":
        extra = [f"{device['memory_gib']} GiB" if device.get("memory_gib") else None,
                 f"CUDA {device['cuda']}" if device.get("cuda") else None,
                 f"{device['count']} GPUs visible" if (device.get("count") or 1) > 1 else None]
        parts += [e for e in extra if e]
    elif device.get("type") == "cpu":
        parts.insert(0, "CPU")
        if device.get("threads"):
            parts.append(f"{device['threads']} threads")
    return ", ".join(parts)


def _parity(report: Mapping[str, Any]) -> dict[str, Any]:
    status, results, _ = _stage(report, "validate")
    graphs = []
    for mode, r in results.items():
        if not isinstance(r, Mapping):
            continue
        checks = [dict(c) for c in r.get("checks") or [] if isinstance(c, Mapping)]
        passed = r.get("passed")
        if passed is None and checks:
            passed = all(bool(c.get("passed")) for c in checks)
        graphs.append({"mode": mode, "passed": passed, "checks": checks, "providers": r.get("providers"),
                       "dtype": r.get("dtype")})
    return {"status": status, "graphs": graphs}


def _folder_of(output: Any) -> str | None:
    """A stage's output as a folder: ``model/config.json`` -> ``model``."""
    if not output:
        return None
    p = Path(str(output))
    return (p.parent if p.suffix else p).as_posix()


def _exports(report: Mapping[str, Any], output_dir: Path,
             onnx_paths: Mapping[str, str] | None) -> list[dict[str, Any]]:
    """The ONNX graphs in the package: from the ``package-ort`` stage (folders with their file lists) or else from
    the ``export`` stage; ``onnx_paths`` (mode -> folder relative to the card) says where they sit in the package."""
    status, export, _ = _stage(report, "export")
    if status != "done":
        return []
    pkg_status, packaged, _ = _stage(report, "package-ort")
    if pkg_status != "done":
        packaged = {}
    out = []
    for mode in dict.fromkeys([*export, *packaged]):
        ex = export.get(mode) if isinstance(export.get(mode), Mapping) else {}
        pk = packaged.get(mode) if isinstance(packaged.get(mode), Mapping) else {}
        if pk.get("path"):
            folder, files = str(pk["path"]).rstrip("/"), pk.get("files")
        elif ex.get("path"):
            folder, files = Path(str(ex["path"])).parent.as_posix(), None
        else:
            continue
        if onnx_paths and mode in onnx_paths:
            folder = str(onnx_paths[mode]).rstrip("/") or "."

        def has(name: str) -> bool:
            return name in files if files is not None else (output_dir / folder / name).is_file()

        out.append({"mode": mode, "folder": folder, "path": f"{folder}/model.onnx", "dtype": ex.get("dtype"),
                    "runner": has("run_ort.py"), "genai": has("genai_config.json"),
                    "prefill_always": list(ex.get("prefill_always") or [])})
    return out


def _model_path(prune_status: str, prune_stage: Mapping[str, Any], output_dir: Path) -> str | None:
    """Where the pruned model folder is, relative to the card: the card's own folder when it holds the model."""
    if prune_status != "done":
        return None
    if (output_dir / "config.json").is_file():
        return "."
    return _folder_of(prune_stage.get("output")) or "."


def _one_line(text: Any) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "")
    return line.replace("|", "\\|")[:200]


def _calibration_text(plan: Mapping[str, Any] | None) -> str | None:
    calib = (plan or {}).get("calibration") or {}
    source = calib.get("source") or {}
    if not source and not calib.get("blocks"):
        return None
    parts = []
    if source.get("name"):
        what = "the embedded public-domain corpus" if source["name"] == "embedded" else f"`{source['name']}`"
        parts.append(what + (f" ({source['split']} split)" if source.get("split") else ""))
    if calib.get("blocks") and calib.get("seq_len"):
        parts.append(f"{calib['blocks']} blocks of {calib['seq_len']} tokens")
    if source.get("documents") is not None and source.get("characters") is not None:
        parts.append(f"{source['documents']} documents, {fmt_count(source['characters'])} characters")
    return ", ".join(parts) or None


def license_file(folder: str | os.PathLike) -> str | None:
    """The licence text shipped in ``folder``, if any."""
    return next((n for n in LICENSE_FILES if (Path(folder) / n).is_file()), None)


def card_context(report: Mapping[str, Any] | str | os.PathLike, output_dir: str | os.PathLike = ".", *,
                 name: str | None = None, repo_id: str | None = None, model_path: str | None = None,
                 onnx_paths: Mapping[str, str] | None = None,
                 plot_files: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything the template shows, read from the report (no number is computed here except relative changes)."""
    report = _read_report(report)
    output_dir = Path(output_dir)
    model = dict(report.get("model") or {})
    model_id = model.get("model_id") or "unknown model"
    settings = dict(report.get("settings") or {})
    rule = licenses.rule_for(model_id)
    if repo_id is None and isinstance(settings.get("push_to_hub"), str) and _valid_repo_id(settings["push_to_hub"]):
        repo_id = settings["push_to_hub"]
    if repo_id:
        licenses.check_name(repo_id.split("/")[-1], model_id)
    name = package_name(report, name or (repo_id.split("/")[-1] if repo_id else None))

    plan_rt, plan_ad = _plan(report, "router-tuning"), _plan(report, "attention-drop")
    plan_status, _, _ = _stage(report, "plan")
    tune_status, tune, tune_stage = _stage(report, "tune")
    prune_status, prune, prune_stage = _stage(report, "prune")
    num_layers = model.get("num_layers") or (plan_rt or plan_ad or {}).get("num_layers")
    target = settings.get("target") or (plan_rt or {}).get("target") or "attn"
    skip = (plan_rt or {}).get("skip")
    if skip is None and prune.get("skipped_attention_layers") is not None and target == "attn":
        skip = prune["skipped_attention_layers"]
    skip = None if skip is None else sorted(int(i) for i in skip)

    plan_rates = _int_keys((plan_rt or {}).get("scores"))
    heldout_rates = _int_keys(tune.get("execution_rates"))
    similarity = _int_keys((plan_ad or {}).get("scores"))
    ad_skip = set((plan_ad or {}).get("skip") or [])
    layers = sorted(set(plan_rates) | set(heldout_rates) | set(similarity))
    layer_rows = [{
        "layer": i,
        "rate": plan_rates.get(i), "heldout_rate": heldout_rates.get(i), "similarity": similarity.get(i),
        "skipped": skip is not None and i in skip, "ad_skipped": i in ad_skip,
    } for i in layers]

    kv = prune.get("kv_cache_bytes_per_token") or {}
    exports = _exports(report, output_dir, onnx_paths)
    model_dir = model_path if model_path is not None else _model_path(prune_status, prune_stage, output_dir)
    stages = []
    for k, v in (report.get("stages") or {}).items():
        v = v or {}
        if k in PACKAGING_STAGES:
            continue
        why = v.get("error") or (v.get("results") or {}).get("reason")
        stages.append({"name": k, "status": str(v.get("status") or "not run"), "seconds": v.get("seconds"),
                       "note": _one_line(why) if why else ""})
    command = report.get("command") or settings.get("command")
    if isinstance(command, (list, tuple)):
        import shlex

        command = shlex.join(str(c) for c in command)
    return {
        "meta": card_metadata(report),
        "name": name,
        "repo_id": repo_id,
        "rule": rule,
        "license": licenses.license_id(model_id, model.get("license")),
        "model": model,
        "model_id": model_id,
        "hub_base": _valid_repo_id(model_id),
        "settings": settings,
        "settings_json": json.dumps(settings, indent=2, sort_keys=True, default=str),
        "target": target,
        "target_name": TARGETS.get(target, target),
        "num_layers": num_layers,
        "skip": skip,
        "kept": None if skip is None or not num_layers else [i for i in range(int(num_layers)) if i not in skip],
        "ratio": (len(skip) / num_layers) if skip is not None and num_layers else settings.get("skip_ratio"),
        "license_file": license_file(output_dir),
        "plan_status": plan_status,
        "plan_rt": plan_rt,
        "plan_ad": plan_ad,
        "ad_skip": sorted(ad_skip) if plan_ad else None,
        "threshold": ((plan_rt or {}).get("calibration") or {}).get("threshold", tune.get("threshold")),
        "calibration": _calibration_text(plan_rt or plan_ad),
        "layer_rows": layer_rows,
        "has_rates": bool(plan_rates), "has_heldout": bool(heldout_rates), "has_similarity": bool(similarity),
        "tune_status": tune_status, "tune": tune, "tune_seconds": tune_stage.get("seconds"),
        "prune_status": prune_status, "prune": prune, "model_dir": model_dir,
        "kv_base": kv.get("base"), "kv_pruned": kv.get("pruned"),
        "kv_change": fmt_change(kv.get("pruned"), kv.get("base")),
        "params_change": fmt_change(prune.get("parameters"), model.get("parameters")),
        "vllm": prune_status == "done" and prune.get("model_type") == "nemotron-nas",
        "quality": _quality(report, skip, num_layers),
        "speed": _speed(report),
        "parity": _parity(report),
        "exports": exports,
        "stages": stages,
        "command": command,
        "created": report.get("created"),
        "rtexport_version": report.get("rtexport_version"),
        "fingerprint": model.get("fingerprint"),
        "report_fingerprint": report_fingerprint(report),
        "plots": dict(plot_files or {}),
        "papers": PAPERS,
        "not_measured": NOT_MEASURED,
    }


# ---- plots -----------------------------------------------------------------------------------------------------
def plot_data(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures this report has data for: file name -> a callable that draws it (PNG bytes)."""
    report = _read_report(report)
    model = report.get("model") or {}
    plan_rt = _plan(report, "router-tuning")
    _, tune, _ = _stage(report, "tune")
    target = (report.get("settings") or {}).get("target") or (plan_rt or {}).get("target") or "attn"
    num_layers = model.get("num_layers") or (plan_rt or {}).get("num_layers")
    out: dict[str, Any] = {}

    rates, title = _int_keys((plan_rt or {}).get("scores")), "Router execution rate per layer (calibration text)"
    if not rates:
        rates, title = _int_keys(tune.get("execution_rates")), "Router execution rate per layer (held-out text)"
    if rates:
        skip = (plan_rt or {}).get("skip") or []
        out["router_execution_rates.png"] = lambda: figures.execution_rates_png(
            rates, skip, num_layers=num_layers, title=title, what=TARGETS.get(target, target))

    _, evaluation, _ = _stage(report, "evaluate")
    entries = [e for e in evaluation.get("entries") or [] if isinstance(e, Mapping)]
    series: dict[str, list[tuple[float, float | None, float | None]]] = {}
    for e in entries:
        if e.get("method") in ("router-tuning", "attention-drop") and not _missing(e.get("skip_ratio")):
            if _missing(e.get("perplexity")) and _mean_acc(e) is None:
                continue
            ppl = None if _missing(e.get("perplexity")) else float(e["perplexity"])
            series.setdefault(str(e["method"]), []).append((float(e["skip_ratio"]), ppl, _mean_acc(e)))
    if series:
        base = next((e for e in entries if e.get("method") == "base"), None)
        base_point = None if base is None else (
            None if _missing(base.get("perplexity")) else float(base["perplexity"]), _mean_acc(base))
        skip = (plan_rt or {}).get("skip")
        current = len(skip) / num_layers if skip is not None and num_layers else None
        out["quality_vs_skip_ratio.png"] = lambda: figures.quality_vs_skip_ratio_png(
            series, base_point, current_ratio=current)

    speed = _speed(report)
    if any(not _missing(r.get("speedup")) for r in speed["rows"]):
        rows = speed["rows"]
        out["speed.png"] = lambda: figures.speed_png(rows)
    return out


def render_plots(report: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, str]:
    """Write the figures the report has data for into ``output_dir/plots`` (replaced as a whole, atomically; removed
    when there is nothing to draw). Returns file name -> path relative to ``output_dir``."""
    output_dir = Path(output_dir)
    target = output_dir / PLOTS_DIR
    drawers = plot_data(report)
    if not drawers:
        if target.is_dir():
            shutil.rmtree(target)
        return {}
    with atomic_directory(target) as staging:
        for file_name, draw in drawers.items():
            (staging / file_name).write_bytes(draw())
    return {file_name: f"{PLOTS_DIR}/{file_name}" for file_name in drawers}


# ---- rendering -------------------------------------------------------------------------------------------------
def template_source() -> str:
    """The card template's text: ``rtexport.templates`` in a wheel (a namespace package, so it is read through
    importlib.resources, not as a folder path), ``templates/`` in a source checkout."""
    try:
        import importlib.resources

        ref = importlib.resources.files("rtexport.templates") / TEMPLATE_NAME
        if ref.is_file():
            return ref.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        pass
    return (Path(__file__).resolve().parents[2] / "templates" / TEMPLATE_NAME).read_text(encoding="utf-8")


def render_markdown(context: Mapping[str, Any]) -> str:
    """The card's text: the YAML block from ``context['meta']`` and the template's markdown."""
    import jinja2
    import yaml

    env = jinja2.Environment(autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters.update(FILTERS)
    body = env.from_string(template_source()).render(**context)
    header = yaml.safe_dump(dict(context["meta"]), sort_keys=False, allow_unicode=True, default_flow_style=False)
    text = f"---\n{header}---\n\n{body.strip()}\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


def render_card(report: Mapping[str, Any] | str | os.PathLike, output_dir: str | os.PathLike, *, plots: bool = True,
                name: str | None = None, repo_id: str | None = None, model_path: str | None = None,
                onnx_paths: Mapping[str, str] | None = None) -> Path:
    """Write ``output_dir/README.md`` (and ``plots/*.png``; ``NOTICE`` where the base model's licence asks for one)
    from a pipeline report (a dict or the path of report.json). Returns the card's path.

    ``output_dir`` is the folder that becomes the repository's root. Paths in the card are relative to it:
    ``model_path`` is the pruned model folder (default: ``"."`` when ``output_dir`` holds ``config.json``, else the
    prune stage's output); ``onnx_paths`` maps an ONNX mode to its package folder (default: the ``package-ort`` or
    ``export`` stage's output), e.g. ``{"static": "onnx/static"}`` when those are uploaded under ``onnx/``.
    ``name``: the model's name in the card (default: made from the base model's name, the target and the skip ratio);
    ``repo_id``: the Hub repository it goes to (default: the report's ``settings.push_to_hub``); the load
    instructions then name it. Both are checked against the base model's licence rule (e.g. Llama 3 derivatives'
    names begin with "Llama-3"). ``plots=False`` draws no figures (and removes an older ``plots/`` folder, so the
    card never ships stale ones).
    """
    data = _read_report(report)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # names are checked before anything is written
    context = card_context(data, output_dir, name=name, repo_id=repo_id, model_path=model_path, onnx_paths=onnx_paths)
    if plots:
        plot_files = render_plots(data, output_dir)
    else:
        plot_files = {}
        if (output_dir / PLOTS_DIR).is_dir():
            shutil.rmtree(output_dir / PLOTS_DIR)
    context["plots"] = plot_files
    text = render_markdown(context)
    front_matter(text)  # the YAML must parse, or the Hub rejects the card
    rule = context["rule"]
    if rule is not None:
        write_text_atomic(output_dir / NOTICE_NAME, rule.notice + "\n")
    return write_text_atomic(output_dir / CARD_NAME, text)
