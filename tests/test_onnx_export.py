"""Stage: ONNX export. Static and gated graphs of tiny random Llama and Qwen2 models against PyTorch under ONNX
Runtime (CPU): graph layout, logits parity over real tokens with padding and with a cache, greedy decoding."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import onnx
import pytest
import torch
from conftest import build_model
from onnx_cases import NUM_LAYERS, ROUTED_LAYERS, STATIC_SKIP, exported, random_sequences, reference, right_pad

from rtexport.errors import ArtifactMismatch, DataError
from rtexport.evaluation.parity import _cache_kwarg, _returned_cache, left_pad, positions, torch_greedy
from rtexport.models.loading import wrap_model
from rtexport.onnx.export import check_graph, export_onnx, load_export_info
from rtexport.onnx.runtime import OrtCausalLM
from rtexport.planning import SkipPlan
from rtexport.routing import RoutedModel

ARCHS = ("llama", "qwen2")
ATOL = 1e-4


# ---- helpers ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def torch_step(model, ids, mask, cache=None):
    pos = positions(mask)[:, -ids.shape[1]:]
    kwargs = {_cache_kwarg(model): cache} if cache is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)
    return out.logits.float(), _returned_cache(out)


def max_diff_real(a, b, mask):
    return float((torch.as_tensor(a).float() - b.float()).abs()[mask > 0].max())


def continuation(seqs):
    """A left-padded prompt of the three sequences and three more tokens each: ``(ids, mask, more, full_mask)``."""
    batch = left_pad(seqs)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    more = torch.randint(0, 256, (3, 3), generator=torch.Generator().manual_seed(3))
    return ids, mask, more, torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)


def assert_padded_batches_match(model, ort_model, seqs):
    """Prefill logits over real tokens: one sequence, three left-padded, three right-padded."""
    for batch in (left_pad(seqs[:1]), left_pad(seqs[1:4]), right_pad(seqs[1:4])):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ref, _ = torch_step(model, ids, mask)
        out = ort_model.forward(ids.numpy(), mask.numpy())
        assert max_diff_real(out.logits, ref, mask) <= ATOL


@torch.no_grad()
def decisions_alone(case, seq):
    """The routers' decisions for one sequence on its own, or None when a score is too close to the threshold."""
    case.model(input_ids=torch.tensor([seq]))
    scores = case.routed.state.scores
    if any(abs(float(scores[i]) - 0.5) < 0.05 for i in ROUTED_LAYERS):
        return None
    return tuple(bool(float(scores[i]) >= 0.5) for i in ROUTED_LAYERS)


def branch_inputs(case):
    """Sequences whose decisions differ: enough to take both branches of each If, alone and in one batch."""
    by_pattern = {}
    for seq in random_sequences(60, seed=5):
        d = decisions_alone(case, seq)
        if d is not None:
            by_pattern.setdefault(d, []).append(seq)
    return by_pattern


# ---- layout ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_static_graph_holds_kv_only_for_kept_attention(arch):
    case = exported(arch, "static")
    path = case.onnx_dir / "model.onnx"
    check_graph(path)  # by path: the weights live in model.onnx.data
    assert (case.onnx_dir / "model.onnx.data").stat().st_size > 0
    info = load_export_info(case.onnx_dir)
    assert info["mode"] == "static" and info["spec"]["kv_layers"] == [0, 3]
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    kept = [i for i in range(NUM_LAYERS) if i not in STATIC_SKIP]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in kept for kind in ("key", "value")
    ]
    assert outputs == ["logits"] + [f"present.{i}.{kind}" for i in kept for kind in ("key", "value")] + ["last_logits", "next_token"]
    assert not [n for n in model.graph.node if n.op_type == "If"]
    # weights keep their parameter names: the kept layers' attention is there, the skipped layers' is not
    names = {t.name for t in model.graph.initializer}
    for i in range(NUM_LAYERS):
        assert (f"layers.{i}.q_proj.weight.T" in names) == (i not in STATIC_SKIP)
        assert f"layers.{i}.mlp.down_proj.weight.T" in names
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]


