"""Stage: ONNX validation and packaging. PyTorch against ONNX Runtime (report, tolerances, exit code 3 on a
corrupted graph) and the ort-gpu package (GenAI config, standalone runner)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import build_model, build_tokenizer
from onnx_cases import exported

from rtexport.errors import ArtifactMismatch, ValidationFailed
from rtexport.evaluation.parity import parity_table, validate
from rtexport.onnx.package import package_ort_gpu
from rtexport.onnx.runtime import OrtCausalLM

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi.",
    "A longer sentence, so that the batch needs padding on the left.",
    "Routers decide per sequence.",
    "ONNX",
    "Attention layers that the plan drops keep no cache at all.",
]


def _validate(case, **kwargs):
    reference = case.routed if case.mode == "gated" else case.model
    return validate(reference, case.onnx_dir, texts=TEXTS, tokenizer=build_tokenizer(), atol=1e-4, steps=16,
                    batch_size=3, **kwargs)


@pytest.mark.parametrize("mode", ["static", "gated"])
def test_validate_passes_and_reports(mode, tmp_path):
    case = exported("llama", mode)
    report = _validate(case)
    assert report.passed, report.to_dict()["checks"]
    names = [c.name for c in report.checks]
    assert names[:4] == ["max_abs_logits_diff", "top1_agreement", "greedy_agreement", "perplexity_rel_diff"]
    assert ("decision_agreement" in names) == (mode == "gated")
    # a gated export's phase graphs are what the runner runs; model.onnx alone is checked against them
    assert ("single_graph_agreement" in names) == (mode == "gated")
    assert report.details["graphs"] == (["prefill.onnx", "decode.onnx"] if mode == "gated" else ["model.onnx"])
    if mode == "gated":
        assert report.check("single_graph_agreement").value == 1.0
    assert report.check("max_abs_logits_diff").tolerance == 1e-4
    assert report.check("greedy_agreement").value == 1.0
    assert report.sequences == len(TEXTS) and report.real_tokens > 0
    saved = json.loads(report.save(tmp_path / "report.json").read_text())
    assert saved["passed"] is True and saved["mode"] == mode
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(parity_table(report))
    assert "max_abs_logits_diff" in console.export_text()
    if mode == "static":  # the plain reference model was wrapped for the comparison only
        assert type(case.model.model.layers[1]).__name__ == type(case.model.model.layers[0]).__name__


def _corrupt(folder, name_part: str, factor: float) -> None:
    """Scale one initializer in place inside model.onnx.data (same size, so export_info's byte count still holds)."""
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if name_part in t.name)
    where = {e.key: e.value for e in tensor.external_data}
    offset, length = int(where["offset"]), int(where["length"])
    with open(folder / where["location"], "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=np.float32) * factor
        f.seek(offset)
        f.write(values.astype(np.float32).tobytes())


def test_validate_fails_with_exit_code_3_on_a_corrupted_graph(tmp_path):
    case = exported("llama", "static")
    broken = tmp_path / "broken"
    shutil.copytree(case.onnx_dir, broken)
    _corrupt(broken, "layers.3.mlp.down_proj", 1.01)
    reference = case.model
    report = validate(reference, broken, texts=TEXTS, tokenizer=build_tokenizer(), atol=1e-4, steps=4)
    assert not report.passed
    assert report.check("max_abs_logits_diff").passed is False
    with pytest.raises(ValidationFailed) as err:
        report.raise_if_failed()
    assert err.value.exit_code == 3
    assert "max_abs_logits_diff" in str(err.value)


def test_validate_refuses_another_model():
    case = exported("llama", "static")
    other = build_model("llama", num_hidden_layers=2)
    with pytest.raises(ArtifactMismatch, match="another model"):
        validate(other, case.onnx_dir, texts=TEXTS, tokenizer=build_tokenizer())
    with pytest.raises(ArtifactMismatch, match="RoutedModel"):
        validate(exported("llama", "gated").model, exported("llama", "gated").onnx_dir, texts=TEXTS,
                 tokenizer=build_tokenizer())


def _run_runner(folder, prompts, n):
    cmd = [sys.executable, str(folder / "run_ort.py"), "--cpu", "--ids", "--max-new-tokens", str(n)]
    for p in prompts:
        cmd += ["--prompt", p]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=folder.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("mode", ["static", "gated"])
def test_ort_gpu_package_runs_standalone(mode, tmp_path):
    case = exported("llama", mode)
    report = _validate(case)
    pkg = package_ort_gpu(case.onnx_dir, tmp_path / "pkg", report)
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "run_ort.py", "parity_report.json",
                 "README.md", "export_info.json"):
        assert (pkg / name).is_file(), name
    readme = (pkg / "README.md").read_text()
    assert "max_abs_logits_diff" in readme
    if mode == "static":
        cfg = json.loads((pkg / "genai_config.json").read_text())
        dec = cfg["model"]["decoder"]
        assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
        assert dec["outputs"]["present_value_names"] == "present.%d.value"
        assert dec["num_hidden_layers"] == 4 and dec["head_size"] == 16 and dec["num_key_value_heads"] == 2
        assert cfg["search"]["past_present_share_buffer"] is False
    else:
        assert not (pkg / "genai_config.json").exists()
        assert "run_layer" in readme
    # the runner imports nothing from rtexport and generates what OrtCausalLM generates
    assert "rtexport" not in "".join(
        line for line in (pkg / "run_ort.py").read_text().splitlines() if line.startswith(("import", "from"))
    )
    prompts = ["Hello there", "A much longer prompt than the first"]
    results = _run_runner(pkg, prompts, 6)
    tok = build_tokenizer()
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    ids = np.full((2, width), tok.pad_token_id, dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for r, e in enumerate(enc):
        ids[r, width - len(e):] = e
        mask[r, width - len(e):] = 1
    info = json.loads((pkg / "export_info.json").read_text())
    eos = info["model"]["eos_token_id"]
    expected = OrtCausalLM(pkg).generate(ids, mask, max_new_tokens=6, eos_token_id=eos,
                                         pad_token_id=info["model"]["pad_token_id"])
    for r, result in enumerate(results):
        row = [int(t) for t in expected[r]]
        if eos in row:
            row = row[: row.index(eos)]
        assert result["ids"] == row


def test_package_refuses_a_failed_report(tmp_path):
    case = exported("llama", "static")
    report = _validate(case)
    report.checks[0].passed = False
    with pytest.raises(ArtifactMismatch, match="failed validation"):
        package_ort_gpu(case.onnx_dir, tmp_path / "pkg", report)
    assert not (tmp_path / "pkg").exists()


# ---- ONNX Runtime GenAI (in its own environment: it brings its own onnxruntime) -----------------------------------
GENAI_SCRIPT = """
import json, sys
import onnxruntime_genai as og
folder, n = sys.argv[1], int(sys.argv[2])
config = og.Config(folder)
config.clear_providers()  # the package asks for CUDA; run on the CPU here
model = og.Model(config)
out = []
for ids in json.loads(sys.stdin.read()):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    out.append([int(t) for t in gen.get_sequence(0)][len(ids):])
print(json.dumps(out))
"""


def genai_python():
    """A Python with onnxruntime-genai, named by RTEXPORT_GENAI_PYTHON (it pins its own onnxruntime, so it lives in
    an environment of its own); None when unset."""
    import os

    return os.environ.get("RTEXPORT_GENAI_PYTHON") or None


def genai_greedy(package, prompts, n):
    done = subprocess.run([genai_python(), "-c", GENAI_SCRIPT, str(package), str(n)], input=json.dumps(prompts),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def assert_same_greedy(genai_tokens, torch_tokens, eos):
    """GenAI stops at EOS (0.18 leaves the EOS token out of the sequence); up to there, or for every step, the
    tokens must be PyTorch's."""
    eos = set(eos if isinstance(eos, list) else [eos])
    for got, want in zip(genai_tokens, torch_tokens):
        assert got == want[: len(got)], (got, want)
        assert len(got) == len(want) or (got and got[-1] in eos) or want[len(got)] in eos, (got, want)


@pytest.mark.skipif(genai_python() is None, reason="set RTEXPORT_GENAI_PYTHON to a Python with onnxruntime-genai")
def test_genai_runs_the_static_package_like_torch(tmp_path):
    import torch
    from onnx_cases import random_sequences, reference

    from rtexport.evaluation.parity import torch_greedy

    case = exported("llama", "static")
    pkg = package_ort_gpu(case.onnx_dir, tmp_path / "pkg", _validate(case))
    prompts = random_sequences(3, seed=7, lo=3, hi=8)
    with reference(case) as model:
        want = [torch_greedy(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 12)[0].tolist()
                for p in prompts]
    info = json.loads((pkg / "export_info.json").read_text())
    assert_same_greedy(genai_greedy(pkg, prompts, 12), want, info["model"]["eos_token_id"])


# ---- the real model ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_exports_validate_and_package(tmp_path):
    """SmolLM2-135M: static (6 attention layers dropped by Attention Drop; also as the GroupQueryAttention graph) and
    gated (random routers on four layers) exports pass validation at the default float32 tolerances; the static
    package runs under GenAI."""
    import torch

    from rtexport.evaluation.parity import torch_greedy
    from rtexport.models.loading import load_model
    from rtexport.onnx.export import export_onnx
    from rtexport.planning import measure_similarity, plan_from_similarity
    from rtexport.routing import RoutedModel

    loaded = load_model("embedded:smollm2", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    texts = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
             "In the beginning there was a small village near the sea, where the fishermen"]
    enc = tok(texts, return_tensors="pt", padding=True)
    sim = measure_similarity(model, loaded.adapter, [dict(enc)], target="attn", layers=list(range(15, 29)))
    plan = plan_from_similarity(sim, base_model=loaded.source.model_id, fingerprint=loaded.fingerprint,
                                num_layers=30, target="attn", skip_layers=6)
    export_onnx(loaded, tmp_path / "static", mode="static", plan=plan)
    report = validate(model, tmp_path / "static", texts=texts, tokenizer=tok, steps=16)
    report.raise_if_failed()
    pkg = package_ort_gpu(tmp_path / "static", tmp_path / "pkg-static", report)
    # the same plan as the GPU deployment graph: GroupQueryAttention on a packed preallocated cache
    export_onnx(loaded, tmp_path / "gqa", mode="static", plan=plan, attention="gqa", kv_cache="preallocated",
                logits="selected")
    gqa_report = validate(model, tmp_path / "gqa", texts=texts, tokenizer=tok, steps=16)
    gqa_report.raise_if_failed()
    assert gqa_report.details["attention"] == "gqa"

    # four routed layers keep the gated export to a few minutes (each If costs the exporter ~10-20 s here)
    routed = RoutedModel.from_model(model, layers=[18, 20, 22, 24])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g) * 0.05)
    export_onnx(loaded, tmp_path / "gated", mode="gated", routed=routed)
    gated_report = validate(routed, tmp_path / "gated", texts=texts, tokenizer=tok, steps=16)
    gated_report.raise_if_failed()
    package_ort_gpu(tmp_path / "gated", tmp_path / "pkg-gated", gated_report)
    routed.unwrap()

    if genai_python() is not None:
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts[:3]]
        wrapper = RoutedModel.from_model(model, layers=plan.skip)
        with wrapper.forced_decisions({i: False for i in plan.skip}):
            want = [torch_greedy(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 16)[0].tolist()
                    for p in prompts]
        wrapper.unwrap()
        assert_same_greedy(genai_greedy(pkg, prompts, 16), want, json.loads(
            (pkg / "export_info.json").read_text())["model"]["eos_token_id"])


def test_reference_for_a_plan_leaves_the_model_unwrapped():
    from conftest import build_model

    from rtexport.evaluation.parity import reference_for
    from rtexport.models.loading import wrap_model
    from rtexport.planning import SkipPlan

    loaded = wrap_model(build_model("llama"))
    layers = list(loaded.model.model.layers)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[3], candidates=[2, 3, 4])
    with reference_for(loaded, plan) as reference:
        assert reference.state.forced == {2: True, 3: False, 4: True}
    assert list(loaded.model.model.layers) == layers
