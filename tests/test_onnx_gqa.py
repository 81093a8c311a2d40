"""Stage: ONNX export with ``attention="gqa"``: a preallocated KV cache written by ONNX Runtime's contrib
``GroupQueryAttention`` (com.microsoft), the op ORT's CUDA EP runs with flash attention at prefill and its fused
decode kernels at decode, with no mask tensor (that part is measured on the GPU machine,
``examples/benchmarks/ort_gpu_speed.py``). Each sequence's tokens are packed from slot 0 of its buffers.

Here, under ONNX Runtime's CPU provider: the op's semantics against this package's reference of it, the layout,
logits parity with left and right padding and with a cache, the packed writes into the caller's buffers, greedy
decoding, buffers that grow, validate and the package, and the refusals (the captured decode step's bindings and
Qwen3's per-head norms: test_onnx_preallocated.py, with the other preallocated graph's).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx_cases import STATIC_SKIP, exported, random_sequences, reference
from test_onnx_attention import host_to_device_values
from test_onnx_export import ATOL, assert_padded_batches_match, continuation, max_diff_real, torch_step

from rtexport.errors import DataError
from rtexport.evaluation.parity import left_pad, parity_table, torch_greedy, validate
from rtexport.onnx.export import export_onnx, load_export_info
from rtexport.onnx.graph_model import group_query_attention
from rtexport.onnx.runtime import OrtCausalLM

ARCHS = ("llama", "qwen2")
HEADS, KV_HEADS, D, SLOTS = 4, 2, 8, 12


def _gqa_node_session():
    """One GroupQueryAttention node (4 heads, 2 KV heads, head size 8) under ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    f = TensorProto.FLOAT
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total"],
                            ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=HEADS,
                            kv_num_heads=KV_HEADS, scale=0.3)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("q", f, None), helper.make_tensor_value_info("k", f, None),
         helper.make_tensor_value_info("v", f, None), helper.make_tensor_value_info("pk", f, None),
         helper.make_tensor_value_info("pv", f, None),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, None),
         helper.make_tensor_value_info("total", TensorProto.INT32, None)],
        [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_k", "present_v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("step", ["prompt", "decode", "continuation"])
def test_reference_of_the_op_matches_onnx_runtime(step):
    """What this package computes for ``GroupQueryAttention`` in PyTorch is what ONNX Runtime's kernel computes:
    a right-padded prompt (slots 0..S-1), a ragged decode step (each sequence at its own slot) and a batch-1 step
    of three tokens after a cache (total = filled + 3)."""
    g = torch.Generator().manual_seed({"prompt": 0, "decode": 1, "continuation": 2}[step])
    b, s, seqlens, total = {"prompt": (2, 5, [4, 2], 5), "decode": (2, 1, [6, 3], SLOTS),
                            "continuation": (1, 3, [7], 8)}[step]
    q = torch.randn(b, s, HEADS * D, generator=g)
    k, v = torch.randn(b, s, KV_HEADS * D, generator=g), torch.randn(b, s, KV_HEADS * D, generator=g)
    pk, pv = torch.randn(b, KV_HEADS, SLOTS, D, generator=g), torch.randn(b, KV_HEADS, SLOTS, D, generator=g)
    seqlens_k, total_t = torch.tensor(seqlens, dtype=torch.int32), torch.tensor(total, dtype=torch.int32)
    out, keys, values = group_query_attention(q, k, v, pk, pv, seqlens_k, total_t, num_heads=HEADS,
                                              kv_num_heads=KV_HEADS, scale=0.3)
    feeds = {"q": q, "k": k, "v": v, "pk": pk, "pv": pv, "seqlens_k": seqlens_k, "total": total_t}
    got = _gqa_node_session().run(None, {n: t.numpy() for n, t in feeds.items()})
    lengths = np.array(seqlens) + 1
    for r in range(b):  # a right-padded prompt's padding rows are not compared
        rows = slice(0, lengths[r]) if step == "prompt" else slice(None)
        np.testing.assert_allclose(got[0][r, rows], out[r, rows].numpy(), atol=1e-5)
        filled = slice(0, lengths[r])  # the slots the step wrote and the cache held
        np.testing.assert_allclose(got[1][r, :, filled], keys[r, :, filled].numpy(), atol=1e-6)
        np.testing.assert_allclose(got[2][r, :, filled], values[r, :, filled].numpy(), atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_one_group_query_attention_per_kept_layer(arch):
    case = exported(arch, "gqa", "selected")
    model = onnx.load(str(case.onnx_dir / "model.onnx"), load_external_data=False)
    kept = [i for i in range(4) if i not in STATIC_SKIP]
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "GroupQueryAttention")) == len(kept)
    assert not {"Attention", "TensorScatter", "If"} & {op for _, op in ops}
    assert {o.domain: o.version for o in model.opset_import} == {"": 23, "com.microsoft": 1}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert "cache_position" not in inputs
    assert inputs["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert inputs[f"past_key_values.{kept[0]}.key"][2] == "cache_length"
    info = load_export_info(case.onnx_dir)
    assert (info["attention"], info["kv_cache"], info["logits"], info["opset"]) == ("gqa", "preallocated", "selected", 23)
    # the op's total_sequence_length comes from the mask's shape: nothing the host computes feeds device arithmetic
    assert host_to_device_values(model.graph) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_padding_and_a_batch_1_cache(arch):
    case = exported(arch, "gqa", "selected")
    lm = OrtCausalLM(case.onnx_dir)
    assert lm.packed and lm.preallocated and lm.io_binding
    seqs = random_sequences(4, seed=11, lo=4, hi=10)
    with reference(case) as model:
        assert_padded_batches_match(model, lm, seqs)  # batch 1 and 3, left and right padding
        # past > 0 (batch 1: the op takes multi-token steps after a cache for one sequence): three tokens, then one
        ids, mask, more, mask2 = continuation(seqs[1:4])
        ids, mask, more, mask2 = ids[:1], mask[:1], more[:1], mask2[:1]
        last = torch.tensor([[17]])
        mask3 = torch.cat([mask2, torch.ones(1, 1, dtype=torch.long)], dim=1)
        _, cache = torch_step(model, ids, mask)
        ref2, cache = torch_step(model, more, mask2, cache)
        ref3, _ = torch_step(model, last, mask3, cache)
        step = lm.forward(ids.numpy(), mask.numpy(), capacity=16)
        out2 = lm.forward(more.numpy(), mask2.numpy(), cache=step.cache)
        assert max_diff_real(out2.logits, ref2, torch.ones(1, 3)) <= ATOL
        out3 = lm.forward(last.numpy(), mask3.numpy(), cache=out2.cache)
        assert max_diff_real(out3.logits, ref3, torch.ones(1, 1)) <= ATOL


def test_each_sequence_is_packed_from_slot_0_of_the_callers_buffers():
    case = exported("llama", "gqa", "selected")
    lm = OrtCausalLM(case.onnx_dir)
    batch = left_pad(random_sequences(3, seed=5, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    lengths = mask.sum(1)
    step = lm.forward(ids, mask, greedy=True, capacity=16)
    before = {i: k.numpy().copy() for i, (k, _) in step.cache.past.items()}
    assert all(not k[:, :, ids.shape[1]:].any() for k in before.values())  # the prompt wrote its own T slots only
    mask2 = np.concatenate([mask, np.ones((3, 1), mask.dtype)], axis=1)
    after = lm.forward(step.next_token[:, None], mask2, cache=step.cache, greedy=True)
    assert after.cache.length == ids.shape[1] + 1
    for i, (k, _) in after.cache.past.items():
        assert k is step.cache.past[i][0]  # written in place
        now = k.numpy()
        for r, n in enumerate(lengths):
            assert np.array_equal(now[r, :, :n], before[i][r, :, :n])  # the prompt's slots kept
            assert not np.array_equal(now[r, :, n], before[i][r, :, n])  # the step's K at slot n
            # later slots: only what the prompt wrote at its padding (its slots 0..T-1 in every row), never more
            assert np.array_equal(now[r, :, n + 1:], before[i][r, :, n + 1:]) and not now[r, :, max(n + 1, ids.shape[1]):].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_matches_torch(arch):
    case = exported(arch, "gqa", "selected")
    batch = left_pad(random_sequences(3, seed=21, lo=3, hi=8))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with reference(case) as model:
        expected = torch_greedy(model, ids, mask, steps=16)
    tokens = OrtCausalLM(case.onnx_dir).generate(ids.numpy(), mask.numpy(), max_new_tokens=16)
    assert tokens.tolist() == expected.tolist()


def test_right_padded_prompts_decode_as_left_padded_ones():
    """The runner packs either padding the same way, so each sequence's greedy tokens do not depend on it."""
    from onnx_cases import right_pad

    lm = OrtCausalLM(exported("llama", "gqa", "selected").onnx_dir)
    seqs = random_sequences(3, seed=22, lo=3, hi=8)
    left, right = left_pad(seqs), right_pad(seqs)
    a = lm.generate(left["input_ids"].numpy(), left["attention_mask"].numpy(), max_new_tokens=10)
    b = lm.generate(right["input_ids"].numpy(), right["attention_mask"].numpy(), max_new_tokens=10)
    assert a.tolist() == b.tolist()


def test_buffers_grow_when_a_step_outruns_them():
    """Buffers of prompt + 1 slots grow as the decode outruns them; the tokens do not change. (The captured decode
    step's bindings are tested with the other preallocated graph's, in test_onnx_preallocated.py.)"""
    case = exported("llama", "gqa", "selected")
    batch = left_pad(random_sequences(3, seed=31, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    expected = OrtCausalLM(case.onnx_dir).generate(ids, mask, max_new_tokens=6)
    tight = OrtCausalLM(case.onnx_dir, reserve=1)
    out = tight.forward(ids, mask, greedy=True)
    tokens = [out.next_token]
    for _ in range(5):
        mask = np.concatenate([mask, np.ones((3, 1), mask.dtype)], axis=1)
        out = tight.forward(out.next_token[:, None], mask, cache=out.cache, greedy=True)
        tokens.append(out.next_token)
    assert out.cache.capacity > ids.shape[1] + 1
    assert np.stack(tokens, axis=1).tolist() == expected[:, :6].tolist()


def test_validate_and_package(tmp_path):
    from rtexport.onnx.package import package_ort_gpu

    case = exported("llama", "gqa", "selected")
    batches = [left_pad(random_sequences(3, seed=s, lo=4, hi=9)) for s in (1, 2)]
    report = validate(case.model, case.onnx_dir, token_batches=batches, steps=8)
    assert report.passed, report.checks
    assert "preallocated KV cache (GroupQueryAttention)" in parity_table(report).title
    out = package_ort_gpu(case.onnx_dir, tmp_path / "pkg", report)
    assert not (out / "genai_config.json").exists()
    readme = (out / "README.md").read_text()
    assert "GroupQueryAttention" in readme and "cache_position" not in readme


def test_refusals(tmp_path):
    case = exported("llama", "static")
    with pytest.raises(DataError, match="kv-cache preallocated"):
        export_onnx(case.loaded, tmp_path / "a", mode="static", plan=case.plan, attention="gqa", logits="selected")
    with pytest.raises(DataError, match="logits selected"):
        export_onnx(case.loaded, tmp_path / "b", mode="static", plan=case.plan, attention="gqa",
                    kv_cache="preallocated")
    with pytest.raises(DataError, match="opset"):
        export_onnx(case.loaded, tmp_path / "c", mode="static", plan=case.plan, attention="gqa",
                    kv_cache="preallocated", logits="selected", opset=22)
    assert not any((tmp_path / n).exists() for n in "abc")
    lm = OrtCausalLM(exported("llama", "gqa", "selected").onnx_dir)
    batch = left_pad(random_sequences(3, seed=3, lo=3, hi=6))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    step = lm.forward(ids, mask)
    more = np.ones((3, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="batch 1"):
        lm.forward(more, np.concatenate([mask, np.ones((3, 2), mask.dtype)], axis=1), cache=step.cache)