@pytest.mark.parametrize("arch", ARCHS)
def test_gated_graph_has_one_block_if_per_routed_layer_on_host_inputs(arch):
    case = exported(arch, "gated")
    model = onnx.load(str(case.onnx_dir / "model.onnx"), load_external_data=False)
    # one If on the prefill flag (computed from input shapes, host-side; see test_onnx_attention.py for the check
    # that no host value reaches device arithmetic) around the whole decoder; in each branch one If per routed
    # layer: at prefill on the router's decisions (any sequence runs it), at decode on the host input run_layer.{i}
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1 and not ifs[0].input[0].startswith("run_layer.")
    branches = {a.name: a.g for a in ifs[0].attribute}
    assert set(branches) == {"then_branch", "else_branch"}
    inner = {k: [x for x in g.node if x.op_type == "If"] for k, g in branches.items()}
    assert len(inner["then_branch"]) == len(inner["else_branch"]) == len(ROUTED_LAYERS)
    assert not [x for x in inner["then_branch"] if x.input[0].startswith("run_layer.")]  # the routers' decisions
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 20:
        # "some sequence runs it" is one bool ReduceMax, not torch.any's Cast, ReduceMax, Cast (bool_reduce.py)
        made = {o: n for n in branches["then_branch"].node for o in n.output}
        for block_if in inner["then_branch"]:
            reduce = made[block_if.input[0]]
            assert reduce.op_type == "ReduceMax" and made[reduce.input[0]].op_type != "Cast"
    assert [x.input[0] for x in inner["else_branch"]] == [f"run_layer.{i}" for i in ROUTED_LAYERS]
    # the routers' weights are read at prefill only
    def reads(graph):
        names = set()
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    names |= reads(attr.g)
        return names

    assert {n for n in reads(branches["then_branch"]) if ".router." in n} == {
        f"layers.{i}.router.weight.T" for i in ROUTED_LAYERS}
    assert not [n for n in reads(branches["else_branch"]) if ".router." in n]
    for block_if in inner["then_branch"] + inner["else_branch"]:
        sub = {a.name: a.g for a in block_if.attribute}
        # the skip branch returns its inputs (x, the past as the present): no shape arithmetic, no placeholder
        assert [x.op_type for x in sub["else_branch"].node] == ["Identity"] * 3
        # a layer that runs reads the shared causal mask as it is (no per-layer Slice of it)
        assert "Slice" not in [x.op_type for x in sub["then_branch"].node]
    # a routed attention's weights are used in two branches and stored once, under the model's parameter names
    weights = onnx.load(str(case.onnx_dir / "model.onnx"), load_external_data=False).graph.initializer
    stored = [t.name for t in weights if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(stored) == len(set(stored)) and not [n for n in stored if n.startswith("val_")]
    for i in ROUTED_LAYERS:
        assert f"layers.{i}.q_proj.weight.T" in stored
    inputs = {i.name: i for i in model.graph.input}
    for i in ROUTED_LAYERS:
        t = inputs[f"run_layer.{i}"].type.tensor_type
        assert t.elem_type == onnx.TensorProto.BOOL and len(t.shape.dim) == 0
    assert all(f"past_key_values.{i}.key" in inputs for i in range(NUM_LAYERS))
    assert "routing_decisions" in inputs and [o.name for o in model.graph.output][-3:] == ["decisions", "last_logits", "next_token"]


# ---- parity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_static_parity_padding_and_cache(arch):
    case = exported(arch, "static")
    ort_model = OrtCausalLM(case.onnx_dir)
    seqs = random_sequences(4, seed=11, lo=4, hi=10)
    with reference(case) as model:
        assert_padded_batches_match(model, ort_model, seqs)
        # past > 0: a left-padded prefill, then three more tokens through the cache
        ids, mask, more, full_mask = continuation(seqs[1:4])
        _, cache = torch_step(model, ids, mask)
        ref, _ = torch_step(model, more, full_mask, cache)
        step = ort_model.forward(ids.numpy(), mask.numpy())
        assert step.cache.length == ids.shape[1]
        assert set(step.cache.past) == {0, 3}
        out = ort_model.forward(more.numpy(), full_mask.numpy(), cache=step.cache)
        assert max_diff_real(out.logits, ref, torch.ones(3, 3)) <= ATOL


@pytest.mark.parametrize("arch,mode", [("llama", "gated"), ("qwen2", "gated"), ("llama", "gated_always")])
def test_gated_parity_takes_each_branch(arch, mode):
    """gated_always: routed layer 1 runs at prefill without an If (masked per sequence): the same logits, decisions
    and caches (a layer no sequence runs keeps none: the runner drops the present it computed)."""
    case = exported(arch, mode)
    ort_model = OrtCausalLM(case.onnx_dir)
    patterns = branch_inputs(case)
    mixed = [patterns[p][0] for p in sorted(patterns)][:3]
    assert len(mixed) == 3, f"test inputs do not cover enough decision patterns: {sorted(patterns)}"
    # batch 1 for every pattern (a layer skipped alone takes the else branch), then one mixed batch of 3
    batches = [left_pad([patterns[p][0]]) for p in sorted(patterns)] + [left_pad(mixed)]
    taken = {(i, kind): 0 for i in ROUTED_LAYERS for kind in ("skip_all", "masked", "run_all")}
    model = case.model
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        more = torch.randint(0, 256, (b, 2), generator=torch.Generator().manual_seed(b))
        full_mask = torch.cat([mask, torch.ones(b, 2, dtype=torch.long)], dim=1)
        ref, cache = torch_step(model, ids, mask)
        ref_dec = case.routed.decisions()
        ref2, _ = torch_step(model, more, full_mask, cache)

        step = ort_model.forward(ids.numpy(), mask.numpy())
        assert max_diff_real(step.logits, ref, mask) <= ATOL
        for r, i in enumerate(ROUTED_LAYERS):
            assert step.cache.decisions[:, r].tolist() == ref_dec[i].tolist()
            d = step.cache.decisions[:, r]
            taken[i, "run_all" if d.all() else "skip_all" if not d.any() else "masked"] += 1
            # a layer no sequence runs keeps no cache
            assert step.cache.past[i][0].shape[2] == (ids.shape[1] if d.any() else 0)
        out = ort_model.forward(more.numpy(), full_mask.numpy(), cache=step.cache)
        assert max_diff_real(out.logits, ref2, torch.ones(b, 2)) <= ATOL
    assert all(taken.values()), f"not every routed layer took every branch: {taken}"


def test_gated_graph_takes_prompts_of_one_to_three_tokens():
    """Short prompts: sizes 1 to 3 are those the exporter is most tempted to specialise."""
    case = exported("llama", "gated")
    ort_model = OrtCausalLM(case.onnx_dir)
    for length in (1, 2, 3):
        ids = torch.tensor([[5, 7, 9][:length]])
        mask = torch.ones_like(ids)
        ref, _ = torch_step(case.model, ids, mask)
        step = ort_model.forward(ids.numpy(), mask.numpy())
        assert max_diff_real(step.logits, ref, mask) <= ATOL
        more = ort_model.forward(np.array([[3]]), np.ones((1, length + 1), dtype=np.int64), cache=step.cache)
        assert more.logits.shape == (1, 1, ref.shape[-1])


def test_gated_prefill_runs_only_the_sub_blocks_some_sequence_needs():
    """At prefill the routers decide inside the graph and a routed attention no sequence of the batch needs is not
    run: its present is its past, unchanged and empty (the graph before this ran every routed block at prefill and
    masked the result, so its present held the layer's real keys)."""
    case = exported("llama", "gated")
    ort_model = OrtCausalLM(case.onnx_dir)
    patterns = branch_inputs(case)
    for pattern, seqs in sorted(patterns.items()):
        batch = left_pad(seqs[:2])
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(batch["attention_mask"]).numpy(),
                 "routing_decisions": np.ones((2, len(ROUTED_LAYERS)), dtype=np.bool_)}
        for i in range(NUM_LAYERS):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros((2, 2, 0, 16),
                                                                                               np.float32)
        feeds.update({f"run_layer.{i}": np.array(True) for i in ROUTED_LAYERS})
        names = ["decisions"] + [f"present.{i}.key" for i in ROUTED_LAYERS]
        decisions, *presents = ort_model.prefill_session.run(names, feeds)
        assert decisions.tolist() == [list(pattern)] * 2
        for r, present in enumerate(presents):
            assert present.shape == (2, 2, ids.shape[1] if pattern[r] else 0, 16), (pattern, r)
            assert not pattern[r] or np.abs(present).max() > 0


