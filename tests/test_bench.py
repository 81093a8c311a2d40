"""Stage: bench. Side-by-side timing on the CPU with tiny models: what is timed computes what it should (greedy
tokens match generate, the hand-pruned ideal is the pruned folder's function), and the ratios are arithmetic on the
medians."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from rtexport.bench import (
    BenchmarkSetupError,
    Cell,
    attention_removed,
    compare,
    format_table,
    time_decode,
    time_prefill,
)
from rtexport.models.loading import wrap_model
from rtexport.planning import SkipPlan
from rtexport.pruning import load_pruned, prune

SKIP = [2, 4]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    full = build_model("llama", intermediate_size=256)
    loaded = wrap_model(full)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=SKIP)
    folder = prune(loaded, plan, tmp_path_factory.mktemp("bench") / "pruned")
    return full, load_pruned(folder, dtype="float32").model


def _greedy(model, batch: int, prompt_len: int, new_tokens: int) -> torch.Tensor:
    """What time_decode feeds (seed 0) and should produce: generate's greedy continuation."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1,
                             do_sample=False, pad_token_id=0)
    return out[:, prompt_len:]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_decode_steps_are_greedy_generation(models, cache):
    full, pruned = models
    for model in (full, pruned):
        timing = time_decode(model, 2, 9, 7, warmup=0, reps=1, cache=cache)
        assert torch.equal(timing.tokens, _greedy(model, 2, 9, 7))
        assert timing.median_ms > 0 and len(timing.samples_ms) == 1


def test_decode_cache_bytes_cover_kept_layers(models):
    full, pruned = models
    cfg = full.config
    per_layer = 2 * 2 * cfg.num_key_value_heads * (9 + 7) * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert time_decode(full, 2, 9, 7, warmup=0, reps=1, cache="static").kv_cache_bytes == 6 * per_layer
    assert time_decode(pruned, 2, 9, 7, warmup=0, reps=1, cache="static").kv_cache_bytes == 4 * per_layer
    with attention_removed(full, SKIP) as ideal:  # transformers' StaticCache allocates lazily: used layers only
        assert time_decode(ideal, 2, 9, 7, warmup=0, reps=1, cache="static").kv_cache_bytes == 4 * per_layer


def test_ideal_is_the_pruned_function_and_is_undone(models):
    full, pruned = models
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))
    layers = list(full.model.layers)
    with torch.no_grad():
        before = full(input_ids=ids).logits
        with attention_removed(full, SKIP) as ideal:
            assert ideal is full
            hand = full(input_ids=ids).logits
        after = full(input_ids=ids).logits
        folder = pruned(input_ids=ids).logits
    assert (hand - folder).abs().max().item() <= 1e-5
    assert not torch.allclose(hand, before)
    assert torch.equal(before, after) and list(full.model.layers) == layers


def test_prefill_timing(models):
    timing = time_prefill(models[0], 2, 16, warmup=1, reps=3)
    assert len(timing.samples_ms) == 3 and timing.median_ms == sorted(timing.samples_ms)[1]


def test_compare_ratios_and_table(models):
    full, pruned = models
    cells = [Cell.prefill(1, 16), Cell.decode(1, 8, 4)]
    result = compare(
        {"full": full, "ideal": lambda: attention_removed(full, SKIP), "pruned": pruned},
        cells, pairs={"pruned": "ideal"}, rounds=2, warmup=0, reps=2,
    )
    assert list(result["cells"]) == ["prefill_b1_s16", "decode_b1_p8_n4"]
    assert list(full.model.layers)[SKIP[0]].__class__.__name__ == "LlamaDecoderLayer"  # the ideal was undone
    for key in result["cells"]:
        ms = {name: result["models"][name][key]["median_ms"] for name in result["models"]}
        assert all(len(result["models"][n][key]["samples_ms"]) == 4 for n in ms)  # 2 rounds × 2 reps, pooled
        assert len(result["models"]["full"][key]["round_medians_ms"]) == 2
        assert result["speedup"]["full"][key] == 1.0
        assert result["speedup"]["pruned"][key] == pytest.approx(ms["full"] / ms["pruned"])
        assert result["share"]["pruned"][key] == pytest.approx(ms["ideal"] / ms["pruned"])
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0] == "| model | prefill b1×16 | decode b1 (8+4) |"
    assert len(lines) == 2 + 3 + 1
    assert lines[-1].startswith("| pruned ÷ ideal (speedup share) | ")


def test_bad_requests_are_user_errors(models):
    with pytest.raises(BenchmarkSetupError):
        Cell.decode(1, 8, 0)
    with pytest.raises(BenchmarkSetupError):
        compare({"a": models[0]}, [Cell.prefill(1, 4)], baseline="b")
    with pytest.raises(BenchmarkSetupError):
        time_decode(models[0], 1, 4, 2, cuda_graph=True)  # needs a GPU
