"""The prefill layouts that ``examples/benchmarks/ort_gated_layouts.py`` derives from a gated export by rewriting
its ONNX file: BENCHMARKS.md's breakdown of the gated prefill's cost (sessions 9 and 10) compares them with the
export's own ``prefill.onnx``, so each must compute exactly what the gated graph computes."""

import shutil

import numpy as np
import onnx
import pytest
from conftest import benchmark_script
from onnx_cases import exported, random_sequences, right_pad

from rtexport.onnx.runtime import OrtCausalLM

INLINED = ("prefill_inlined", "prefill_masked")  # the layouts without any If


@pytest.fixture(scope="module")
def layouts_module():
    return benchmark_script("ort_gated_layouts")


def test_every_prefill_layout_computes_the_gated_prefill(layouts_module, tmp_path):
    """A prompt on which the routers run some routed layers and skip others: each layout's decisions, first greedy
    token and last-position logits equal the gated graph's (the same kernels on the same inputs, so bit for bit),
    and the layouts that claim it have no ``If`` and no unused condition (whose reduction ONNX Runtime would run on
    the CPU after a host copy) left."""
    case = exported("llama", "gated")
    folder = tmp_path / "gated"
    shutil.copytree(case.onnx_dir, folder)
    gated = OrtCausalLM(folder, providers=["CPUExecutionProvider"], phase_graphs=False)
    for seq in random_sequences(40, seed=3, lo=6, hi=10):  # a prompt on which the routers run some layers only
        ids = right_pad([seq])["input_ids"].numpy()
        decisions = gated.forward(ids, np.ones_like(ids)).cache.decisions
        skip = {i for r, i in enumerate(gated.routed_layers) if not decisions[:, r].any()}
        if 0 < len(skip) < len(gated.routed_layers):
            break
    else:
        pytest.fail("no prompt on which the routers run some routed layers and skip others")
    paths = layouts_module.write_layouts(folder, skip, layouts_module.PREFILL_LAYOUTS)
    for layout, path in paths.items():
        agree = layouts_module.prefill_agrees(gated, OrtCausalLM(path, providers=["CPUExecutionProvider"]), ids)
        assert agree == {"same_token_and_decisions": True, "last_logits_max_abs_diff": 0.0}, layout
        ops = [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]
        assert ("If" in ops) == (layout not in INLINED), layout
        if layout in INLINED:
            assert "ReduceMax" not in ops, layout
        if layout == "prefill_kv_early":
            assert sum(o == "MatMul" for o in ops) > sum(o == "MatMul" for o in onnx.load(
                folder / "prefill.onnx", load_external_data=False).graph.node)
