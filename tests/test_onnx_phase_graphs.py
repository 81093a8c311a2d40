"""Stage: a gated export's phase graphs, ``prefill.onnx`` and ``decode.onnx`` (``rtexport.onnx.phase_graphs``): each
branch of the prefill flag's ``If`` lifted into a graph of its own, over the same weights file, and ``OrtCausalLM``
running them as two sessions given the same weight tensors (why: the decode step's per-node cost inside the prefill
``If``, measured on the GPU machine, BENCHMARKS.md; on CUDA by default, on the CPU when asked).

Here, under ONNX Runtime's CPU provider: the files and the export record, the layout (no prefill ``If``, one ``If``
per routed layer, the gated graph's inputs, outputs and metadata, no weights inside), logits and greedy tokens equal
to the single gated graph's for padded batches, the weights loaded once and handed to both sessions, the package and
its standalone runner, validate's check of model.onnx against them, tied embeddings (a main-graph node the branches
read), and the refusal of graphs without the prefill ``If``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_cases import ROUTED_LAYERS, exported, random_sequences, right_pad

from rtexport.errors import ArtifactMismatch
from rtexport.evaluation.parity import left_pad, validate
from rtexport.onnx.export import load_export_info
from rtexport.onnx.phase_graphs import MANIFEST_NAME, PHASE_GRAPHS, lift_phase
from rtexport.onnx.runtime import OrtCausalLM

ARCHS = ("llama", "qwen2")


def _ifs(graph):
    return [n for n in graph.node if n.op_type == "If"]


def test_export_writes_and_records_the_phase_graphs():
    case = exported("llama", "gated")
    info = load_export_info(case.onnx_dir)
    assert info["phase_graphs"] == sorted([*PHASE_GRAPHS.values(), MANIFEST_NAME])
    for name in info["phase_graphs"]:
        assert info["files"][name]["sha256"]
    gated = onnx.load(case.onnx_dir / "model.onnx", load_external_data=False)
    manifest = json.loads((case.onnx_dir / MANIFEST_NAME).read_text())
    assert manifest["graphs"] == PHASE_GRAPHS
    stored = {t.name for t in gated.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert {e["name"] for e in manifest["initializers"]} == stored
    assert {e["file"] for e in manifest["initializers"]} == {"model.onnx.data"}
    for phase, name in PHASE_GRAPHS.items():
        graph = onnx.load(case.onnx_dir / name, load_external_data=False)
        # the prefill flag's If is gone; each routed layer keeps its own If
        ifs = _ifs(graph.graph)
        assert len(ifs) == len(ROUTED_LAYERS)
        if phase == "decode":  # on the host input the caller sets, never on a value the graph computes
            assert sorted(n.input[0] for n in ifs) == [f"run_layer.{i}" for i in ROUTED_LAYERS]
        assert [i.name for i in graph.graph.input] == [i.name for i in gated.graph.input]
        assert [o.name for o in graph.graph.output] == [o.name for o in gated.graph.output]
        assert {p.key: p.value for p in graph.metadata_props} == {p.key: p.value for p in gated.metadata_props}
        # the weights stay in model.onnx.data, read by reference
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer if t.name in stored)
        assert (case.onnx_dir / name).stat().st_size < 2 * (case.onnx_dir / "model.onnx").stat().st_size
    # the decode graph reads no router
    decode = onnx.load(case.onnx_dir / "decode.onnx", load_external_data=False)
    assert not [t.name for t in decode.graph.initializer if "router" in t.name]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pad", [right_pad, left_pad])
def test_phase_graphs_compute_what_the_single_graph_computes(arch, pad):
    case = exported(arch, "gated")
    phases = OrtCausalLM(case.onnx_dir, phase_graphs=True)
    single = OrtCausalLM(case.onnx_dir, phase_graphs=False)
    assert phases.phases and not single.phases
    batch = pad(random_sequences(3, seed=5, lo=3, hi=9))
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    a, b = phases.forward(ids, mask), single.forward(ids, mask)
    real = mask.astype(bool)
    assert np.abs(a.logits - b.logits)[real].max() <= 1e-5
    assert (a.cache.decisions == b.cache.decisions).all()
    for _ in range(3):  # decode steps through the caches each built
        token = a.logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((3, 1), mask.dtype)], axis=1)
        a, b = phases.forward(token, mask, cache=a.cache), single.forward(token, mask, cache=b.cache)
        assert np.abs(a.logits - b.logits).max() <= 1e-5
    want = single.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=16)
    got = phases.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), max_new_tokens=16)
    assert got.tolist() == want.tolist()


def test_the_runner_uses_them_on_cuda_only_by_default():
    case = exported("llama", "gated")
    assert not OrtCausalLM(case.onnx_dir).phases  # the CPU provider: each session would prepack its own weights
    assert not OrtCausalLM(exported("llama", "static").onnx_dir, phase_graphs=True).phases  # a static export has none


def test_another_graph_of_the_folder_runs_itself_not_the_phase_graphs(tmp_path):
    # a benchmark's derived layout next to model.onnx once ran prefill.onnx / decode.onnx in its place, unnoticed
    case = exported("llama", "gated")
    folder = tmp_path / "gated"
    shutil.copytree(case.onnx_dir, folder)
    assert json.loads((folder / MANIFEST_NAME).read_text())["source"] == "model.onnx"
    (folder / "copy.onnx").write_bytes((folder / "model.onnx").read_bytes())
    other = OrtCausalLM(folder / "copy.onnx", phase_graphs=True)
    assert not other.phases and other.prefill_session is other.session
    assert Path(other.session._model_path).name == "copy.onnx"
    assert OrtCausalLM(folder / "model.onnx", phase_graphs=True).phases
    # a record written before "source" was kept derives the phase graphs from model.onnx
    record = json.loads((folder / MANIFEST_NAME).read_text())
    del record["source"]
    (folder / MANIFEST_NAME).write_text(json.dumps(record))
    assert OrtCausalLM(folder, phase_graphs=True).phases
    assert not OrtCausalLM(folder / "copy.onnx", phase_graphs=True).phases


def test_a_phase_session_kept_without_its_runner_still_holds_the_weights():
    # ONNX Runtime keeps no reference to initializers given with add_initializer: a session taken from a runner
    # that is then dropped read freed memory (a segmentation fault) until each session held the weights itself
    import gc

    case = exported("llama", "gated")
    ids = np.array([[5, 7, 11, 13]], dtype=np.int64)
    want = OrtCausalLM(case.onnx_dir, phase_graphs=True).forward(ids, np.ones_like(ids), last_only=True).logits
    session = OrtCausalLM(case.onnx_dir, phase_graphs=True).prefill_session
    gc.collect()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None],
             "routing_decisions": np.ones((1, len(ROUTED_LAYERS)), dtype=np.bool_),
             **{f"run_layer.{i}": np.array(True) for i in ROUTED_LAYERS}}
    for name in (i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")):
        feeds[name] = np.zeros((1, 2, 0, 16), np.float32)
    logits = session.run(["logits"], feeds)[0]
    assert np.abs(logits[:, -1:] - want).max() <= 1e-5


def test_both_sessions_are_given_the_weights_where_the_manifest_locates_them():
    case = exported("llama", "gated")
    lm = OrtCausalLM(case.onnx_dir, phase_graphs=True)
    manifest = json.loads((case.onnx_dir / MANIFEST_NAME).read_text())
    assert set(lm._weights.values) == {e["name"] for e in manifest["initializers"]}
    # views of one read-only map of the weights file: no copy made here
    data = np.memmap(case.onnx_dir / "model.onnx.data", dtype=np.uint8, mode="r")
    for e in manifest["initializers"][:5]:
        value = lm._weights.values[e["name"]]
        want = np.asarray(data[e["offset"]:e["offset"] + e["length"]]).view(e["dtype"]).reshape(e["dims"])
        assert np.array_equal(value.numpy(), want)
    assert lm.prefill_session is not lm.session
    # each session loading its own copy computes the same
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 7))
    unshared = OrtCausalLM(case.onnx_dir, phase_graphs=True, share_weights=False)
    assert unshared._weights is None
    assert unshared.generate(ids, max_new_tokens=8).tolist() == lm.generate(ids, max_new_tokens=8).tolist()


def test_package_ships_them_and_its_runner_uses_them(tmp_path, monkeypatch):
    from rtexport.onnx.package import package_ort_gpu

    case = exported("llama", "gated")
    batches = [right_pad(random_sequences(3, seed=s, lo=4, hi=9)) for s in (1, 2)]
    report = validate(case.routed, case.onnx_dir, token_batches=batches, steps=8)
    assert report.passed, report.checks
    out = package_ort_gpu(case.onnx_dir, tmp_path / "pkg", report)
    for name in (*PHASE_GRAPHS.values(), MANIFEST_NAME):
        assert (out / name).is_file()
    assert "decode.onnx" in (out / "README.md").read_text()
    spec = importlib.util.spec_from_file_location("packaged_run_ort", out / "run_ort.py")
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)  # its dataclasses look their module up
    spec.loader.exec_module(runner)  # the package's standalone runner: numpy and onnxruntime only
    assert not runner.OrtCausalLM(out, providers=["CPUExecutionProvider"]).phases  # on the CPU: model.onnx
    lm = runner.OrtCausalLM(out, providers=["CPUExecutionProvider"], phase_graphs=True)
    assert lm.phases
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 6))
    want = OrtCausalLM(case.onnx_dir, phase_graphs=False).generate(ids, max_new_tokens=8)
    assert lm.generate(ids, max_new_tokens=8).tolist() == want.tolist()


def test_graphs_without_the_prefill_if_are_refused():
    static = onnx.load(exported("llama", "static").onnx_dir / "model.onnx", load_external_data=False)
    with pytest.raises(ArtifactMismatch, match="prefill If"):
        lift_phase(static, "decode")
    gated = onnx.load(exported("llama", "gated").onnx_dir / "model.onnx", load_external_data=False)
    with pytest.raises(ValueError, match="phase must be"):
        lift_phase(gated, "both")


def test_validate_catches_a_decode_graph_that_differs_from_model_onnx(tmp_path):
    import shutil

    case = exported("llama", "gated")
    broken = tmp_path / "broken"
    shutil.copytree(case.onnx_dir, broken)
    graph = onnx.load(broken / "decode.onnx", load_external_data=False)
    add = next(n for n in graph.graph.node if n.op_type == "Add")  # a residual add: Sub keeps the file's size
    add.op_type = "Sub"
    (broken / "decode.onnx").write_bytes(graph.SerializeToString())
    batches = [right_pad(random_sequences(3, seed=1, lo=4, hi=9))]
    report = validate(case.routed, broken, token_batches=batches, steps=4)
    assert not report.passed
    assert report.check("single_graph_agreement").passed is False


def test_tied_embeddings_keep_the_main_graph_nodes_the_branches_read(tmp_path):
    """A model whose LM head is its embedding (SmolLM2): the exporter computes the transposed head once, in the main
    graph before the prefill If, and both phase graphs must keep that node."""
    from conftest import build_model, build_tokenizer
    from onnx_cases import randomise_routers

    from rtexport.models.loading import wrap_model
    from rtexport.onnx.export import export_onnx
    from rtexport.routing import RoutedModel

    model = build_model("llama", num_hidden_layers=4, tie_word_embeddings=True)
    loaded = wrap_model(model, tokenizer=build_tokenizer(), model_id="tiny-tied")
    routed = RoutedModel.from_model(model, layers=ROUTED_LAYERS)
    randomise_routers(routed)
    export_onnx(loaded, tmp_path / "gated", mode="gated", routed=routed)
    gated = onnx.load(tmp_path / "gated" / "model.onnx", load_external_data=False)
    outside = [n for n in gated.graph.node if n.op_type not in ("If", "Shape", "Squeeze", "Sub", "Equal")]
    assert outside, "the tied head is no longer computed outside the prefill If: this test checks nothing"
    for name in PHASE_GRAPHS.values():
        onnx.checker.check_model(str(tmp_path / "gated" / name))
    ids = np.random.default_rng(2).integers(0, 256, size=(2, 6))
    want = OrtCausalLM(tmp_path / "gated", phase_graphs=False).generate(ids, max_new_tokens=8)
    assert OrtCausalLM(tmp_path / "gated", phase_graphs=True).generate(ids, max_new_tokens=8).tolist() == want.tolist()


def test_decode_graph_computes_a_skipped_layers_input_norm_only_in_its_run_branch():
    case = exported("llama", "gated")
    decode = onnx.load(case.onnx_dir / "decode.onnx", load_external_data=False).graph
    prefill = onnx.load(case.onnx_dir / "prefill.onnx", load_external_data=False).graph

    def branch_only(graph):
        """Main-graph nodes whose results nothing but one branch of one If reads."""
        readers = {o.name: {(-1, "output")} for o in graph.output}
        for k, node in enumerate(graph.node):
            for name in node.input:
                readers.setdefault(name, set()).add((k, "input"))
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    names = set()
                    stack = [attr.g]
                    while stack:
                        g = stack.pop()
                        for n in g.node:
                            names.update(n.input)
                            stack += [a.g for a in n.attribute if a.g is not None and a.g.node]
                    for name in names:
                        readers.setdefault(name, set()).add((k, attr.name))
        found = []
        for n in graph.node:
            where = set().union(*(readers.get(o, set()) for o in n.output))
            if len(where) == 1 and next(iter(where))[1] in ("then_branch", "else_branch"):
                found.append(n.name)
        return found

    assert branch_only(decode) == []
    for node in _ifs(decode):  # each run branch starts from the layer's input, not from its norm
        run = next(a.g for a in node.attribute if a.name == "then_branch")
        assert run.node[0].op_type == "RMSNormalization"
    # at prefill the router reads the norm too: it stays in the main graph
    assert all(next(a.g for a in n.attribute if a.name == "then_branch").node[0].op_type != "RMSNormalization"
               for n in _ifs(prefill))


def test_steps_after_the_prefill_bind_their_fixed_inputs_once():
    case = exported("llama", "gated")
    lm = OrtCausalLM(case.onnx_dir, phase_graphs=True, io_binding=True)
    plain = OrtCausalLM(case.onnx_dir, phase_graphs=True, io_binding=False)
    # a sequence that some routed layer skips: that layer keeps no cache
    for seq in random_sequences(40, seed=11):
        ids = np.array([seq])
        first = lm.forward(ids, np.ones_like(ids))
        if not first.cache.decisions.all():
            break
    else:
        pytest.fail("no sequence skips a routed layer")
    skipped = [i for r, i in enumerate(lm.routed_layers) if not first.cache.decisions[0, r]]
    routing = first.cache.routing
    assert {f"past_key_values.{i}.{kind}" for i in skipped for kind in ("key", "value")} < set(routing.feeds)
    assert "routing_decisions" in routing.feeds and "decisions" in routing.dropped
    assert {k: bool(v) for k, v in routing.host.items()} == {f"run_layer.{i}": i not in skipped
                                                            for i in lm.routed_layers}
    ref = plain.forward(ids, np.ones_like(ids))
    mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    mask2 = np.ones((1, ids.shape[1] + 2), dtype=np.int64)
    token = first.logits[:, -1].argmax(-1)[:, None]
    a = lm.forward(token, mask, cache=first.cache)
    token2 = a.logits[:, -1].argmax(-1)[:, None]
    b = lm.forward(token2, mask2, cache=a.cache)  # a later step, then ...
    again = lm.forward(token, mask, cache=first.cache)  # ... the first cache continued a second time
    want = plain.forward(token, mask, cache=ref.cache)
    want2 = plain.forward(token2, mask2, cache=want.cache)
    assert a.cache.routing.binding is not None and again.cache.routing.binding is a.cache.routing.binding
    assert np.abs(a.logits - want.logits).max() <= 1e-5
    assert np.abs(b.logits - want2.logits).max() <= 1e-5
    assert np.abs(again.logits - want.logits).max() <= 1e-5
    for i in skipped:
        assert a.cache.past[i][0].shape()[2] == 0  # still no cache for a layer nobody runs
    assert b.cache.active == {i: i not in skipped for i in lm.routed_layers}


def test_the_routers_mean_weights_are_computed_once_per_step():
    case = exported("llama", "gated")
    prefill = onnx.load(case.onnx_dir / "prefill.onnx", load_external_data=False).graph
    # one ReduceSum (the real tokens per sequence) for every router, not a float32 copy summed per routed layer
    assert [n.op_type for n in prefill.node].count("ReduceSum") == 1
    producer = {o: n for n in prefill.node for o in n.output}

    def source(name):  # through a cast to float32 (float16 graphs)
        node = producer[name]
        return source(node.input[0]) if node.op_type == "Cast" else node

    routers = [n for n in prefill.node if n.op_type == "MatMul" and "router" in n.input[1]]
    means = [source(n.input[0]) for n in routers]  # each router's masked mean: (B,1,T) weights x (B,T,hidden)
    assert len(routers) == len(ROUTED_LAYERS) and all(n.op_type == "MatMul" for n in means)
    assert len({n.input[0] for n in means}) == 1  # the same weights for every router


def test_model_onnx_can_share_the_phase_graphs_weights():
    case = exported("llama", "gated")
    phases = OrtCausalLM(case.onnx_dir, phase_graphs=True)
    single = OrtCausalLM(case.onnx_dir, phase_graphs=False, share_weights_with=phases)
    assert single._weights is phases._weights and not single.phases
    alone = OrtCausalLM(case.onnx_dir, phase_graphs=False)
    ids = np.random.default_rng(3).integers(0, 256, size=(2, 6))
    assert single.generate(ids, max_new_tokens=8).tolist() == alone.generate(ids, max_new_tokens=8).tolist()
    # a runner without shared weights, or of another export, has none to give
    with pytest.raises(ValueError, match="share_weights_with"):
        OrtCausalLM(case.onnx_dir, phase_graphs=False, share_weights_with=alone)
    other = exported("qwen2", "gated")
    with pytest.raises(ValueError, match="share_weights_with"):
        OrtCausalLM(other.onnx_dir, phase_graphs=False, share_weights_with=phases)
