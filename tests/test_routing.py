"""Stage: routing. The routed model, its gates, pooling, and the straight-through estimator."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model

from rtexport.errors import ArtifactMismatch, UnsupportedArchitecture
from rtexport.models.adapters import adapter_for
from rtexport.routing import RoutedModel, Router, masked_mean, straight_through_gate
from rtexport.routing.config import default_routed_layers, parse_layers


def _randomise_routers(routed: RoutedModel, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))


class _RemovedAttention(torch.nn.Module):
    """What removing an attention sub-block by hand computes: nothing is added to the residual."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None


def test_default_placement_is_upper_half_never_last():
    assert default_routed_layers(32) == list(range(16, 31))
    assert default_routed_layers(30) == list(range(15, 29))
    assert parse_layers("2-4,7", 8) == [2, 3, 4, 7]
    with pytest.raises(ArtifactMismatch):
        parse_layers("9", 8)


def test_router_is_zero_initialised_and_starts_open():
    r = Router(16)
    assert torch.count_nonzero(r.proj.weight) == 0
    assert r.proj.bias is None
    score = r(torch.randn(2, 5, 16), None, "sequence")
    assert torch.all(score == 0.5)
    assert torch.all(straight_through_gate(score, 0.5) == 1.0)


def test_all_gates_open_equals_base_model(arch):
    base = build_model(arch)
    ref_model = copy.deepcopy(base)
    ids = torch.randint(0, 250, (2, 12))
    routed = RoutedModel.from_model(base, layers=[1, 2, 3, 4])
    with torch.no_grad():
        ref = ref_model(ids).logits
        out = routed(ids).logits  # zero-initialised routers: every gate open
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("target", ["attn", "mlp", "block"])
def test_closed_gate_equals_sub_block_removed_by_hand(target):
    base = build_model("llama")
    by_hand = copy.deepcopy(base)
    layer = by_hand.model.layers[3]
    if target in ("attn", "block"):
        layer.self_attn = _RemovedAttention()
    if target in ("mlp", "block"):
        layer.mlp = _ZeroMLP()
    routed = RoutedModel.from_model(base, target=target, layers=[2, 3, 4])
    ids = torch.randint(0, 250, (2, 10))
    with torch.no_grad(), routed.forced_decisions({3: False}):
        out = routed(ids).logits
        ref = by_hand(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (routed(ids).logits - ref).abs().max().item() > 1e-3  # the gate matters


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_gradients_reach_only_router_parameters():
    base = build_model("llama")
    for p in base.parameters():
        p.requires_grad_(False)
    routed = RoutedModel.from_model(base, layers=[2, 3, 4])
    ids = torch.randint(0, 250, (2, 10))
    with routed.mode("train"):
        out = routed(input_ids=ids, labels=ids)
        out.loss.backward()
    router_params = {id(p) for p in routed.router_parameters()}
    for name, p in routed.named_parameters():
        if id(p) in router_params:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name


def test_straight_through_gradient_is_identity():
    score = torch.tensor([0.2, 0.5, 0.7, 0.49], requires_grad=True)
    gate = straight_through_gate(score, 0.5)
    assert gate.tolist() == [0.0, 1.0, 1.0, 0.0]
    upstream = torch.tensor([1.5, -2.0, 0.25, 3.0])
    (gate * upstream).sum().backward()
    assert torch.equal(score.grad, upstream)


def test_masked_mean_ignores_padding():
    h = torch.randn(1, 4, 3)
    padded = torch.cat([h, torch.full((1, 2, 3), 100.0)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert torch.allclose(masked_mean(padded, mask), h.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padding_gives_same_decisions_as_one_by_one(side):
    base = build_model("llama")
    routed = RoutedModel.from_model(base, layers=[1, 2, 3, 4])
    _randomise_routers(routed)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 250, (n,), generator=g) for n in (5, 11, 8, 3)]
    # single-sequence decisions, threshold at the median score so decisions differ between sequences
    with torch.no_grad(), routed.recording() as rec:
        for s in seqs:
            routed(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long))
    ordered = torch.cat([torch.cat(v) for v in rec.values()]).sort().values
    mid = len(ordered) // 2
    thr = float(ordered[mid - 1] + ordered[mid]) / 2  # between two scores: no decision sits on the threshold
    single = []
    with torch.no_grad(), routed.threshold(thr):
        for s in seqs:
            routed(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long))
            single.append({k: bool(v[0]) for k, v in routed.decisions().items()})
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        if side == "right":
            ids[b, : len(s)], mask[b, : len(s)] = s, 1
        else:
            ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), routed.threshold(thr):
        routed(input_ids=ids, attention_mask=mask, position_ids=position_ids)
        batched = routed.decisions()
    decisions = [{k: bool(v[b]) for k, v in batched.items()} for b in range(len(seqs))]
    assert decisions == single
    flat = [v for d in single for v in d.values()]
    assert any(flat) and not all(flat)  # the test exercises both outcomes


