"""Stage: tune-and-export. The whole job on a tiny model saved to disk: artifacts, report, card, resume, --force."""

from __future__ import annotations

import json

import yaml
from conftest import build_model, build_tokenizer

from rtexport.pipeline import PipelineSettings, tune_and_export


def test_tune_and_export_runs_resumes_and_reports(tmp_path):
    src = tmp_path / "tiny"
    build_model("llama", hidden_size=64, intermediate_size=256).save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    settings = dict(model=str(src), output=str(tmp_path / "out"), format="hf", skip_ratio=0.34, layers="2-4", seq_len=32,
                    max_samples=16, batch_size=4, steps=2, calibration_blocks=4, heldout_blocks=4, eval_tasks="",
                    bench_reps=1, dtype="float32", device="cpu")
    report = tune_and_export(PipelineSettings(**settings), progress=False)
    out = tmp_path / "out"
    for path in ("routers/router_config.json", "plans/router-tuning.json", "plans/attention-drop.json",
                 "model/config.json", "model/README.md", "report.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "report.json").read_text())["format"] == "rtexport.report/1"
    stages = report["stages"]
    assert all(stages[s]["status"] == "done" for s in ("tune", "plan", "prune", "evaluate", "bench", "card"))
    assert stages["export"]["status"] == "not run"
    plan = json.loads((out / "plans" / "router-tuning.json").read_text())
    assert len(plan["skip"]) == 2 and stages["prune"]["results"]["skipped_attention_layers"] == plan["skip"]
    card = (out / "model" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "router-tuning" in meta["tags"]
    ppl = stages["evaluate"]["results"]["entries"][1]["perplexity"]
    assert f"{ppl:.2f}" in card

    # a rerun finds every stage up to date and redoes nothing
    tuned_at = (out / "stages" / "tune.json").stat().st_mtime_ns
    again = tune_and_export(PipelineSettings(**settings), progress=False)
    assert (out / "stages" / "tune.json").stat().st_mtime_ns == tuned_at
    assert again["stages"]["tune"]["results"] == stages["tune"]["results"]
    # --force redoes them
    tune_and_export(PipelineSettings(**settings, force=True), progress=False)
    assert (out / "stages" / "tune.json").stat().st_mtime_ns != tuned_at


def test_tune_and_export_ort_gpu_with_group_query_attention(tmp_path):
    """The GPU deployment flags through the whole ONNX side of the job: the static graph is the GroupQueryAttention
    one (validated, packaged, benchmarked with its runner), the gated graph keeps ONNX Attention."""
    src = tmp_path / "tiny"
    build_model("llama", hidden_size=64, intermediate_size=256).save_pretrained(src)
    build_tokenizer().save_pretrained(src)
    settings = PipelineSettings(model=str(src), output=str(tmp_path / "out"), format="ort-gpu", skip_ratio=0.34,
                                layers="2-4", seq_len=32, max_samples=16, batch_size=4, steps=2, calibration_blocks=4,
                                heldout_blocks=4, eval_tasks="", bench_reps=1, dtype="float32", device="cpu",
                                attention="gqa", kv_cache="preallocated", logits="selected")
    report = tune_and_export(settings, progress=False)
    stages = report["stages"]
    assert all(stages[s]["status"] == "done" for s in ("export", "validate", "bench")), stages
    out = tmp_path / "out"
    infos = {p.parent.name: json.loads(p.read_text()) for p in out.glob("onnx-build/*/export_info.json")}
    assert infos["static"]["attention"] == "gqa" and infos["static"]["logits"] == "selected"
    assert infos["gated"]["attention"] == "fused" and infos["gated"]["logits"] == "selected"
