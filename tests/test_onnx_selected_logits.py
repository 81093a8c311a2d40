"""Graphs exported with ``logits="selected"``: a ``logits_positions`` (B, K) input names the positions to score, so a
generate loop's prefill runs the final norm and the LM head on the last position only (ONNX Runtime runs every node
of a graph whatever outputs are fetched, so a full-logits graph always pays the LM head over the whole prompt)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_cases import exported, random_sequences, right_pad

from rtexport.errors import ArtifactMismatch
from rtexport.evaluation.parity import left_pad
from rtexport.onnx.export import load_export_info
from rtexport.onnx.genai import genai_config
from rtexport.onnx.runtime import OrtCausalLM

MODES = ["static", "gated", "preallocated"]


def _batch(seed: int, pad=left_pad):
    batch = pad(random_sequences(3, seed=seed, lo=3, hi=8))
    return batch["input_ids"].numpy(), batch["attention_mask"].numpy()


@pytest.mark.parametrize("mode", MODES)
def test_layout_gathers_before_the_lm_head(mode):
    case = exported("llama", mode, "selected")
    model = onnx.load(str(case.onnx_dir / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs)[-1] == "logits_positions"
    dims = [d.dim_param for d in inputs["logits_positions"].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "logits_length"]
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_param == "logits_length"
    info = load_export_info(case.onnx_dir)
    assert info["logits"] == "selected" and info["inputs"][-1] == "logits_positions"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["rtexport.logits"] == "selected"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pad", [left_pad, right_pad], ids=["left", "right"])
def test_every_position_equals_the_full_logits_graph(mode, pad):
    full, selected = OrtCausalLM(exported("llama", mode).onnx_dir), OrtCausalLM(exported("llama", mode, "selected").onnx_dir)
    ids, mask = _batch(11, pad)
    want = full.forward(ids, mask).logits
    got = selected.forward(ids, mask).logits
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    last = selected.forward(ids, mask, last_only=True).logits
    np.testing.assert_allclose(last, want[:, -1:], atol=1e-5, rtol=0)


def test_arbitrary_positions_per_sequence():
    lm = OrtCausalLM(exported("llama", "static", "selected").onnx_dir)
    ids, mask = _batch(12)
    want = OrtCausalLM(exported("llama", "static").onnx_dir).forward(ids, mask).logits
    positions = np.array([[0, 2, 2], [1, 0, 3], [3, 3, 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": np.where(mask > 0, mask.cumsum(1) - 1, 0),
             "logits_positions": positions}
    for i in lm.kv_layers:
        empty = np.zeros((3, lm.num_kv_heads, 0, lm.head_dim), dtype=np.float32)
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    got = lm.session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, np.take_along_axis(want, positions[:, :, None], axis=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_greedy_generation_equals_the_full_logits_graph(mode):
    ids, mask = _batch(13)
    want = OrtCausalLM(exported("llama", mode).onnx_dir).generate(ids, mask, max_new_tokens=16)
    got = OrtCausalLM(exported("llama", mode, "selected").onnx_dir).generate(ids, mask, max_new_tokens=16)
    assert got.tolist() == want.tolist()


def test_cuda_graph_step_binds_the_positions():
    """The captured decode step's bindings, driven on the CPU provider (what the H200 replays)."""
    ids, mask = _batch(14)
    want = OrtCausalLM(exported("llama", "preallocated").onnx_dir).generate(ids, mask, max_new_tokens=8)
    lm = OrtCausalLM(exported("llama", "preallocated", "selected").onnx_dir)
    lm.cuda_graph = True  # _GraphStep's bindings on the CPU: no capture, the same fixed buffers
    assert lm.generate(ids, mask, max_new_tokens=8).tolist() == want.tolist()
    step = next(iter(lm._graphs.values()))
    assert step.inputs["logits_positions"].shape() == [3, 1]


def test_genai_config_refuses_selected_logits():
    info = load_export_info(exported("llama", "static", "selected").onnx_dir)
    with pytest.raises(ArtifactMismatch, match="logits_positions"):
        genai_config(info)