def test_decisions_are_held_through_generation():
    base = build_model("llama")
    routed = RoutedModel.from_model(base, layers=[2, 3, 4])
    _randomise_routers(routed, seed=5)
    ids = torch.randint(0, 250, (1, 9))
    calls = []  # the routers run at prefill only: decode steps reuse what the prefill resolved
    hooks = [r.register_forward_hook(lambda *_: calls.append(1)) for r in routed.routers.values()]
    with torch.no_grad(), routed.threshold(0.5):
        routed(input_ids=ids)
        at_prefill = routed.decisions()
        calls.clear()
        out = routed.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        after = routed.decisions()
    for h in hooks:
        h.remove()
    assert out.shape[1] == 15
    assert len(calls) == 3  # one prefill of 3 routed layers, then 5 decode steps without a router call
    assert {k: v.tolist() for k, v in at_prefill.items()} == {k: v.tolist() for k, v in after.items()}


def test_skipped_attention_writes_no_kv_cache():
    base = build_model("llama")
    routed = RoutedModel.from_model(base, layers=[2, 3, 4])
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad(), routed.forced_decisions({2: True, 3: False, 4: False}):
        out = routed(input_ids=ids, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    filled = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    assert filled == [0, 1, 2, 5]


def test_unsupported_architecture_is_one_clear_error():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="supported: llama, mistral, qwen2, qwen3"):
        adapter_for(GPT2Config())


def test_routers_refuse_another_model(tmp_path):
    routed = RoutedModel.from_model(build_model("llama"), layers=[2, 3])
    routed.save_pretrained(tmp_path)
    other = build_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ArtifactMismatch, match="fingerprint"):
        RoutedModel.from_pretrained(other, tmp_path)
    again = RoutedModel.from_pretrained(build_model("llama"), tmp_path)
    assert again.layers == [2, 3]


def test_sampled_gate_is_bernoulli_forward_identity_backward():
    torch.manual_seed(0)
    from rtexport.routing.router import sampled_straight_through_gate

    score = torch.full((20000,), 0.3, requires_grad=True)
    gate = sampled_straight_through_gate(score)
    assert set(gate.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(float(gate.detach().mean()) - 0.3) < 0.02
    gate.sum().backward()
    assert torch.equal(score.grad, torch.ones_like(score))


def test_corrupted_artifacts_give_one_clear_error(tmp_path):
    """Every JSON artifact loader (plans, router configs, ONNX export records, pruned manifests) reads through
    fsutil.read_artifact: a broken file is an ArtifactMismatch, never a JSONDecodeError traceback."""
    from rtexport.errors import ArtifactMismatch
    from rtexport.onnx.export import INFO_NAME, load_export_info
    from rtexport.planning import SkipPlan
    from rtexport.pruning import read_manifest
    from rtexport.pruning.writer import MANIFEST_NAME
    from rtexport.routing.config import CONFIG_NAME, RouterConfig

    for name in (CONFIG_NAME, INFO_NAME, MANIFEST_NAME, "plan.json"):
        (tmp_path / name).write_text("{not json")
    for load in (lambda: RouterConfig.load(tmp_path), lambda: load_export_info(tmp_path),
                 lambda: read_manifest(tmp_path), lambda: SkipPlan.load(tmp_path / "plan.json")):
        with pytest.raises(ArtifactMismatch, match="not valid JSON"):
            load()
    (tmp_path / "plan.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactMismatch, match="expected 'rtexport.skip_plan"):
        SkipPlan.load(tmp_path / "plan.json")