def test_prefill_always_layers_run_at_prefill_without_an_if():
    """prefill_always=[1]: at prefill layer 1 runs for the whole batch with no If (its present holds the prompt's
    keys even when no sequence runs it; the runner drops it then), layer 2 in its If; after prefill both are in an
    If on their host flag. Recorded in the export's spec."""
    from onnx_cases import PREFILL_ALWAYS

    case = exported("llama", "gated_always")
    assert load_export_info(case.onnx_dir)["spec"]["prefill_always"] == PREFILL_ALWAYS == [1]

    def layer_ifs(path):
        model = onnx.load(str(case.onnx_dir / path), load_external_data=False)
        ifs = [n for n in model.graph.node if n.op_type == "If"]
        return sorted({w.split(".")[1] for n in ifs for a in n.attribute if a.name == "then_branch"
                       for x in a.g.node for w in x.input if w.endswith("q_proj.weight.T")})

    assert layer_ifs("prefill.onnx") == ["2"]
    assert layer_ifs("decode.onnx") == ["1", "2"]
    ort_model = OrtCausalLM(case.onnx_dir, phase_graphs=True)
    patterns = branch_inputs(case)
    skipped = next((s for p, s in sorted(patterns.items()) if not p[0]), None)
    assert skipped is not None, f"no test input skips layer 1: {sorted(patterns)}"
    batch = left_pad(skipped[:2])
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(batch["attention_mask"]).numpy(),
             "routing_decisions": np.ones((2, len(ROUTED_LAYERS)), dtype=np.bool_),
             **{f"run_layer.{i}": np.array(True) for i in ROUTED_LAYERS}}
    for i in range(NUM_LAYERS):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros((2, 2, 0, 16), np.float32)
    decisions, present = ort_model.prefill_session.run(["decisions", "present.1.key"], feeds)
    assert not decisions[:, 0].any() and present.shape[2] == ids.shape[1]
    step = ort_model.forward(ids, mask)
    assert step.cache.past[1][0].shape[2] == 0  # dropped: no sequence runs layer 1


