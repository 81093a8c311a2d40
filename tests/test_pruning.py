"""Stage: pruning. A SkipPlan written as a self-contained model folder (nemotron-nas form, or rtexport's own type).

The folders are reloaded in a fresh Python process where rtexport cannot be imported, the way their users load them,
and compared with the routed model whose decisions are fixed to the plan.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer
from safetensors import safe_open

from rtexport.errors import ArtifactMismatch
from rtexport.fsutil import file_sha256
from rtexport.models.loading import wrap_model
from rtexport.planning import SkipPlan
from rtexport.pruning import NEMOTRON_NAS, OWN_MODEL_TYPE, ffn_mult_for, kv_cache_bytes, load_pruned, prune
from rtexport.routing import RoutedModel

FIXTURE = Path(__file__).parent / "fixtures" / "vllm_nemotron_nas.json"
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (architecture, build overrides, plan target, skipped layers, with tokenizer, greedy steps compared)
CASES = {
    "llama_attn": ("llama", dict(intermediate_size=256, rope_parameters=LLAMA3_ROPE), "attn", [2, 4], True, 32),
    "llama_mlp_tied": ("llama", dict(intermediate_size=256, tie_word_embeddings=True), "mlp", [1, 4], False, 8),
    "llama_block": ("llama", dict(intermediate_size=256), "block", [3], False, 8),
    "qwen2_attn": ("qwen2", dict(intermediate_size=256), "attn", [1, 3], False, 32),
    "qwen3_attn": ("qwen3", dict(intermediate_size=256), "attn", [2, 3], False, 8),
}
CANDIDATES = [1, 2, 3, 4]

# Runs in a fresh interpreter, outside the repository, with rtexport made unimportable: what a user of the folder has.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["rtexport"] = None
    import json
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import rtexport  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True

    def cache_of(out):
        return getattr(out, "cache", None) if hasattr(out, "cache") else out.past_key_values

    def cache_bytes(cache):
        tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    jobs = json.load(open(sys.argv[1]))
    results = {"rtexport_blocked": blocked, "cases": {}}
    for name, job in jobs.items():
        inputs = torch.load(job["inputs"])
        model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True, dtype=torch.float32).eval()
        r = {"class": type(model).__name__, "module": type(model).__module__}
        with torch.no_grad():
            out = model(input_ids=inputs["ids"], use_cache=True)
            r["logits"] = out.logits
            cache = cache_of(out)
            r["cache_layers"] = len(cache.layers)
            r["cache_bytes"] = cache_bytes(cache)
            r["padded_logits"] = model(input_ids=inputs["padded_ids"], attention_mask=inputs["mask"]).logits
            gen = model.generate(
                input_ids=inputs["padded_ids"], attention_mask=inputs["mask"], max_new_tokens=job["new_tokens"],
                min_new_tokens=job["new_tokens"], do_sample=False, use_cache=True, pad_token_id=0,
                return_dict_in_generate=True,
            )
            r["tokens"] = gen.sequences
            r["generate_cache_layers"] = len(cache_of(gen).layers)
        results["cases"][name] = r
    torch.save(results, sys.argv[2])
    """
)


def _inputs(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab - 5, (2, 12), generator=g)
    padded = torch.randint(3, vocab - 5, (2, 10), generator=g)
    mask = torch.ones_like(padded)
    padded[0, :4] = 0
    mask[0, :4] = 0
    return {"ids": ids, "padded_ids": padded, "mask": mask}


