"""Stage: tuning. Data loading, the trainer, resume, the frozen backbone, and the saved router folder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model, slow_enabled

from rtexport.errors import ArtifactMismatch, DataError
from rtexport.models.loading import wrap_model
from rtexport.routing import RoutedModel
from rtexport.tuning.data import format_record, load_texts, pack_blocks
from rtexport.tuning.trainer import TuneSettings, load_tuned, tune

SMALL = dict(seq_len=48, max_samples=24, batch_size=4, eval_blocks=6, calibration_blocks=6, lr=5e-3)


def _loaded(tokenizer, arch="llama"):
    return wrap_model(build_model(arch), tokenizer, model_id=f"tiny-{arch}")


def test_embedded_corpus_and_local_files(tmp_path, tokenizer):
    train, info = load_texts(None)
    held, _ = load_texts(None, split="heldout")
    assert info.characters > 500_000 and "HAMLET" in "".join(train)
    assert "TEMPEST" in "".join(held).upper() and "HAMLET" not in "".join(held)
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Add", "input": "2+2", "output": "4"}) + "\n" + json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n"
    )
    docs, _ = load_texts(str(tmp_path / "a.jsonl"))
    assert docs[0].startswith("### Instruction:\nAdd") and "### Input:\n2+2" in docs[0] and docs[1].endswith("Hello")
    (tmp_path / "t.txt").write_text("plain words " * 50)
    blocks = pack_blocks(tokenizer, load_texts(str(tmp_path / "t.txt"))[0], 16)
    assert blocks.shape[1] == 16 and blocks.shape[0] == (len("plain words " * 50) + 1) // 16
    with pytest.raises(DataError):
        format_record({"foo": 1})


def test_tune_trains_only_routers_and_saves_a_checked_folder(tmp_path, tokenizer):
    loaded = _loaded(tokenizer)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = tune(loaded, TuneSettings(steps=3, target_skip=0.25, **SMALL), tmp_path / "r", progress=False)
    routed = result.routed
    after = routed.unwrap().state_dict()
    assert set(after) == set(before)
    for k in before:
        assert torch.equal(before[k], after[k]), f"backbone tensor {k} changed"
    assert any(torch.count_nonzero(r.proj.weight) for r in routed.routers.values())
    cfg = json.loads((tmp_path / "r" / "router_config.json").read_text())
    assert cfg["base_model"] == "tiny-llama" and cfg["fingerprint"] == loaded.fingerprint
    assert cfg["layers"] == [3, 4] and cfg["target"] == "attn" and cfg["granularity"] == "sequence"
    assert set(cfg["execution_rates"]) == {"3", "4"}
    assert cfg["heldout"]["base_perplexity"] > 1 and cfg["heldout"]["routed_perplexity"] > 1
    assert cfg["training"]["lr"] == SMALL["lr"]
    # reload on a fresh copy of the same model: same routers, same threshold
    reloaded = load_tuned(_loaded(tokenizer), tmp_path / "r")
    assert reloaded.state.threshold == pytest.approx(result.threshold)
    for k, r in reloaded.routers.items():
        assert torch.equal(r.proj.weight, routed.routers[k].proj.weight)


def test_threshold_calibration_hits_target_skip(tokenizer):
    from rtexport.tuning.trainer import calibrate_threshold, collect_scores, execution_rates

    loaded = _loaded(tokenizer)
    routed = RoutedModel.from_model(loaded.model, layers=[1, 2, 3, 4])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))
    blocks = torch.randint(0, 250, (10, 24), generator=g)
    for target in (0.25, 0.5):
        thr = calibrate_threshold(routed, blocks, target, batch_size=5)
        rates, _ = execution_rates(collect_scores(routed, blocks, 5, thr), thr)
        skipped = 1.0 - sum(rates.values()) / len(rates)
        assert abs(skipped - target) <= 1 / 40 + 1e-9  # 40 decisions: within one decision of the target


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("lora,gates", [(False, "threshold"), (True, "threshold"), (False, "sampled")])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tokenizer, lora, gates):
    settings = TuneSettings(steps=6, checkpoint_every=2, target_skip=0.25, lora=lora, gates=gates, **SMALL)
    full = tune(_loaded(tokenizer), settings, tmp_path / "full", progress=False, measure_perplexity=False)

    def stop_at_4(step, record):
        if step == 4:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        tune(_loaded(tokenizer), settings, tmp_path / "cut", progress=False, on_step=stop_at_4, measure_perplexity=False)
    assert not (tmp_path / "cut" / "router_config.json").exists()  # no half-written artifact
    resumed = tune(_loaded(tokenizer), settings, tmp_path / "cut", resume=True, progress=False, measure_perplexity=False)
    assert resumed.history == full.history
    for k, r in full.routed.routers.items():
        assert torch.equal(r.proj.weight, resumed.routed.routers[k].proj.weight)
    assert resumed.threshold == full.threshold


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    settings = TuneSettings(steps=4, checkpoint_every=2, **SMALL)
    with pytest.raises(_Interrupt):
        tune(_loaded(tokenizer), settings, tmp_path / "r", progress=False, measure_perplexity=False,
             on_step=lambda s, r: (_ for _ in ()).throw(_Interrupt()) if s == 3 else None)
    changed = TuneSettings(steps=4, checkpoint_every=2, **{**SMALL, "lr": 1e-2})
    with pytest.raises(ArtifactMismatch, match="lr"):
        tune(_loaded(tokenizer), changed, tmp_path / "r", resume=True, progress=False)


@pytest.mark.parametrize("target,granularity", [("mlp", "sequence"), ("block", "token"), ("attn", "token")])
def test_other_targets_and_granularities_tune(tmp_path, tokenizer, target, granularity):
    result = tune(_loaded(tokenizer, "qwen2"), TuneSettings(steps=2, target=target, granularity=granularity, **SMALL),
                  tmp_path / "r", progress=False, measure_perplexity=False)
    assert result.routed.config.target == target and len(result.execution_rates) == 2


def test_kl_objective_with_copy_blocks_tunes_and_is_recorded(tmp_path, tokenizer):
    loaded = _loaded(tokenizer)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = tune(loaded, TuneSettings(steps=3, objective="kl", repeat_fraction=0.5, **SMALL), tmp_path / "r",
                  progress=False, measure_perplexity=False)
    assert all(torch.equal(before[k], v) for k, v in result.routed.unwrap().state_dict().items())
    assert any(torch.count_nonzero(r.proj.weight) for r in result.routed.routers.values())
    cfg = json.loads((tmp_path / "r" / "router_config.json").read_text())
    assert cfg["training"]["objective"] == "kl" and cfg["training"]["repeat_fraction"] == 0.5
    assert all(h["loss"] >= 0 for h in result.history)  # a KL divergence
    with pytest.raises(DataError):
        TuneSettings(objective="ce").validate()
    with pytest.raises(DataError):
        TuneSettings(repeat_fraction=2.0).validate()


def test_each_architecture_tunes(tmp_path, tokenizer, arch):
    result = tune(_loaded(tokenizer, arch), TuneSettings(steps=1, **SMALL), tmp_path / arch, progress=False,
                  measure_perplexity=False)
    assert isinstance(result.routed, RoutedModel) and result.steps == 1


@pytest.mark.slow
@pytest.mark.skipif(not slow_enabled(), reason="real model")
def test_smollm2_hits_target_skip(tmp_path):
    from rtexport.models.loading import load_model

    loaded = load_model("embedded:smollm2")
    result = tune(loaded, TuneSettings(seq_len=256, max_samples=64, batch_size=4, steps=16, eval_blocks=24,
                                       calibration_blocks=24, target_skip=0.25), tmp_path / "r", progress=False)
    assert abs(result.heldout_skip_ratio - 0.25) <= 0.05
    assert result.routed_perplexity < 3 * result.base_perplexity


def test_with_repeats_copies_the_first_half_into_a_seeded_share_of_blocks():
    from rtexport.tuning.data import with_repeats

    blocks = torch.arange(8 * 10).view(8, 10)
    out = with_repeats(blocks, 0.25, seed=0)
    repeated = [i for i in range(8) if torch.equal(out[i, 5:], out[i, :5])]
    assert len(repeated) == 2 and torch.equal(out[:, :5], blocks[:, :5])
    assert all(torch.equal(out[i], blocks[i]) for i in range(8) if i not in repeated)
    assert torch.equal(with_repeats(blocks, 0.25, seed=0), out) and with_repeats(blocks, 0.0, 0) is blocks
    with pytest.raises(DataError):
        with_repeats(blocks, 1.5, 0)
