"""The graphs' ``next_token`` output: the greedy argmax taken on the device, so that a greedy loop copies one id
per sequence off it instead of the vocabulary's logits. Graphs exported before it existed still decode (the runner
takes the argmax of ``last_logits`` on the host)."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx_cases import exported, random_sequences

from rtexport.evaluation.parity import left_pad
from rtexport.onnx.runtime import OrtCausalLM


@pytest.mark.parametrize("mode", ["static", "gated", "preallocated"])
def test_next_token_is_the_argmax_of_the_last_logits(mode):
    case = exported("llama", mode)
    batch = left_pad(random_sequences(3, seed=7, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    lm = OrtCausalLM(case.onnx_dir)
    assert lm.output_names[-2:] == ["last_logits", "next_token"]
    logits = lm.forward(ids, mask, last_only=True)
    greedy = lm.forward(ids, mask, greedy=True)
    assert greedy.logits is None and greedy.next_token.shape == (3,) and greedy.next_token.dtype == np.int64
    assert greedy.next_token.tolist() == logits.logits[:, -1].argmax(-1).tolist()


def test_graph_without_next_token_still_decodes(tmp_path):
    case = exported("llama", "static")
    folder = tmp_path / "old"
    shutil.copytree(case.onnx_dir, folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kept = [o for o in model.graph.output if o.name != "next_token"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(folder / "model.onnx"))
    batch = left_pad(random_sequences(3, seed=8, lo=3, hi=8))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    old = OrtCausalLM(folder)
    assert "next_token" not in old.output_names
    expected = OrtCausalLM(case.onnx_dir).generate(ids, mask, max_new_tokens=8)
    assert old.generate(ids, mask, max_new_tokens=8).tolist() == expected.tolist()