def test_prefill_always_auto_follows_the_routers_execution_rates(tmp_path):
    """"auto": the routed layers the routers ran for >= 90% of held-out sequences; none without rates. Layers that
    are not routed, or not layers at all, are one clear error."""
    from rtexport.onnx.export import build_graph_module
    from rtexport.onnx.graph_model import prefill_always_from_rates

    assert prefill_always_from_rates({"1": 0.95, "2": 0.5}, [1, 2]) == [1]
    assert prefill_always_from_rates({"1": 0.9, "2": 1.0}, [1, 2]) == [1, 2]
    assert prefill_always_from_rates({}, [1, 2]) == []
    model = build_model("llama", num_hidden_layers=NUM_LAYERS)
    loaded = wrap_model(model, model_id="tiny-llama")
    routed = RoutedModel.from_model(model, layers=ROUTED_LAYERS)
    try:
        build = functools.partial(build_graph_module, loaded, mode="gated", routed=routed, prefill_select="cond")
        assert build().spec.prefill_always == ()  # auto, no measured rates
        routed.config.execution_rates = {"1": 0.2, "2": 0.97}
        assert build().spec.prefill_always == (2,)
        assert build(prefill_always="none").spec.prefill_always == ()
        assert build(prefill_always="1-2").spec.prefill_always == (1, 2)
        assert build(prefill_select="logical").spec.prefill_always == ()  # auto: nothing to leave out there
        with pytest.raises(ArtifactMismatch, match="not routed"):
            build(prefill_always=[0])
        with pytest.raises(ArtifactMismatch, match="layers must look like"):
            build(prefill_always="first")
        with pytest.raises(ArtifactMismatch, match="prefill_select='cond'"):
            build(prefill_always=[1], prefill_select="logical")
    finally:
        routed.unwrap()