def _build_case(name: str, root: Path, log: "_ListHandler") -> dict:
    arch, overrides, target, skip, with_tokenizer, new_tokens = CASES[name]
    model = build_model(arch, **overrides)
    loaded = wrap_model(model, tokenizer=build_tokenizer() if with_tokenizer else None, model_id=f"tiny-{arch}")
    plan = SkipPlan(
        base_model=f"tiny-{arch}", fingerprint=loaded.fingerprint, num_layers=model.config.num_hidden_layers,
        target=target, method="manual", skip=skip, candidates=CANDIDATES,
    )
    inputs = _inputs(model.config.vocab_size)
    routed = RoutedModel.from_model(model, target=target, layers=CANDIDATES)
    with torch.no_grad(), routed.forced_decisions(plan.run_map()):
        ref = {
            "logits": routed(input_ids=inputs["ids"]).logits,
            "padded_logits": routed(input_ids=inputs["padded_ids"], attention_mask=inputs["mask"]).logits,
            "tokens": routed.generate(
                input_ids=inputs["padded_ids"], attention_mask=inputs["mask"], max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
            ),
        }
    routed.unwrap()
    log.records.clear()
    folder = prune(loaded, plan, root / name)
    warnings = [r.getMessage() for r in log.records]
    torch.save(inputs, root / f"{name}.inputs.pt")
    return {"loaded": loaded, "plan": plan, "folder": folder, "inputs": inputs, "ref": ref, "warnings": warnings,
            "new_tokens": new_tokens}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every case pruned, plus one fresh-process reload of all the folders (one interpreter start for the module)."""
    root = tmp_path_factory.mktemp("pruned")
    log = _ListHandler()
    logger = logging.getLogger("rtexport.pruning")
    logger.addHandler(log)
    try:
        cases = {name: _build_case(name, root, log) for name in CASES}
    finally:
        logger.removeHandler(log)
    jobs = {
        name: {"folder": str(c["folder"]), "inputs": str(root / f"{name}.inputs.pt"), "new_tokens": c["new_tokens"]}
        for name, c in cases.items()
    }
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "reload.py").write_text(RELOAD_SCRIPT)
    outside = tmp_path_factory.mktemp("outside")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(outside / "hf_modules")}
    proc = subprocess.run(
        [sys.executable, str(root / "reload.py"), str(root / "jobs.json"), str(root / "results.pt")],
        cwd=outside, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(root / "results.pt", weights_only=False)
    return {"cases": cases, "fresh": results}


class _ListHandler(logging.Handler):
    """Collects warnings for the module-scoped fixture (pytest's caplog is per test)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _tensors(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _assert_matches_routed(case: dict, fresh: dict) -> None:
    ref = case["ref"]
    mask = case["inputs"]["mask"].bool()
    assert (fresh["logits"] - ref["logits"]).abs().max().item() <= 1e-5
    # padded positions compute nothing anyone reads; compare the real tokens only
    diff = (fresh["padded_logits"] - ref["padded_logits"]).abs().amax(-1)
    assert diff[mask].max().item() <= 1e-5
    assert torch.equal(fresh["tokens"], ref["tokens"])
    assert fresh["tokens"].shape[1] == case["inputs"]["padded_ids"].shape[1] + case["new_tokens"]


# ---- parity in a fresh process without rtexport ------------------------------------------------------------------
def test_fresh_process_cannot_import_rtexport(pruned):
    assert pruned["fresh"]["rtexport_blocked"] is True
    for r in pruned["fresh"]["cases"].values():
        assert r["module"].startswith("transformers_modules"), r["module"]


def test_nemotron_attn_folder_matches_routed_model(pruned):
    case = pruned["cases"]["llama_attn"]
    fresh = pruned["fresh"]["cases"]["llama_attn"]
    assert fresh["class"] == "DeciLMForCausalLM"
    assert case["warnings"] == []
    _assert_matches_routed(case, fresh)


@pytest.mark.parametrize("name", ["llama_mlp_tied", "llama_block"])
def test_nemotron_mlp_and_block_folders_match_routed_model(pruned, name):
    case = pruned["cases"][name]
    assert _config(case["folder"])["model_type"] == NEMOTRON_NAS
    _assert_matches_routed(case, pruned["fresh"]["cases"][name])


@pytest.mark.parametrize("name,reason", [("qwen2_attn", "biases"), ("qwen3_attn", "q/k norms")])
def test_incompatible_architectures_fall_back_to_own_type(pruned, name, reason):
    case = pruned["cases"][name]
    fresh = pruned["fresh"]["cases"][name]
    assert len(case["warnings"]) == 1 and reason in case["warnings"][0] and OWN_MODEL_TYPE in case["warnings"][0]
    config = _config(case["folder"])
    assert config["model_type"] == OWN_MODEL_TYPE
    assert config["architectures"] == ["RtexportPrunedForCausalLM"]
    manifest = json.loads((case["folder"] / "rtexport_prune.json").read_text())
    assert manifest["form"] == "rtexport" and reason in " ".join(manifest["fallback_reasons"])
    assert fresh["class"] == "RtexportPrunedForCausalLM"
    _assert_matches_routed(case, fresh)


# ---- KV cache ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_kv_cache_holds_exactly_the_kept_attention_layers(pruned, name):
    case = pruned["cases"][name]
    fresh = pruned["fresh"]["cases"][name]
    cfg = case["loaded"].model.config
    kept = case["plan"].kv_layers()
    b, t = case["inputs"]["ids"].shape
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert fresh["cache_bytes"] == len(kept) * 2 * b * cfg.num_key_value_heads * t * head_dim * 4
    assert fresh["cache_layers"] == len(kept)
    assert fresh["generate_cache_layers"] == len(kept)  # generate's own cache is compacted too


def test_kv_cache_bytes_in_process(pruned):
    case = pruned["cases"]["llama_attn"]
    loaded = load_pruned(case["folder"], dtype="float32")
    assert loaded.kv_layers == [0, 1, 3, 5]
    assert loaded.tokenizer is not None
    with torch.no_grad():
        out = loaded.model(input_ids=case["inputs"]["ids"], use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert kv_cache_bytes(cache) == pruned["fresh"]["cases"]["llama_attn"]["cache_bytes"]
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    assert kv_cache_bytes(legacy) == kv_cache_bytes(cache)
    assert kv_cache_bytes(None) == 0


# ---- static KV cache (compiled decoding) ---------------------------------------------------------------------------
def _cache_argument() -> str:
    """transformers 5.24 names the cache argument ``cache``; earlier 5.x releases ``past_key_values``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _static_cache_bytes(cache, kept_layers: int, batch: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """(bytes held, capacity) of a static cache, checking every entry has the same (B, kv, capacity, d) shape."""
    shapes = {tuple(t.shape) for layer in cache.layers for t in (layer.keys, layer.values)}
    assert len(shapes) == 1, shapes
    b, kv, capacity, d = shapes.pop()
    assert (b, kv, d) == (batch, kv_heads, head_dim)
    assert len(cache.layers) == kept_layers
    return kv_cache_bytes(cache), capacity


@pytest.mark.parametrize("name", ["llama_attn", "qwen3_attn"])
def test_static_cache_generate_matches_dynamic_and_holds_only_kept_layers(pruned, name):
    case = pruned["cases"][name]
    model = load_pruned(case["folder"], dtype="float32").model
    cfg = case["loaded"].model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kept = case["plan"].kv_layers()
    inputs = case["inputs"]
    kw = dict(input_ids=inputs["padded_ids"], attention_mask=inputs["mask"], max_new_tokens=12, min_new_tokens=12,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(**kw)
        static = model.generate(**kw, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(static.sequences, dynamic)
    cache = static.cache if getattr(static, "cache", None) is not None else static.past_key_values
    assert type(cache).__name__ == "StaticCache"
    b, prompt = inputs["padded_ids"].shape
    held, capacity = _static_cache_bytes(cache, len(kept), b, cfg.num_key_value_heads, head_dim)
    assert capacity >= prompt + 12 - 1
    assert held == len(kept) * 2 * b * cfg.num_key_value_heads * capacity * head_dim * 4


def test_make_static_cache_allocates_kept_layers_only_and_generates(pruned):
    case = pruned["cases"]["llama_attn"]
    model = load_pruned(case["folder"], dtype="float32").model
    cfg = case["loaded"].model.config
    kept = case["plan"].kv_layers()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = model.make_static_cache(2, 24)
    # allocated at once, before any forward: exactly the kept layers' K and V
    held, capacity = _static_cache_bytes(cache, len(kept), 2, cfg.num_key_value_heads, head_dim)
    assert capacity == 24
    assert held == len(kept) * 2 * 2 * cfg.num_key_value_heads * 24 * head_dim * 4
    assert len(kept) < cfg.num_hidden_layers
    inputs = case["inputs"]
    kw = dict(input_ids=inputs["padded_ids"], attention_mask=inputs["mask"], max_new_tokens=10, min_new_tokens=10,
              do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(**kw)
        static = model.generate(**kw, **{_cache_argument(): cache})
    assert torch.equal(static, dynamic)
    assert kv_cache_bytes(cache) == held  # nothing grew


def test_static_cache_with_mixed_attention_windows(tmp_path):
    """Kept layers with different windows get one mask each from generate's static-cache hook."""
    model = build_model("mistral", intermediate_size=256, sliding_window=4)
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[2])
    folder = prune(loaded, plan, tmp_path / "windowed")
    config = _config(folder)
    config["attention_windows"] = [4, None, 4, None, 4, None]
    (folder / "config.json").write_text(json.dumps(config))
    pruned_model = load_pruned(folder, dtype="float32").model
    assert set(pruned_model.model.attention_windows) == {4, None}
    ids = _inputs(model.config.vocab_size)["ids"]
    kw = dict(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = pruned_model.generate(**kw)
        static = pruned_model.generate(**kw, cache_implementation="static")
        masks = pruned_model.create_masks_for_generate(
            inputs_embeds=torch.empty(2, 1, 0), attention_mask=torch.ones(2, 13, dtype=torch.long),
            cache=pruned_model.make_static_cache(2, 20),
        )
    assert torch.equal(static, dynamic)
    assert set(masks) == {"full", "window_4"}
    assert masks["full"].shape == masks["window_4"].shape == (2, 1, 1, 20)
    # position 12 sees slots 0..12, or 9..12 through a window of 4
    assert masks["full"][0, 0, 0].nonzero().flatten().tolist() == list(range(13))
    assert masks["window_4"][0, 0, 0].nonzero().flatten().tolist() == [9, 10, 11, 12]


def test_compiled_static_decode_is_one_graph_without_breaks(pruned):
    """generate's compiled decode step (static cache) traces once, as one full graph, for every step."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    case = pruned["cases"]["llama_attn"]
    model = load_pruned(case["folder"], dtype="float32").model
    inputs = case["inputs"]
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    kw = dict(input_ids=inputs["padded_ids"], attention_mask=inputs["mask"], max_new_tokens=10, min_new_tokens=10,
              do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            dynamic = model.generate(**kw)
            first = model.generate(**kw, cache_implementation="static", compile_config=compile_config)
            second = model.generate(**kw, cache_implementation="static", compile_config=compile_config)
        graphs = counters["stats"]["unique_graphs"]
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert graphs == 1  # 2 × 9 decode steps, one trace: no recompilation per step or per call
    assert breaks == {}
    assert torch.equal(first, dynamic) and torch.equal(second, dynamic)


# ---- the nemotron-nas form against vLLM's loader ---------------------------------------------------------------
def _vllm_ffn_mult_to_intermediate_size():
    spec = json.loads(FIXTURE.read_text())
    namespace: dict = {}
    exec(spec["ffn_mult_to_intermediate_size"]["python"], namespace)
    return namespace["_ffn_mult_to_intermediate_size"]


@pytest.mark.parametrize("name", ["llama_attn", "llama_mlp_tied", "llama_block"])
def test_config_and_tensor_names_match_vllm_loader(pruned, name):
    spec = json.loads(FIXTURE.read_text())
    case = pruned["cases"][name]
    src = case["loaded"].model.config
    config = _config(case["folder"])
    assert config["model_type"] == spec["model_type"]
    assert config["architectures"] == [spec["architecture"]]
    for key in spec["config"]["required"]:
        assert key in config, key
    assert len(config["block_configs"]) == config["num_hidden_layers"] == src.num_hidden_layers

    to_width = _vllm_ffn_mult_to_intermediate_size()
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = hidden // heads
    expected: dict[str, tuple[int, ...]] = {}
    for i, block in enumerate(config["block_configs"]):
        attn, ffn = block["attention"], block["ffn"]
        assert set(spec["config"]["block_config"]["attention"]["required"]) <= set(attn)
        assert set(spec["config"]["block_config"]["ffn"]["required"]) <= set(ffn)
        if not attn["no_op"]:
            kv = heads // attn["n_heads_in_group"]
            assert kv == src.num_key_value_heads
            shapes = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv * head_dim, hidden),
                      "v_proj": (kv * head_dim, hidden), "o_proj": (hidden, heads * head_dim)}
            for template in spec["tensors"]["attention"]:
                tensor = template.format(i=i)
                proj = tensor.split(".")[-2]
                expected[tensor] = shapes.get(proj, (hidden,))
        if not ffn["no_op"]:
            assert isinstance(ffn["ffn_mult"], float)
            width = to_width(ffn["ffn_mult"], hidden)
            assert width == src.intermediate_size  # vLLM rebuilds the original width exactly
            shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
            for template in spec["tensors"]["ffn"]:
                tensor = template.format(i=i)
                expected[tensor] = shapes.get(tensor.split(".")[-2], (hidden,))
    for tensor in spec["tensors"]["global"]:
        expected[tensor] = (src.vocab_size, hidden) if "embed" in tensor else (hidden,)
    if not config["tie_word_embeddings"]:
        for tensor in spec["tensors"]["untied_only"]:
            expected[tensor] = (src.vocab_size, hidden)
    assert _tensors(case["folder"]) == expected


def test_config_class_gives_vllm_attribute_access(pruned):
    """vLLM reads the blocks through the folder's config class, as attributes (see the fixture's sources)."""
    from transformers import AutoConfig

    case = pruned["cases"]["llama_block"]
    cfg = AutoConfig.from_pretrained(str(case["folder"]), trust_remote_code=True)
    assert type(cfg).__module__.startswith("transformers_modules")
    src = case["loaded"].model.config
    # NemotronNasModelArchConfigConvertor.get_total_num_kv_heads
    kept = [b for b in cfg.block_configs if not b.attention.no_op]
    kv = cfg.num_attention_heads // kept[0].attention.n_heads_in_group
    assert kv == src.num_key_value_heads
    to_width = _vllm_ffn_mult_to_intermediate_size()
    for i, block in enumerate(cfg.block_configs):  # DeciLMDecoderLayer.__init__
        assert block.attention.no_op == block.ffn.no_op == (i == 3)
        if not block.ffn.no_op:
            assert hasattr(block.ffn, "ffn_mult")
            assert to_width(block.ffn.ffn_mult, cfg.hidden_size) == src.intermediate_size
    assert cfg.to_dict()["block_configs"] == _config(case["folder"])["block_configs"]


def test_no_op_blocks_follow_the_plan(pruned):
    for name, (_, _, target, skip, _, _) in CASES.items():
        blocks = _config(pruned["cases"][name]["folder"])["block_configs"]
        for i, block in enumerate(blocks):
            dropped = i in skip
            assert block["attention"]["no_op"] == (dropped and target in ("attn", "block")), (name, i)
            assert block["ffn"]["no_op"] == (dropped and target in ("mlp", "block")), (name, i)
            # llama.cpp's DeciLM converter reads a no-op attention from n_heads_in_group = null, a no-op ffn from
            # ffn_mult = null
            if block["attention"]["no_op"]:
                assert block["attention"]["n_heads_in_group"] is None
            if block["ffn"]["no_op"]:
                assert block["ffn"]["ffn_mult"] is None


@pytest.mark.parametrize(
    "hidden,intermediate",
    [(576, 1536), (4096, 14336), (8192, 28672), (2048, 8192), (896, 4864), (3072, 8192), (5120, 13824), (64, 256)],
)
def test_ffn_mult_reproduces_intermediate_size(hidden, intermediate):
    mult = ffn_mult_for(intermediate, hidden)
    assert mult is not None and _vllm_ffn_mult_to_intermediate_size()(mult, hidden) == intermediate


def test_ffn_mult_absent_for_widths_vllm_cannot_express():
    assert ffn_mult_for(128, 64) is None
    assert ffn_mult_for(11008 + 100, 4096) is None


def test_width_without_ffn_mult_falls_back(tmp_path, caplog):
    model = build_model("llama")  # intermediate 128: not a multiple of 256
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[2])
    with caplog.at_level(logging.WARNING, logger="rtexport.pruning"):
        folder = prune(loaded, plan, tmp_path / "out")
    assert "ffn_mult" in caplog.text
    config = _config(folder)
    assert config["model_type"] == OWN_MODEL_TYPE
    assert all(b["ffn"]["intermediate_size"] == 128 for b in config["block_configs"])


def test_sliding_window_model_falls_back_and_matches(tmp_path, caplog):
    """A window shorter than the sequence: only rtexport's own type carries it (in-process reload: the code path)."""
    model = build_model("mistral", intermediate_size=256, sliding_window=4)
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[2], candidates=CANDIDATES)
    inputs = _inputs(model.config.vocab_size)
    routed = RoutedModel.from_model(model, target="attn", layers=CANDIDATES)
    with torch.no_grad(), routed.forced_decisions(plan.run_map()):
        ref = routed(input_ids=inputs["ids"]).logits
        ref_tokens = routed.generate(input_ids=inputs["ids"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    routed.unwrap()
    with caplog.at_level(logging.WARNING, logger="rtexport.pruning"):
        folder = prune(loaded, plan, tmp_path / "windowed")
    assert "sliding-window" in caplog.text
    assert _config(folder)["attention_windows"] == [4] * 6
    pruned_model = load_pruned(folder, dtype="float32").model
    with torch.no_grad():
        got = pruned_model(input_ids=inputs["ids"]).logits
        tokens = pruned_model.generate(input_ids=inputs["ids"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        windowed = model(input_ids=inputs["ids"]).logits
        model.config.sliding_window = None
        full = model(input_ids=inputs["ids"]).logits
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert not torch.allclose(windowed, full)  # the window matters at this length, so the match above means something


# ---- the folder ----------------------------------------------------------------------------------------------------
def test_folder_contents_and_manifest(pruned):
    case = pruned["cases"]["llama_attn"]
    folder = case["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "rtexport_prune.json",
            "configuration_rtexport_decilm.py", "modeling_rtexport_decilm.py", "tokenizer.json"} <= names
    config = _config(folder)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rtexport_decilm.DeciLMForCausalLM"
    assert config["auto_map"]["AutoConfig"] == "configuration_rtexport_decilm.DeciLMConfig"
    assert config["rope_parameters"]["rope_type"] == "llama3"
    manifest = json.loads((folder / "rtexport_prune.json").read_text())
    assert manifest["form"] == NEMOTRON_NAS
    assert manifest["fingerprint"] == case["loaded"].fingerprint
    assert manifest["plan"]["skip"] == [2, 4] and manifest["kv_layers"] == [0, 1, 3, 5]
    assert manifest["files"]["model.safetensors"]["sha256"] == file_sha256(folder / "model.safetensors")
    assert {"rtexport", "torch", "transformers"} <= set(manifest["versions"])
    removed = manifest["base_parameters"] - manifest["parameters"]
    attn_params = sum(p.numel() for n, p in case["loaded"].model.named_parameters()
                      if n.startswith("model.layers.2.") and ("self_attn" in n or "input_layernorm" in n))
    assert removed == 2 * attn_params


def test_tokenizer_skipped_without_one_and_tied_head_not_saved(pruned):
    folder = pruned["cases"]["llama_mlp_tied"]["folder"]
    names = {p.name for p in folder.iterdir()}
    assert not any(n.startswith("tokenizer") for n in names)
    assert "lm_head.weight" not in _tensors(folder)
    assert _config(folder)["tie_word_embeddings"] is True


def test_weights_saved_in_requested_dtype(tmp_path):
    model = build_model("llama", intermediate_size=256)
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[3])
    folder = prune(loaded, plan, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert _config(folder)["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the source model is left alone


def test_sharded_weights_reload(tmp_path):
    model = build_model("llama", intermediate_size=256)
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[3])
    folder = prune(loaded, plan, tmp_path / "sharded", max_shard_bytes=200_000)
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    ids = torch.randint(3, 250, (1, 8))
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # layer 3's attention differs, so compare against a fresh prune's reload
        got = load_pruned(folder, dtype="float32").model(input_ids=ids).logits
        single = load_pruned(prune(loaded, plan, tmp_path / "single"), dtype="float32").model(input_ids=ids).logits
    assert torch.equal(got, single) and not torch.allclose(got, ref)


def test_pruning_a_model_still_wrapped_by_routers(tmp_path):
    model = build_model("llama", intermediate_size=256)
    loaded = wrap_model(model)
    plan = SkipPlan(base_model="tiny", fingerprint=loaded.fingerprint, num_layers=6, target="attn", method="manual",
                    skip=[2], candidates=CANDIDATES)
    routed = RoutedModel.from_model(model, target="attn", layers=CANDIDATES)
    wrapped = prune(loaded, plan, tmp_path / "wrapped")
    routed.unwrap()
    plain = prune(loaded, plan, tmp_path / "plain")
    assert _tensors(wrapped) == _tensors(plain)
    assert file_sha256(wrapped / "model.safetensors") == file_sha256(plain / "model.safetensors")


def test_plan_for_another_model_is_refused(tmp_path):
    loaded = wrap_model(build_model("llama", intermediate_size=256))
    plan = SkipPlan(base_model="other", fingerprint="0" * 16, num_layers=6, target="attn", method="manual", skip=[2])
    with pytest.raises(ArtifactMismatch):
        prune(loaded, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_interrupted_prune_leaves_previous_folder(tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            (Path(path) / "tokenizer_config.json").write_text("{}")
            raise OSError("disk full")

    model = build_model("llama", intermediate_size=256)
    plan_args = dict(base_model="tiny", num_layers=6, target="attn", method="manual", skip=[2])
    good = wrap_model(model)
    folder = prune(good, SkipPlan(fingerprint=good.fingerprint, **plan_args), tmp_path / "out")
    before = file_sha256(folder / "model.safetensors")
    broken = wrap_model(model, tokenizer=BrokenTokenizer())
    with pytest.raises(OSError, match="disk full"):
        prune(broken, SkipPlan(fingerprint=broken.fingerprint, **{**plan_args, "skip": [3]}), tmp_path / "out")
    assert file_sha256(folder / "model.safetensors") == before
    assert json.loads((folder / "rtexport_prune.json").read_text())["skip"] == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no half-written staging folder left behind


# ---- the real model ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_pruned_folder_matches_routed_model(tmp_path):
    from rtexport.models.loading import load_model

    loaded = load_model("embedded:smollm2", dtype="float32", device="cpu")
    skip = [17, 20, 23, 26]
    plan = SkipPlan(base_model=loaded.source.model_id, fingerprint=loaded.fingerprint, num_layers=30, target="attn",
                    method="manual", skip=skip, candidates=list(range(15, 29)))
    tok = loaded.tokenizer
    prompt = tok("The capital of France is", return_tensors="pt")
    routed = RoutedModel.from_model(loaded.model, target="attn", layers=plan.candidates)
    with torch.no_grad(), routed.forced_decisions(plan.run_map()):
        ref_logits = routed(**prompt).logits
        ref_tokens = routed.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    routed.unwrap()
    folder = prune(loaded, plan, tmp_path / "smol")
    assert _config(folder)["model_type"] == NEMOTRON_NAS
    torch.save({"ids": prompt["input_ids"], "mask": prompt["attention_mask"]}, tmp_path / "prompt.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["rtexport"] = None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder, prompt, out = sys.argv[1:]
        p = torch.load(prompt)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(input_ids=p["ids"], attention_mask=p["mask"]).logits
            tokens = model.generate(input_ids=p["ids"], attention_mask=p["mask"], max_new_tokens=8, do_sample=False,
                                    use_cache=True)
        text = tok.decode(tokens[0, p["ids"].shape[1]:], skip_special_tokens=True)
        torch.save({"logits": logits, "tokens": tokens, "text": text}, out)
        """
    )
    (tmp_path / "reload.py").write_text(script)
    outside = tmp_path / "outside"
    outside.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(outside / "hf_modules")}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "reload.py"), str(folder), str(tmp_path / "prompt.pt"), str(tmp_path / "r.pt")],
        cwd=outside, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = torch.load(tmp_path / "r.pt", weights_only=False)
    assert (fresh["logits"] - ref_logits).abs().max().item() <= 1e-5
    assert torch.equal(fresh["tokens"], ref_tokens)
    ref_text = tok.decode(ref_tokens[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert fresh["text"] == ref_text
