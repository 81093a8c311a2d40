"""Stage: tuning (throughput). Real router-tuning steps timed on a tiny random model, and the chunked LM loss."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model

from rtexport.models.shapes import UnknownShape, random_model
from rtexport.routing import RoutedModel
from rtexport.tuning.loss import linear_cross_entropy
from rtexport.tuning.throughput import compare_losses, flop_counts, main, measure_tuning_throughput


@pytest.mark.parametrize("fused", [False, True])
def test_measure_runs_real_steps_and_trains_only_routers(fused):
    model = build_model("llama", num_hidden_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    r = measure_tuning_throughput(model, batch_size=2, seq_len=16, steps=2, warmup=1, fused_loss=fused,
                                  loss_chunk_tokens=7, peak_flops=1e12)
    assert len(r["step_ms"]) == 2 and all(t > 0 for t in r["step_ms"])
    assert r["tokens_per_step"] == 32
    assert r["tokens_per_s"] == pytest.approx(32 / (r["step_ms_median"] / 1e3), rel=1e-3)
    assert r["seconds_for_2M_tokens"] == pytest.approx(2e6 / r["tokens_per_s"], rel=1e-3)
    assert r["settings"]["layers"] == [2] and r["settings"]["fused_loss"] is fused
    checks = r["checks"]
    assert checks["routers_got_gradients"] and not checks["backbone_got_gradients"]
    assert checks["first_layer_tracked_by_autograd"] == 2 and checks["lower_layers_untracked"]
    assert checks["losses_finite"]
    # the step ran the optimizer: the router (zero-initialised) moved, the backbone did not
    assert r["lm_loss_first_last"][0] > 1.0
    # MFU against the given peak, both conventions; real work is less than 4N (no backward below layer 2)
    assert 0 < r["flop_per_token_real"] < r["flop_per_token_4N"]
    assert r["mfu_4N_datasheet"] == pytest.approx(r["tokens_per_s"] * r["flop_per_token_4N"] / 1e12, rel=1e-3)
    assert r["mfu_4N_measured"] is None
    json.dumps(r)
    # the model is handed back as it came: plain layers, same weights, same requires_grad flags
    assert not any(isinstance(m, RoutedModel) for m in model.modules())
    assert type(model.model.layers[2]).__name__ == "LlamaDecoderLayer"
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), f"backbone tensor {k} changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_routers_get_gradients_and_move_within_the_measurement():
    model = build_model("llama", num_hidden_layers=4)
    routed = RoutedModel.from_model(model)
    r = measure_tuning_throughput(routed, batch_size=2, seq_len=16, steps=2, warmup=1)
    assert r["checks"]["routers_got_gradients"]
    assert any(torch.count_nonzero(p) for p in routed.router_parameters())  # three AdamW steps moved them
    assert all(p.grad is None for p in model.parameters())


def test_flop_counts_match_the_shapes():
    model = build_model("llama", num_hidden_layers=4)  # hidden 64, intermediate 128, 4 heads of 16, 2 KV heads
    f = flop_counts(model, RoutedModel.from_model(model).adapter, [2], "attn", seq_len=16)
    attn, mlp, head = 64 * 64 * 2 + 64 * 32 * 2, 3 * 64 * 128, 260 * 64
    n_total = sum(p.numel() for p in model.parameters())
    assert f["params_N"] == n_total - 260 * 64
    assert f["flop_per_token_4N"] == 4 * f["params_N"]
    core = 2 * 16 * 64
    assert f["flop_per_token_real_forward"] == 2 * (4 * (attn + mlp) + head) + 4 * core
    # backward: output head, layer 3 fully, layer 2's MLP only (its attention sits before the gate's input)
    assert f["flop_per_token_real_backward"] == 2 * head + 2 * (attn + mlp) + 2.5 * core + 2 * mlp


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_cross_entropy_matches_the_library_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (23,), generator=g)
    y[[3, 7]] = -100
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, ignore_index=-100)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w, b))
    out = linear_cross_entropy(h, w, y, b, chunk_tokens=chunk)
    grads = torch.autograd.grad(out * 3.0, (h, w, b))
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, r in zip(grads, ref_grads):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-7)


def test_fused_loss_equals_labels_loss_on_a_routed_model():
    model = build_model("llama", num_hidden_layers=4)
    c = compare_losses(model, batch_size=2, seq_len=16, loss_chunk_tokens=5)
    assert c["lm_loss_abs_diff"] < 1e-4 and c["router_grad_rel_err"] < 1e-4
    assert c["lm_loss_hf"] > 1.0


def test_random_model_and_script_entry(tmp_path, capsys):
    m = random_model("llama-tiny", device="cpu", dtype=torch.float32, seed=1)
    w = m.model.layers[0].mlp.up_proj.weight
    assert w.device.type == "cpu" and 0.015 < float(w.detach().std()) < 0.025
    assert torch.equal(m.model.norm.weight, torch.ones_like(m.model.norm.weight))
    with pytest.raises(UnknownShape):
        random_model("no-such-shape", device="cpu")
    out = tmp_path / "t.json"
    assert main(["--shape", "llama-tiny", "--device", "cpu", "--dtype", "float32", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "1", "--warmup", "0", "--loss", "hf", "fused",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["runs"]] == ["eager+hf", "eager+fused"]
    assert "tok/s" in capsys.readouterr().out


@pytest.mark.parametrize("chunk", [3, 1000])
def test_linear_kl_divergence_matches_a_direct_computation_and_its_gradient(chunk):
    from rtexport.tuning.loss import linear_kl_divergence

    torch.manual_seed(0)
    w = torch.randn(50, 8, dtype=torch.float64)
    teacher = torch.randn(11, 8, dtype=torch.float64)
    student = (teacher + 0.3 * torch.randn(11, 8, dtype=torch.float64)).requires_grad_(True)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1])
    got = linear_kl_divergence(student, teacher, w, mask=mask, chunk_tokens=chunk)
    (g_got,) = torch.autograd.grad(got, student)
    s2 = student.detach().clone().requires_grad_(True)
    keep = mask.bool()
    want = torch.nn.functional.kl_div((s2[keep] @ w.T).log_softmax(-1), (teacher[keep] @ w.T).log_softmax(-1),
                                      log_target=True, reduction="batchmean")
    (g_want,) = torch.autograd.grad(want, s2)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and got.item() > 0.01
    assert torch.allclose(g_got.double(), g_want, rtol=1e-4, atol=1e-7)
    assert g_got[~keep].abs().max() == 0
    assert linear_kl_divergence(teacher, teacher, w).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_objective_is_zero_with_every_gate_open_and_trains_the_routers(tokenizer):
    from rtexport.routing import RoutedModel
    from rtexport.tuning.trainer import tuning_loss

    model = build_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    routed = RoutedModel.from_model(model, layers=[2, 3])
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    with routed.mode("train"):
        with routed.threshold(0.0):  # every straight-through gate is 1: the student is the teacher
            loss, kl, rate = tuning_loss(routed, ids, keep_rate=None, capacity_weight=0.0, objective="kl")
        assert rate.item() == 1.0 and kl.item() == pytest.approx(0.0, abs=1e-6)
        routed.state.stochastic = True
        torch.manual_seed(3)
        loss, kl, rate = tuning_loss(routed, ids, keep_rate=0.5, capacity_weight=1.0, objective="kl")
        assert rate.item() < 1.0 and kl.item() > 0
        loss.backward()
    assert all(r.proj.weight.grad is not None and r.proj.weight.grad.abs().sum() > 0 for r in routed.routers.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