def test_routing_decisions_force_a_routed_layer_off_at_prefill_per_sequence():
    """README-gated: at prefill, ``routing_decisions[b, r] = false`` forces routed layer ``r`` off for sequence
    ``b``: its decisions entry is false and its logits are PyTorch's with that layer off for it, while the other
    sequence's router decides as before. Forced off for the whole batch, the layer does not run at all (empty
    present). ``run_layer.{i}`` is not read at prefill (false here, and no effect). Both for ``model.onnx`` and
    ``prefill.onnx``."""
    case = exported("llama", "gated")
    first = ROUTED_LAYERS[0]
    pattern, seqs = next((p, s) for p, s in sorted(branch_inputs(case).items()) if p[0])  # the router runs it
    batch = left_pad(seqs[:2])
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    with torch.no_grad():
        references = {}
        for forced in (False, True):
            with contextlib.ExitStack() as stack:
                if forced:
                    stack.enter_context(case.routed.forced_decisions({first: False}))
                logits = case.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                held = case.routed.decisions()  # a forced layer's entry is not recorded: it is off
                references[forced] = (logits, [[not (forced and i == first) and bool(held[i][b])
                                                for i in ROUTED_LAYERS] for b in range(2)])
    assert references[False][1] == [list(pattern)] * 2
    # model.onnx, then prefill.onnx (the runners stay alive: the phase sessions read the runner's shared weights)
    runners = [OrtCausalLM(case.onnx_dir, phase_graphs=False), OrtCausalLM(case.onnx_dir, phase_graphs=True)]
    for forced_rows in ([0, 1], [0]):
        allowed = np.ones((2, len(ROUTED_LAYERS)), dtype=np.bool_)
        allowed[forced_rows, 0] = False
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(batch["attention_mask"]).numpy(),
                 "routing_decisions": allowed, **{f"run_layer.{i}": np.array(False) for i in ROUTED_LAYERS}}
        for i in range(NUM_LAYERS):
            feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros((2, 2, 0, 16),
                                                                                               np.float32)
        for session in (runners[0].session, runners[1].prefill_session):
            logits, decisions, present = session.run(["logits", "decisions", f"present.{first}.key"], feeds)
            for b in range(2):
                want_logits, want_decisions = references[b in forced_rows]
                assert decisions[b].tolist() == want_decisions[b], (forced_rows, b)
                assert decisions[b, 0] == (b not in forced_rows)
                assert max_diff_real(logits[b:b + 1], want_logits[b:b + 1], batch["attention_mask"][b:b + 1]) <= ATOL
            assert present.shape[2] == (0 if forced_rows == [0, 1] else ids.shape[1])


@pytest.mark.parametrize("arch,mode", [("llama", "static"), ("llama", "gated"), ("qwen2", "gated"),
                                       ("llama", "gated_always")])
def test_greedy_decoding_through_kv_cache_matches_torch(arch, mode):
    case = exported(arch, mode)
    if mode != "static":
        patterns = branch_inputs(case)
        seqs = [patterns[p][0] for p in sorted(patterns)][:3]
    else:
        seqs = random_sequences(3, seed=21, lo=3, hi=8)
    batch = left_pad(seqs)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with reference(case) as model:
        expected = torch_greedy(model, ids, mask, steps=16)
    for io_binding in (False, True):
        ort_model = OrtCausalLM(case.onnx_dir, io_binding=io_binding)
        tokens = ort_model.generate(ids.numpy(), mask.numpy(), max_new_tokens=16)
        assert tokens.shape == (3, 16)
        assert tokens.tolist() == expected.tolist()


def test_float16_export_types_and_closeness(tmp_path):
    model = build_model("llama", num_hidden_layers=2, seed=3)
    loaded = wrap_model(model, model_id="tiny-fp16")
    path = export_onnx(loaded, tmp_path / "fp16", mode="static", dtype="float16", opset=18)
    graph = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.graph.input) + list(graph.graph.output)}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model is not cast
    assert load_export_info(tmp_path / "fp16")["dtype"] == "float16"
    ort_model = OrtCausalLM(path)
    batch = left_pad(random_sequences(2, seed=4))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, _ = torch_step(model, ids, mask)
    out = ort_model.forward(ids.numpy(), mask.numpy())
    assert out.logits.dtype == np.float16
    scale = float(ref.abs().max())
    assert max_diff_real(out.logits, ref, mask) <= 0.02 * scale


