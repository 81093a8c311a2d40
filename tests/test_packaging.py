"""Packaging stage: the model card (YAML metadata, numbers from the report), its plots, licence rules, Hub upload."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from rtexport.errors import RtexportError
from rtexport.evaluation.compare import format_layers
from rtexport.packaging import card as card_mod
from rtexport.packaging import hub, licenses
from rtexport.packaging.card import (
    card_metadata, fmt_acc, fmt_ppl, fmt_rate, fmt_seconds, fmt_speedup, fmt_value, front_matter, render_card,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_LAYERS = 30
CANDIDATES = list(range(15, 29))
RT_SKIP = [17, 19, 20, 22, 23, 25, 26, 27]
AD_SKIP = [18, 21, 22, 24, 25, 26, 27, 28]


def _plan(method: str, skip: list[int], scores: dict[int, float], **extra) -> dict:
    """As SkipPlan.to_dict() writes it."""
    return {
        "format": "rtexport.skip_plan/1", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "fingerprint": "3f2a9c0d41b7e885", "num_layers": NUM_LAYERS, "target": "attn", "method": method,
        "skip": skip, "candidates": CANDIDATES, "scores": {str(k): v for k, v in scores.items()},
        "calibration": {"source": {"name": "embedded", "split": "train", "documents": 41, "characters": 1803311},
                        "blocks": 32, "seq_len": 512, **extra},
        "base_revision": None, "base_gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "skip_ratio": round(len(skip) / NUM_LAYERS, 6), "kept": [i for i in range(NUM_LAYERS) if i not in skip],
    }


def _entry(method: str, skip: list[int], ppl: float, accs: dict[str, float]) -> dict:
    tasks = {t: {"acc": a, "acc_norm": a - 0.013, "n": 200} for t, a in accs.items()}
    return {"method": method, "skip_ratio": len(skip) / NUM_LAYERS, "skipped_layers": skip, "perplexity": ppl,
            "tasks": tasks, "mean_acc": sum(accs.values()) / len(accs)}


def make_report() -> dict:
    """A report as rtexport/pipeline.py writes it (format rtexport.report/1), with every stage done."""
    rates = {i: round(0.31 + 0.047 * ((i * 7) % 13), 4) for i in CANDIDATES}
    for i in RT_SKIP:
        rates[i] = round(rates[i] * 0.25, 4)
    sims = {i: round(0.80 + 0.011 * (i - 15), 4) for i in CANDIDATES}
    device = {"type": "cuda", "name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0", "count": 1}
    versions = {"python": "3.12.3", "rtexport": "0.1.0", "torch": "2.11.0+cu130", "transformers": "5.17.0",
                "onnxruntime": "1.30.0"}
    skip12 = RT_SKIP[:4]
    return {
        "format": "rtexport.report/1", "rtexport_version": "0.1.0", "created": "2026-11-30T04:12:55+00:00",
        "command": "rtexport tune-and-export embedded:smollm2 --target attn --skip-ratio 0.25 --format both -o out",
        "model": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": None,
                  "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "fingerprint": "3f2a9c0d41b7e885",
                  "model_type": "llama", "num_layers": NUM_LAYERS, "hidden_size": 576, "parameters": 134515008,
                  "license": "apache-2.0"},
        "settings": {"target": "attn", "skip_ratio": 0.25, "format": "both", "steps": 16, "seq_len": 512},
        "device": device, "versions": versions,
        "stages": {
            "tune": {"status": "done", "seconds": 412.7, "output": "routers",
                     "results": {"threshold": 0.4913, "heldout_skip_ratio": 0.2571,
                                 "execution_rates": {str(k): round(v * 0.98, 4) for k, v in rates.items()},
                                 "base_perplexity": 43.6177, "routed_perplexity": 50.1342, "steps": 16}},
            "plan": {"status": "done", "seconds": 31.0, "results": {
                "router-tuning": _plan("router-tuning", RT_SKIP, rates, threshold=0.4913, routers="routers"),
                "attention-drop": _plan("attention-drop", AD_SKIP, sims)}},
            "prune": {"status": "done", "seconds": 8.2, "output": "model", "results": {
                "model_type": "nemotron-nas", "kept_attention_layers": [i for i in range(NUM_LAYERS) if i not in RT_SKIP],
                "skipped_attention_layers": RT_SKIP, "parameters": 126552384,
                "kv_cache_bytes_per_token": {"base": 46080, "pruned": 33792}}},
            "export": {"status": "done", "seconds": 95.4, "output": "onnx", "results": {
                "static": {"path": "onnx/static/model.onnx", "dtype": "float32"},
                "gated": {"path": "onnx/gated/model.onnx", "dtype": "float32"}}},
            "validate": {"status": "done", "seconds": 20.5, "results": {
                "static": {"passed": True, "checks": [
                    {"name": "max_abs_logits", "value": 2.384e-05, "tolerance": 0.001, "passed": True},
                    {"name": "greedy_agreement", "value": 1.0, "tolerance": 1.0, "passed": True}]},
                "gated": {"passed": True, "checks": [
                    {"name": "max_abs_logits", "value": 3.1e-05, "tolerance": 0.001, "passed": True},
                    {"name": "decisions", "value": 1.0, "tolerance": 1.0, "passed": True}]}}},
            "evaluate": {"status": "done", "seconds": 301.0, "results": {
                "backend": "offline", "note": "200 items per task, seed 0.",
                "entries": [
                    _entry("base", [], 43.6177, {"arc_easy": 0.615, "piqa": 0.67}),
                    _entry("router-tuning", skip12, 46.9021, {"arc_easy": 0.6, "piqa": 0.665}),
                    _entry("attention-drop", AD_SKIP[:4], 52.4410, {"arc_easy": 0.585, "piqa": 0.655}),
                    _entry("router-tuning", RT_SKIP, 50.1342, {"arc_easy": 0.58, "piqa": 0.645}),
                    _entry("attention-drop", AD_SKIP, 71.9388, {"arc_easy": 0.535, "piqa": 0.62}),
                ]}},
            "bench": {"status": "done", "seconds": 64.0, "results": {
                "device": device, "versions": versions, "method": "static cache + CUDA graphs",
                "rows": [
                    {"variant": "full", "cell": "prefill_b1_p2048", "seconds": 0.01873, "speedup": 1.0},
                    {"variant": "pruned", "cell": "prefill_b1_p2048", "seconds": 0.01617, "speedup": 1.1583},
                    {"variant": "full", "cell": "decode_b16_p4096_n256", "seconds": 7.412, "speedup": 1.0},
                    {"variant": "pruned", "cell": "decode_b16_p4096_n256", "seconds": 6.031, "speedup": 1.229},
                    {"variant": "onnx-static", "cell": "prefill_b1_p2048", "seconds": 0.02211, "speedup": 0.8471},
                ]}},
        },
    }


def _render(tmp_path, report, **kwargs):
    kwargs.setdefault("plots", False)  # drawing is tested on its own (test_plots_are_pngs_written_only_with_data)
    path = render_card(report, tmp_path / "pkg", **kwargs)
    return path, path.read_text(encoding="utf-8")


# ---- metadata ----------------------------------------------------------------------------------------------------
def test_card_yaml_parses_and_has_hub_metadata(tmp_path):
    path, text = _render(tmp_path, make_report())
    assert path.name == "README.md"
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == front_matter(text) == card_metadata(make_report())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["tags"] == ["rtexport", "router-tuning", "pruned", "nemotron-nas", "onnx"]


def test_metadata_follows_the_stages_and_never_invents_a_licence():
    report = make_report()
    report["model"]["license"] = None
    report["model"]["model_id"] = "/data/models/my-llama"  # a local folder is no Hub base_model
    del report["stages"]["export"]
    report["stages"]["prune"]["results"]["model_type"] = "rtexport-pruned"
    meta = card_metadata(report)
    assert "license" not in meta and "base_model" not in meta
    assert meta["tags"] == ["rtexport", "router-tuning", "pruned", "rtexport-pruned"]


def test_rejects_what_is_not_a_report(tmp_path):
    with pytest.raises(RtexportError, match="not an rtexport pipeline report"):
        render_card({"format": "something else"}, tmp_path)
    with pytest.raises(RtexportError, match="report not found"):
        render_card(tmp_path / "missing.json", tmp_path)


# ---- numbers ---------------------------------------------------------------------------------------------------
def test_card_numbers_are_the_reports(tmp_path):
    report = make_report()
    _, text = _render(tmp_path, report)
    stages = report["stages"]
    entries = stages["evaluate"]["results"]["entries"]
    base, rt, ad = entries[0], entries[3], entries[4]
    # quality against the base model and against Attention-Drop at the packaged ratio
    for value in (base["perplexity"], rt["perplexity"], ad["perplexity"], entries[1]["perplexity"]):
        assert fmt_ppl(value) in text
    for e in (base, rt, ad):
        assert fmt_acc(e["mean_acc"]) in text
    assert f"| **Router-Tuning (this model)** | {format_layers(RT_SKIP)} | {fmt_ppl(rt['perplexity'])} |" in text
    assert f"| Attention-Drop, same skip ratio | {format_layers(AD_SKIP)} | {fmt_ppl(ad['perplexity'])} |" in text
    # skipped layers, execution rates, Attention-Drop's choice
    assert f"**Removed:** layers {format_layers(RT_SKIP)} (8 of 30)" in text
    rates = stages["plan"]["results"]["router-tuning"]["scores"]
    assert f"| 17 | {fmt_rate(rates['17'])} | {fmt_rate(stages['tune']['results']['execution_rates']['17'])} |" in text
    assert f"would remove layers {format_layers(AD_SKIP)}" in text
    # speed, with the device and versions it was measured on
    for row in stages["bench"]["results"]["rows"]:
        assert fmt_seconds(row["seconds"]) in text
        assert fmt_speedup(row["speedup"]) in text
    assert "NVIDIA H200" in text and "torch 2.11.0+cu130" in text and "transformers 5.17.0" in text
    assert "static cache + CUDA graphs" in text
    # parity and pruning facts
    assert fmt_value(2.384e-05) in text
    assert "45.0 KiB" in text and "33.0 KiB" in text
    assert "the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in text
    # provenance
    assert report["command"] in text
    assert card_mod.report_fingerprint(report) in text


def test_changing_the_report_changes_the_card(tmp_path):
    report = make_report()
    _, before = _render(tmp_path, report)
    changed = copy.deepcopy(report)
    changed["stages"]["bench"]["results"]["rows"][1].update(seconds=0.01402, speedup=1.3359)
    changed["stages"]["evaluate"]["results"]["entries"][3]["perplexity"] = 48.7713
    new_skip = [17, 18, 20, 22, 23, 25, 26, 27]
    changed["stages"]["plan"]["results"]["router-tuning"]["skip"] = new_skip
    changed["stages"]["evaluate"]["results"]["entries"][3]["skipped_layers"] = new_skip
    _, after = _render(tmp_path, changed)
    assert fmt_speedup(1.1583) in before and fmt_speedup(1.1583) not in after
    assert fmt_speedup(1.3359) in after and fmt_speedup(1.3359) not in before
    assert fmt_seconds(0.01402) in after
    assert fmt_ppl(50.1342) in after  # still the routers' held-out perplexity in the tune section
    assert f"| {fmt_ppl(48.7713)} |" in after and fmt_ppl(48.7713) not in before
    assert f"**Removed:** layers {format_layers(new_skip)}" in after
    assert card_mod.report_fingerprint(report) != card_mod.report_fingerprint(changed)
    # the gated graph's layers without an If at prefill, as the export recorded them
    assert "run without one, masked per sequence" not in before
    changed["stages"]["export"]["results"]["gated"]["prefill_always"] = [16, 19]
    _, after = _render(tmp_path, changed)
    assert "(at prefill, layers 16, 19, which the routers run for nearly every sequence, run without one" in after


def test_missing_stages_render_as_not_measured(tmp_path):
    report = make_report()
    for name in ("prune", "export", "validate", "evaluate", "bench"):
        del report["stages"][name]
    report["stages"]["tune"] = {"status": "failed", "seconds": 3.1}
    del report["stages"]["plan"]
    path, text = _render(tmp_path, report)
    meta = front_matter(text)
    assert meta["tags"] == ["rtexport", "router-tuning"]
    assert "Quality: not measured (evaluate stage: not run)" in text
    assert "Speed: not measured (bench stage: not run)" in text
    assert "No skip plan was recorded" in text
    assert "| tune | failed |" in text
    assert "![" not in text
    render_card(report, path.parent, plots=True)
    assert not (path.parent / "plots").exists()  # nothing to draw
    assert "1.00×" not in text  # no speed row invented


# ---- licence rules -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_id, license_id, attribution, prefix", [
    ("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", "Built with Meta Llama 3", "Llama-3"),
    ("meta-llama/Llama-3.1-8B-Instruct", "llama3.1", "Built with Llama", "Llama"),
    ("meta-llama/Llama-3.2-1B", "llama3.2", "Built with Llama", "Llama"),
    ("meta-llama/Llama-3.3-70B-Instruct", "llama3.3", "Built with Llama", "Llama"),
])
def test_llama_licence_rules(tmp_path, model_id, license_id, attribution, prefix):
    report = make_report()
    report["model"].update(model_id=model_id, license=None, gguf_file=None)
    path, text = _render(tmp_path, report)
    meta = front_matter(text)
    assert meta["license"] == license_id
    assert f"**{attribution}**" in text
    title = text.split("\n# ", 1)[1].split("\n", 1)[0]
    assert title.startswith(prefix) and licenses.rule_for(model_id).name_ok(title)
    assert (path.parent / "NOTICE").read_text().startswith(("Meta Llama 3 is licensed", "Llama 3."))
    assert "add its text as `LICENSE`" in text
    (path.parent / "LICENSE").write_text("agreement text\n")
    assert "accompanies the model: `LICENSE`" in render_card(report, path.parent, plots=False).read_text()
    with pytest.raises(RtexportError, match="begin with"):
        render_card(report, tmp_path / "other", name="my-fast-model", plots=False)


def test_licence_rule_boundaries():
    assert licenses.rule_for("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert licenses.rule_for("huggyllama/llama-30b") is None  # LLaMA 1, not Llama 3
    assert licenses.rule_for("meta-llama/Meta-Llama-3.1-8B").license == "llama3.1"
    assert licenses.license_id("Qwen/Qwen2.5-0.5B", "apache-2.0") == "apache-2.0"
    rule = licenses.rule_for("meta-llama/Meta-Llama-3-8B")
    assert licenses.conform_name("Meta-Llama-3-8B-rtexport-attn25", rule) == "Llama-3-8B-rtexport-attn25"
    assert licenses.conform_name("fast-model", rule) == "Llama-3-fast-model"
    assert not rule.name_ok("Llama-3.1-8B")


# ---- plots -------------------------------------------------------------------------------------------------------
def test_plots_are_pngs_written_only_with_data(tmp_path):
    report = make_report()
    path, text = _render(tmp_path, report, plots=True)
    plots = path.parent / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["quality_vs_skip_ratio.png", "router_execution_rates.png", "speed.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000
        assert f"](plots/{name})" in text

    del report["stages"]["bench"]
    report["stages"]["evaluate"]["results"]["entries"] = []
    path, text = _render(tmp_path, report, plots=True)
    assert sorted(p.name for p in plots.iterdir()) == ["router_execution_rates.png"]
    assert "speed.png" not in text and "quality_vs_skip_ratio.png" not in text

    _render(tmp_path, report, plots=False)
    assert not plots.exists()


# ---- Hub ---------------------------------------------------------------------------------------------------------
class _NoHub:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a dry run must not create a Hub client")


def _package(tmp_path):
    folder = tmp_path / "pkg"
    render_card(make_report(), folder, plots=False)
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text('{"model_type": "nemotron-nas"}')
    (folder / "model" / "model.safetensors").write_bytes(b"\0" * 4096)
    (folder / "routers" / "checkpoint").mkdir(parents=True)
    (folder / "routers" / "checkpoint" / "optimizer.pt").write_bytes(b"\0" * 10)
    (folder / "routers" / "router_config.json").write_text("{}")
    (folder / ".staging-leftover").write_text("x")
    (folder / "report.json").write_text(json.dumps(make_report()))
    return folder


def test_hub_dry_run_lists_files_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    folder = _package(tmp_path)
    result = hub.push_to_hub(folder, "someone/SmolLM2-135M-Instruct-rtexport-attn25", dry_run=True,
                             path_in_repo="v1", private=True)
    paths = {f.path_in_repo: f.size for f in result.files}
    assert paths["v1/README.md"] == (folder / "README.md").stat().st_size
    assert paths["v1/model/model.safetensors"] == 4096
    assert "v1/routers/router_config.json" in paths and "v1/report.json" in paths
    assert not any("checkpoint" in p or ".staging" in p for p in paths)
    assert result.dry_run and result.private and result.commit_url is None
    lines = "\n".join(result.summary_lines())
    assert "someone/SmolLM2-135M-Instruct-rtexport-attn25" in lines and "private" in lines
    assert "v1/model/model.safetensors" in lines and "4.0 KiB" in lines


def test_hub_refuses_a_name_the_licence_forbids(tmp_path):
    folder = _package(tmp_path)
    report = make_report()
    report["model"]["model_id"] = "meta-llama/Meta-Llama-3-8B"
    (folder / "report.json").write_text(json.dumps(report))
    with pytest.raises(RtexportError, match="Llama-3"):
        hub.push_to_hub(folder, "someone/fast-8b", dry_run=True)
    result = hub.push_to_hub(folder, "someone/Llama-3-8B-rtexport", dry_run=True)
    assert result.files and any("no LICENSE file" in note for note in result.notes)
    (folder / "LICENSE").write_text("META LLAMA 3 COMMUNITY LICENSE AGREEMENT\n")
    assert not hub.push_to_hub(folder, "someone/Llama-3-8B-rtexport", dry_run=True).notes


def test_hub_errors_are_one_line_and_hide_the_token(tmp_path, monkeypatch):
    folder = _package(tmp_path)
    secret = "hf_" + "s3cr3t" * 6
    # the real client, offline (tests run with HF_HUB_OFFLINE=1) or against a closed local port
    with pytest.raises(RtexportError) as info:
        hub.push_to_hub(folder, "someone/SmolLM2-rtexport", token=secret, endpoint="http://127.0.0.1:9")
    message = str(info.value)
    assert "\n" not in message and secret not in message
    assert "offline" in message or "could not reach" in message

    import huggingface_hub.errors as hf_errors

    class Api:
        def __init__(self, exc):
            self.exc = exc

        def create_repo(self, *args, **kwargs):
            raise self.exc

    with pytest.raises(RtexportError, match="not logged in"):
        hub.push_to_hub(folder, "someone/x", api=Api(hf_errors.LocalTokenNotFoundError("no token")))
    with pytest.raises(RtexportError, match="offline"):
        hub.push_to_hub(folder, "someone/x", token=secret, api=Api(hf_errors.OfflineModeIsEnabled("offline")))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub, "_resolve_token", lambda token: None)
    with pytest.raises(RtexportError, match="not logged in"):
        hub.push_to_hub(folder, "someone/x")
    with pytest.raises(RtexportError, match="repository id"):
        hub.push_to_hub(folder, "not a/valid/repo", dry_run=True)
    with pytest.raises(RtexportError, match="not a folder"):
        hub.push_to_hub(tmp_path / "nothing", "someone/x", dry_run=True)


def test_hub_push_calls_create_repo_and_upload_folder(tmp_path):
    folder = _package(tmp_path)
    calls = []

    class Api:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], kwargs))

            class Info:
                commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"
            return Info()

    result = hub.push_to_hub(folder, "someone/SmolLM2-rtexport", private=True, token="hf_x", api=Api(),
                             commit_message="first")
    (_, repo, create), (_, _, upload) = calls
    assert repo == "someone/SmolLM2-rtexport" and create["private"] is True and create["exist_ok"] is True
    assert upload["folder_path"] == str(folder) and upload["commit_message"] == "first"
    assert "**/checkpoint/**" in upload["ignore_patterns"]
    assert result.commit_url.endswith("/commit/abc123") and not result.dry_run


def test_load_instructions_follow_the_package(tmp_path):
    report = make_report()
    folder = tmp_path / "pkg"
    (folder / "onnx" / "static").mkdir(parents=True)
    (folder / "onnx" / "static" / "run_ort.py").write_text("# runner\n")
    (folder / "onnx" / "static" / "genai_config.json").write_text("{}")
    text = render_card(report, folder, repo_id="someone/SmolLM2-135M-Instruct-rtexport-attn25", plots=False).read_text()
    assert 'snapshot_download("someone/SmolLM2-135M-Instruct-rtexport-attn25")' in text
    assert "trust_remote_code=True" in text
    assert "vllm serve SmolLM2-135M-Instruct-rtexport-attn25/model --trust-remote-code" in text
    assert "python onnx/static/run_ort.py --prompt" in text
    assert 'og.Model("onnx/static")' in text
    assert "# SmolLM2-135M-Instruct-rtexport-attn25\n" in text

    report["stages"]["prune"]["results"]["model_type"] = "rtexport-pruned"
    text = render_card(report, folder, plots=False).read_text()
    assert "vllm serve" not in text and "vLLM does not load it" in text


def test_card_at_the_root_of_the_model_folder(tmp_path):
    """The pipeline's layout: the card sits in the pruned folder (the repository's root), the ONNX packages are
    uploaded under onnx/, and the package-ort stage lists their files."""
    report = make_report()
    stages = report["stages"]
    stages["prune"]["output"] = "model/config.json"
    for mode in ("static", "gated"):
        stages["export"]["results"][mode]["path"] = f"onnx-build/{mode}/model.onnx"
    stages["package-ort"] = {"status": "done", "seconds": 2.0, "output": "onnx", "results": {
        "static": {"path": "onnx/static", "files": ["genai_config.json", "model.onnx", "run_ort.py"]},
        "gated": {"path": "onnx/gated", "files": ["model.onnx", "run_ort.py"]}}}
    stages["card"] = {"status": "done", "seconds": 1.0, "results": {"cards": ["model/README.md"]}}
    report["settings"]["push_to_hub"] = "someone/SmolLM2-135M-Instruct-rtexport-attn25"
    folder = tmp_path / "run" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "nemotron-nas"}')
    text = render_card(report, folder, plots=False).read_text()
    assert 'path = "someone/SmolLM2-135M-Instruct-rtexport-attn25"' in text
    assert "vllm serve someone/SmolLM2-135M-Instruct-rtexport-attn25 --trust-remote-code" in text
    assert "python onnx/static/run_ort.py" in text and "python onnx/gated/run_ort.py" in text
    assert '--include "onnx/static/*" "onnx/gated/*" --local-dir' in text
    assert "`onnx/static/model.onnx`: static graph" in text and "onnx-build" not in text
    assert "| card |" not in text  # packaging stages are not measurements
    # the fingerprint ignores the creation time and the packaging stages, so report.json written later matches
    later = copy.deepcopy(report)
    later["created"] = "2026-11-30T05:00:00+00:00"
    later["stages"]["push"] = {"status": "done", "results": {}}
    assert card_mod.report_fingerprint(later) == card_mod.report_fingerprint(report)

    text = render_card(report, tmp_path / "ort-only", plots=False, onnx_paths={"static": "static"}).read_text()
    assert "python static/run_ort.py" in text


def test_stage_table_says_why_a_stage_did_not_run(tmp_path):
    report = make_report()
    report["stages"]["prune"] = {"status": "not run", "results": {"reason": "--format ort-gpu"}}
    report["stages"]["bench"] = {"status": "failed", "error": "CUDA out of memory\nTraceback ..."}
    text = render_card(report, tmp_path, plots=False).read_text()
    assert "| prune | not run | – | --format ort-gpu |" in text
    assert "| bench | failed | – | CUDA out of memory |" in text
    assert "No pruned model folder is in this package (prune stage: not run)" in text
    assert "Speed: not measured (bench stage: failed)" in text


def test_license_for_reads_what_is_at_hand(tmp_path):
    assert licenses.license_for("meta-llama/Meta-Llama-3-8B") == "llama3"
    folder = tmp_path / "local-model"
    folder.mkdir()
    assert licenses.license_for(str(folder), local_path=str(folder)) is None
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    assert licenses.license_for(str(folder), local_path=str(folder)) == "mit"

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert licenses.license_for("someone/tiny", local_path=str(tmp_path), gguf_file="tiny.gguf") == "apache-2.0"
