"""Stage: ONNX export with a preallocated KV cache (static graphs, opset 24).

Each past is a buffer as long as the generation, written in place by ONNX ``TensorScatter`` at ``cache_position``:
the decode step has the same shapes at every step, which is what lets ONNX Runtime replay it as a CUDA graph (that
part is measured on the GPU machine, ``examples/benchmarks/ort_gpu_speed.py``). Here, under ONNX Runtime's CPU
provider: the layout, logits parity with padding and with a cache, in-place writes into the caller's buffers,
buffers that grow, greedy decoding, the validate report and the package.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx_cases import STATIC_SKIP, exported, random_sequences, reference
from test_onnx_attention import host_to_device_values
from test_onnx_export import ATOL, assert_padded_batches_match, continuation, max_diff_real, torch_step

from rtexport.errors import DataError
from rtexport.evaluation.parity import left_pad, parity_table, torch_greedy, validate
from rtexport.onnx.export import export_onnx, load_export_info
from rtexport.onnx.runtime import OrtCausalLM
from rtexport.routing import RoutedModel

ARCHS = ("llama", "qwen2")


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_buffers_for_kept_attention_written_by_tensor_scatter(arch):
    case = exported(arch, "preallocated")
    model = onnx.load(str(case.onnx_dir / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}.get("") == 24
    ops = [n.op_type for n in model.graph.node]
    kept = [i for i in range(4) if i not in STATIC_SKIP]
    assert ops.count("TensorScatter") == 2 * len(kept)
    assert ops.count("Attention") == len(kept)
    assert "If" not in ops and not any(n.domain for n in model.graph.node)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert inputs["cache_position"] == ["sequence_length"]
    assert inputs["attention_mask"] == ["batch_size", "cache_length"]
    assert {n.split(".")[1] for n in inputs if n.startswith("past_key_values.")} == {str(i) for i in kept}
    assert inputs[f"past_key_values.{kept[0]}.key"][2] == "cache_length"
    info = load_export_info(case.onnx_dir)
    assert info["kv_cache"] == "preallocated" and info["opset"] == 24
    # nothing the host computes from shapes feeds device arithmetic (a Memcpy would refuse CUDA graph capture)
    assert host_to_device_values(model.graph) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_padding_and_cache_written_in_place(arch):
    case = exported(arch, "preallocated")
    lm = OrtCausalLM(case.onnx_dir)
    assert lm.preallocated and lm.io_binding
    seqs = random_sequences(4, seed=11, lo=4, hi=10)
    with reference(case) as model:
        assert_padded_batches_match(model, lm, seqs)
        # past > 0: a left-padded prefill into 16-slot buffers, then three tokens at once, then one
        ids, mask, more, mask2 = continuation(seqs[1:4])
        last = torch.randint(0, 256, (3, 1), generator=torch.Generator().manual_seed(4))
        mask3 = torch.cat([mask2, torch.ones(3, 1, dtype=torch.long)], dim=1)
        _, cache = torch_step(model, ids, mask)
        ref2, cache = torch_step(model, more, mask2, cache)
        ref3, _ = torch_step(model, last, mask3, cache)
        step = lm.forward(ids.numpy(), mask.numpy(), capacity=16)
        buffers = {i: (k.numpy(), v.numpy()) for i, (k, v) in step.cache.past.items()}
        assert step.cache.length == ids.shape[1] and step.cache.capacity == 16
        assert set(step.cache.past) == {0, 3}
        out2 = lm.forward(more.numpy(), mask2.numpy(), cache=step.cache)
        assert max_diff_real(out2.logits, ref2, torch.ones(3, 3)) <= ATOL
        out3 = lm.forward(last.numpy(), mask3.numpy(), cache=out2.cache)
        assert max_diff_real(out3.logits, ref3, torch.ones(3, 1)) <= ATOL
        # the writes landed in the prefill's own buffers, at the slots after the prompt and nowhere else
        n = ids.shape[1]
        for i, (k, v) in out3.cache.past.items():
            assert out3.cache.past[i][0] is step.cache.past[i][0]
            now = k.numpy()
            assert np.array_equal(now[:, :, :n], buffers[i][0][:, :, :n])
            assert np.abs(now[:, :, n : n + 4]).sum() > 0 and not now[:, :, n + 4 :].any()


def test_buffers_grow_when_a_step_outruns_them():
    case = exported("llama", "preallocated")
    seqs = random_sequences(3, seed=21, lo=3, hi=8)
    batch = left_pad(seqs)
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    roomy = OrtCausalLM(case.onnx_dir)
    tight = OrtCausalLM(case.onnx_dir, reserve=1)
    a, b = roomy.forward(ids, mask), tight.forward(ids, mask)
    assert b.cache.capacity == ids.shape[1] + 1
    for _ in range(4):
        token = a.logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((3, 1), dtype=mask.dtype)], axis=1)
        a = roomy.forward(token, mask, cache=a.cache, last_only=True)
        b = tight.forward(token, mask, cache=b.cache, last_only=True)
        assert np.abs(a.logits - b.logits).max() <= 1e-5
    assert b.cache.capacity == 2 * (ids.shape[1] + 1) and b.cache.length == ids.shape[1] + 4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_torch_and_the_growing_graph(arch):
    case = exported(arch, "preallocated")
    seqs = random_sequences(3, seed=21, lo=3, hi=8)
    batch = left_pad(seqs)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with reference(case) as model:
        expected = torch_greedy(model, ids, mask, steps=16)
    tokens = OrtCausalLM(case.onnx_dir).generate(ids.numpy(), mask.numpy(), max_new_tokens=16)
    assert tokens.tolist() == expected.tolist()
    growing = OrtCausalLM(exported(arch, "static").onnx_dir).generate(ids.numpy(), mask.numpy(), max_new_tokens=16)
    assert tokens.tolist() == growing.tolist()


def test_validate_report_and_package_without_genai_config(tmp_path):
    from rtexport.onnx.package import package_ort_gpu

    case = exported("llama", "preallocated")
    batches = [left_pad(random_sequences(3, seed=s, lo=4, hi=9)) for s in (1, 2)]
    report = validate(case.model, case.onnx_dir, token_batches=batches, steps=8)  # it applies the plan itself
    assert report.passed, report.checks
    assert report.details["kv_cache"] == "preallocated"
    assert "preallocated KV cache" in parity_table(report).title
    out = package_ort_gpu(case.onnx_dir, tmp_path / "pkg", report)
    assert not (out / "genai_config.json").exists()
    readme = (out / "README.md").read_text()
    assert "cache_position" in readme and "TensorScatter" in readme
    assert json.loads((out / "export_info.json").read_text())["kv_cache"] == "preallocated"


def test_refusals(tmp_path):
    case = exported("llama", "static")
    with pytest.raises(DataError, match="opset"):
        export_onnx(case.loaded, tmp_path / "a", mode="static", plan=case.plan, kv_cache="preallocated", opset=22)
    routed = RoutedModel.from_model(case.model, layers=[1, 2])
    try:
        with pytest.raises(DataError, match="static graphs"):
            export_onnx(case.loaded, tmp_path / "b", mode="gated", routed=routed, kv_cache="preallocated")
    finally:
        routed.unwrap()
    with pytest.raises(DataError, match="kv-cache"):
        export_onnx(case.loaded, tmp_path / "c", mode="static", plan=case.plan, kv_cache="paged")
    with pytest.raises(ValueError, match="preallocated"):
        OrtCausalLM(case.onnx_dir, cuda_graph=True)
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("mode, logits", [("preallocated", "all"), ("gqa", "selected")])
def test_captured_step_bindings_decode_as_the_per_step_ones(mode, logits):
    """The decode step a CUDA graph replays (``_GraphStep``: every input and output bound once to a buffer of its
    own, inputs refreshed in place), driven on the CPU provider, which has no graph capture but runs the same
    bindings: it must decode exactly as the per-step bindings do, and reuse its buffers from step to step. Also
    for the GroupQueryAttention graph, whose decode mask spans the buffers so that every step has one shape."""
    case = exported("llama", mode, logits)
    batch = left_pad(random_sequences(3, seed=31, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    expected = OrtCausalLM(case.onnx_dir).generate(ids, mask, max_new_tokens=12)
    replayed = OrtCausalLM(case.onnx_dir)
    replayed.cuda_graph = True  # what cuda_graph=True sets on CUDAExecutionProvider
    assert replayed.generate(ids, mask, max_new_tokens=12).tolist() == expected.tolist()
    (step,) = replayed._graphs.values()
    assert set(step.inputs) == {n for n in replayed.input_names if not n.startswith("past_key_values.")}
    buffers = {name: value.data_ptr() for name, value in {**step.inputs, **step.outputs}.items()}
    assert replayed.generate(ids, mask, max_new_tokens=12).tolist() == expected.tolist()
    assert list(replayed._graphs.values()) == [step]
    assert {name: value.data_ptr() for name, value in {**step.inputs, **step.outputs}.items()} == buffers


def test_growing_into_a_pool_keeps_its_captured_buffers():
    """With CUDA graphs the buffers of each (batch, capacity) are a pool that a captured step has bound: a cache that
    grows into a capacity whose pool exists is copied into those buffers, not into new ones."""
    case = exported("llama", "preallocated")
    batch = left_pad(random_sequences(2, seed=41, lo=4, hi=4))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    mask2 = np.concatenate([mask, np.ones((2, 1), mask.dtype)], axis=1)
    lm = OrtCausalLM(case.onnx_dir)
    lm.cuda_graph = True  # buffers pooled and decode steps bound once, as on CUDAExecutionProvider
    lm.generate(ids, mask, max_new_tokens=4)  # the pool of capacity 8 and its bound decode step
    pooled = {i: (k.data_ptr(), v.data_ptr()) for i, (k, v) in lm._pools[(2, 8)].items()}
    step = lm.forward(ids, mask, capacity=4)  # a pool of capacity 4, full after the prompt
    token = step.logits[:, -1].argmax(-1)[:, None]
    grown = lm.forward(token, mask2, cache=step.cache, last_only=True)  # grows to 2 x 4 = 8 slots
    assert grown.cache.capacity == 8
    assert {i: (k.data_ptr(), v.data_ptr()) for i, (k, v) in grown.cache.past.items()} == pooled
    plain = OrtCausalLM(case.onnx_dir)
    expected = plain.forward(token, mask2, cache=plain.forward(ids, mask, capacity=4).cache, last_only=True)
    assert np.abs(grown.logits - expected.logits).max() <= 1e-5


@pytest.mark.parametrize("attention", ["explicit", "fused", "gqa"])
def test_per_head_norms_and_explicit_attention_write_the_buffers_too(attention, tmp_path):
    """Qwen3 (q/k norms per head: the SDPA path of fused attention, or before the rotary outside the
    GroupQueryAttention node) and explicit MatMul/Softmax attention write their K/V into the buffers the same way:
    greedy tokens equal the growing graph's (fused attention for the GroupQueryAttention graph's)."""
    from conftest import build_model, build_tokenizer

    from rtexport.models.loading import wrap_model
    from rtexport.planning import SkipPlan

    model = build_model("qwen3", num_hidden_layers=4)
    loaded = wrap_model(model, tokenizer=build_tokenizer(), model_id="tiny-qwen3")
    plan = SkipPlan(base_model="tiny-qwen3", fingerprint=loaded.fingerprint, num_layers=4, target="attn",
                    method="manual", skip=[1], candidates=[1])
    batch = left_pad(random_sequences(3, seed=2, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    tokens = {}
    for kv_cache in ("growing", "preallocated"):
        kind = "fused" if (attention, kv_cache) == ("gqa", "growing") else attention
        path = export_onnx(loaded, tmp_path / kv_cache, mode="static", plan=plan, attention=kind, kv_cache=kv_cache,
                           logits="selected" if kind == "gqa" else "all", save_tokenizer=False)
        tokens[kv_cache] = OrtCausalLM(path).generate(ids, mask, max_new_tokens=10).tolist()
    assert tokens["preallocated"] == tokens["growing"]