def test_export_refuses_what_it_cannot_export(tmp_path):
    model = build_model("llama", num_hidden_layers=2)
    loaded = wrap_model(model)
    with pytest.raises(DataError, match="needs routers"):
        export_onnx(loaded, tmp_path / "a", mode="gated")
    with pytest.raises(DataError, match="mode"):
        export_onnx(loaded, tmp_path / "a", mode="dynamic")
    with pytest.raises(DataError, match="float32 and float16"):
        export_onnx(loaded, tmp_path / "a", dtype="bfloat16")
    with pytest.raises(DataError, match="opset"):
        export_onnx(loaded, tmp_path / "a", opset=9)
    plan = SkipPlan(base_model="other", fingerprint="0" * 16, num_layers=2, target="attn", method="manual", skip=[1])
    with pytest.raises(ArtifactMismatch, match="fingerprint"):
        export_onnx(loaded, tmp_path / "a", plan=plan)
    routed = RoutedModel.from_model(model, layers=[0], granularity="token")
    with pytest.raises(ArtifactMismatch, match="sequence-level"):
        export_onnx(loaded, tmp_path / "a", mode="gated", routed=routed)
    routed.unwrap()
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_other_architectures_export_with_parity(arch, tmp_path):
    """Mistral (sliding-window config) and Qwen3 (q/k norms): a whole 2-layer model, padded batch, cache."""
    model = build_model(arch, num_hidden_layers=2, seed=2)
    path = export_onnx(wrap_model(model), tmp_path / arch, mode="static")
    ort_model = OrtCausalLM(path)
    batch = left_pad(random_sequences(3, seed=9, lo=3, hi=9))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref, _ = torch_step(model, ids, mask)
    out = ort_model.forward(ids.numpy(), mask.numpy())
    assert max_diff_real(out.logits, ref, mask) <= ATOL
    assert ort_model.generate(ids.numpy(), mask.numpy(), 8).tolist() == torch_greedy(model, ids, mask, 8).tolist()


@pytest.mark.parametrize("mode,target", [("static", "mlp"), ("static", "block"), ("gated", "mlp"), ("gated", "block")])
def test_mlp_and_block_targets(mode, target, tmp_path):
    """Plans and routers on MLP sub-blocks or whole blocks: static graphs leave them out, gated graphs gate them."""
    from onnx_cases import randomise_routers

    model = build_model("llama", num_hidden_layers=3, seed=4)
    loaded = wrap_model(model)
    routed = RoutedModel.from_model(model, layers=[1], target=target)
    if mode == "static":
        plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=3, target=target,
                        method="manual", skip=[1], candidates=[1])
        path = export_onnx(loaded, tmp_path / "g", mode="static", plan=plan)
        context = routed.forced_decisions(plan.run_map())
    else:
        randomise_routers(routed, seed=3)
        path = export_onnx(loaded, tmp_path / "g", mode="gated", routed=routed)
        context = contextlib.nullcontext()
    graph = onnx.load(str(path), load_external_data=False)
    kv = [i.name for i in graph.graph.input if i.name.endswith(".key")]
    expect_kv = [0, 2] if (mode, target) == ("static", "block") else [0, 1, 2]
    assert kv == [f"past_key_values.{i}.key" for i in expect_kv]
    ort_model = OrtCausalLM(path)
    seqs = random_sequences(12, seed=13)
    with context:
        for batch in (left_pad(seqs[:3]), left_pad(seqs[3:4]), left_pad(seqs[4:5])):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            ref, _ = torch_step(model, ids, mask)
            out = ort_model.forward(ids.numpy(), mask.numpy())
            assert max_diff_real(out.logits, ref, mask) <= ATOL
            if mode == "gated":
                assert out.cache.decisions[:, 0].tolist() == routed.decisions()[1].tolist()
            want = torch_greedy(model, ids, mask, 6)
            assert ort_model.generate(ids.numpy(), mask.numpy(), 6).tolist() == want.tolist()
    routed.unwrap()
