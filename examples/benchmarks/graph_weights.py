"""Carry an exported ONNX graph to another machine without its weights, and re-create the weights there.

An rtexport export is ``model.onnx`` (the graph, a few MB) plus ``model.onnx.data`` (the weights, GBs). ``strip``
copies the folder without the weights file and writes ``weights_manifest.json``: every initializer stored in the
weights file (name, dims, ONNX data type, offset, length). On the target machine, ``fill`` writes
``model.onnx.data`` again from a ``DecoderGraph`` built there from an identical model (same config, plan, routers,
dtype; the weight *values* are that machine's), each tensor at exactly its recorded offset, so ``model.onnx`` is
used as it is.

Initializer names are the ``DecoderGraph``'s parameter and buffer names; Linear weights are exported transposed as
``{W}.T``. Small tensors (under 1 KiB: ``inv_freq``, a tiny model's norms) and the exporter's own constants
(``val_*``) are stored inside ``model.onnx`` and travel with it; ``fill`` checks that the named ones equal the
target module's values. The exporter also merges initializers with equal values (e.g. every RMSNorm weight of a
``random_model``, all 1): ``fill`` checks that every module tensor missing from the graph equals, on the target, a
tensor the graph does hold (true for ``random_model`` on both sides; a real checkpoint needs an export made from
weights whose values are all distinct).

Usage:
    python examples/benchmarks/graph_weights.py selfcheck           # CPU, tiny random Llama, static and gated
    python examples/benchmarks/graph_weights.py strip EXPORT DEST    # here: a folder to carry

On the target machine, from Python (``examples/benchmarks/ort_gpu_speed.py bench`` does this):
    graph = graph_module_from_info(loaded, DEST, plan=plan, routed=routed)
    fill(DEST, graph)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rtexport.errors import ArtifactMismatch  # noqa: E402
from rtexport.fsutil import read_json, write_json_atomic  # noqa: E402
from rtexport.onnx.export import DATA_NAME, GRAPH_NAME, INFO_NAME, build_graph_module  # noqa: E402
from rtexport.onnx.graph_model import DecoderGraph, GraphSpec  # noqa: E402

MANIFEST_NAME = "weights_manifest.json"
MANIFEST_FORMAT = "rtexport.graph_weights/1"
TRANSPOSED = ".T"


# ---- the graph's initializers ----------------------------------------------------------------------------------
def _all_initializers(model: Any) -> Iterator[Any]:
    """Every initializer of the main graph and of every subgraph (If branches), at any depth."""
    import onnx

    def walk(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                for g in attr.graphs:
                    yield from walk(g)

    yield from walk(model.graph)


def _load_graph(folder: Path) -> Any:
    import onnx

    path = folder / GRAPH_NAME
    if not path.is_file():
        raise ArtifactMismatch(f"{folder} holds no {GRAPH_NAME}")
    return onnx.load(str(path), load_external_data=False)


def manifest_entries(model: Any) -> list[dict[str, Any]]:
    """One entry per initializer stored in the weights file, in file order; fails on anything but one file."""
    from rtexport.onnx.phase_graphs import external_entries

    entries = external_entries(_all_initializers(model))
    for e in entries:
        if e["file"] != DATA_NAME:
            raise ArtifactMismatch(f"initializer {e['name']} lives in {e['file']!r}, not {DATA_NAME}")
        if e["length"] is None:
            raise ArtifactMismatch(f"initializer {e['name']} records no length")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise ArtifactMismatch("the graph stores two external initializers under one name")
    # without the file (one for all), as the manifests of stripped graphs record them
    return sorted(({k: v for k, v in e.items() if k != "file"} for e in entries), key=lambda e: e["offset"])


def inline_initializers(model: Any) -> dict[str, np.ndarray]:
    """Initializers whose bytes are inside ``model.onnx`` (small tensors and the exporter's constants)."""
    from onnx import numpy_helper

    from onnx.external_data_helper import uses_external_data

    return {t.name: numpy_helper.to_array(t) for t in _all_initializers(model) if not uses_external_data(t)}


# ---- strip -----------------------------------------------------------------------------------------------------
def strip(folder: Path, dest: Path) -> Path:
    """Copy the export ``folder`` to ``dest`` without ``model.onnx.data``, plus ``weights_manifest.json``."""
    folder, dest = Path(folder), Path(dest)
    model = _load_graph(folder)
    entries = manifest_entries(model)
    data = folder / DATA_NAME
    size = data.stat().st_size if data.is_file() else max((e["offset"] + e["length"] for e in entries), default=0)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(DATA_NAME))
    write_json_atomic(dest / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "data_file": DATA_NAME, "data_bytes": size,
                                             "tensors": entries})
    return dest


# ---- the target machine's tensors ------------------------------------------------------------------------------
def module_tensors(graph_module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (non-persistent ones too) by name, shared tensors under each of their names."""
    out = dict(graph_module.named_parameters(remove_duplicate=False))
    out.update(graph_module.named_buffers(remove_duplicate=False))
    return out


def source_tensor(name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The tensor behind initializer ``name`` (``{W}.T``: W transposed), or None when the module has none."""
    if name in tensors:
        return tensors[name]
    if name.endswith(TRANSPOSED) and name[: -len(TRANSPOSED)] in tensors:
        return tensors[name[: -len(TRANSPOSED)]].transpose(-1, -2)
    return None


def _as_onnx_array(tensor: torch.Tensor, data_type: int) -> np.ndarray:
    """``tensor`` on the host, cast to ONNX ``data_type``, C-contiguous."""
    from onnx.helper import tensor_dtype_to_np_dtype

    np_dtype = tensor_dtype_to_np_dtype(data_type)
    host = tensor.detach().to("cpu").contiguous()
    if host.dtype == torch.bfloat16:
        host = host.float()
    return np.ascontiguousarray(host.numpy().astype(np_dtype, copy=False))


def _torch_dtype_of(data_type: int) -> torch.dtype | None:
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        return torch.from_numpy(np.zeros(0, dtype=tensor_dtype_to_np_dtype(data_type))).dtype
    except (TypeError, KeyError):
        return None


def _problems_external(entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Initializers of the weights file the module cannot give with the recorded shape and dtype."""
    problems = []
    for e in entries:
        t = source_tensor(e["name"], tensors)
        if t is None:
            problems.append(f"{e['name']}: no such parameter or buffer in the module")
            continue
        want = _torch_dtype_of(e["data_type"])
        if list(t.shape) != e["dims"]:
            problems.append(f"{e['name']}: shape {list(t.shape)} in the module, {e['dims']} in the graph")
        elif t.dtype != want:
            problems.append(f"{e['name']}: dtype {t.dtype} in the module, {want} in the graph")
        elif t.numel() * t.element_size() != e["length"]:
            problems.append(f"{e['name']}: {t.numel() * t.element_size()} bytes, the graph records {e['length']}")
    return problems


def _problems_inline(inline: dict[str, np.ndarray], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Named tensors stored inside model.onnx whose values differ from the module's (they are not rewritten).

    Equal up to float rounding is equal: ``inv_freq`` comes from the config on both machines, but computed by
    another transformers version or on another device its last bits may differ."""
    problems = []
    for name, value in inline.items():
        t = source_tensor(name, tensors)
        if t is None:
            continue  # an exporter constant (val_*, zeros, ...): part of the graph
        here = _as_onnx_array(t, _onnx_type(value)) if list(t.shape) == list(value.shape) else None
        same = here is not None and (np.allclose(here, value, rtol=1e-5, atol=0.0) if value.dtype.kind == "f"
                                     else np.array_equal(here, value))
        if not same:
            problems.append(f"{name}: stored inside {GRAPH_NAME} with other values than the module's")
    return problems


def _onnx_type(value: np.ndarray) -> int:
    from onnx.helper import np_dtype_to_tensor_dtype

    return np_dtype_to_tensor_dtype(value.dtype)


def _problems_merged(names: set[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module tensors the graph holds no initializer for: the exporter merged equal-valued tensors into one, which
    is only right if, here too, each equals a tensor the graph does hold."""
    held = {n for n in (m[: -len(TRANSPOSED)] if m.endswith(TRANSPOSED) else m for m in names) if n in tensors}
    problems = []
    for name, t in tensors.items():
        if name in held:
            continue
        if not any(tensors[h].shape == t.shape and tensors[h].dtype == t.dtype and torch.equal(tensors[h], t)
                   for h in held):
            problems.append(f"{name}: not in the graph (merged with an equal tensor at export?) and equal to no "
                            "tensor the graph holds on this machine")
    return problems


# ---- fill ------------------------------------------------------------------------------------------------------
def _write_data(path: Path, entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor], size: int) -> None:
    """Write the weights file atomically: each tensor's bytes at its offset, the file ``size`` bytes long."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.truncate(size)
            for e in entries:
                raw = _as_onnx_array(source_tensor(e["name"], tensors), e["data_type"]).tobytes()
                if len(raw) != e["length"]:
                    raise ArtifactMismatch(f"{e['name']}: {len(raw)} bytes, the graph records {e['length']}")
                f.seek(e["offset"])
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _record_size(dest: Path, size: int) -> None:
    """Set export_info.json's byte count for the weights file (``load_export_info`` checks it)."""
    path = dest / INFO_NAME
    if not path.is_file():
        return
    info = read_json(path)
    meta = info.get("files", {}).get(DATA_NAME)
    if isinstance(meta, dict) and "bytes" in meta and meta["bytes"] != size:
        meta["bytes"] = size
        write_json_atomic(path, info)


def fill(dest: Path, graph_module: torch.nn.Module) -> Path:
    """Write ``dest/model.onnx.data`` from ``graph_module`` (a DecoderGraph like the exported one); returns its path.

    Checks first, writes nothing on failure: every weights-file initializer must come from the module with the
    recorded shape and dtype, named tensors inside model.onnx must equal the module's, and module tensors the
    exporter merged away must still equal one the graph holds.
    """
    dest = Path(dest)
    manifest = read_json(dest / MANIFEST_NAME)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactMismatch(f"{dest / MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest")
    model = _load_graph(dest)
    entries = manifest_entries(model)
    if entries != manifest["tensors"]:
        raise ArtifactMismatch(f"{GRAPH_NAME} does not match {MANIFEST_NAME}: the graph changed after strip")
    tensors = module_tensors(graph_module)
    inline = inline_initializers(model)
    problems = (_problems_external(entries, tensors) + _problems_inline(inline, tensors)
                + _problems_merged({e["name"] for e in entries} | set(inline), tensors))
    if problems:
        raise ArtifactMismatch(f"cannot fill {dest / DATA_NAME} from this module ({len(problems)} problems):\n  "
                               + "\n  ".join(problems))
    size = max([int(manifest["data_bytes"])] + [e["offset"] + e["length"] for e in entries])
    with torch.no_grad():
        _write_data(dest / DATA_NAME, entries, tensors, size)
    _record_size(dest, size)
    return dest / DATA_NAME


def fill_gated(dest: Path, loaded: Any, routed: Any) -> Path:
    """``fill`` a gated export's weights from ``loaded`` with ``routed``'s routers, and write its phase graphs when
    an export made before gated exports wrote them lacks them (their weights manifest must match the filled file)."""
    from rtexport.onnx.phase_graphs import MANIFEST_NAME as PHASES_MANIFEST
    from rtexport.onnx.phase_graphs import write_phase_graphs

    path = fill(dest, graph_module_from_info(loaded, dest, routed=routed))
    info = read_json(Path(dest) / INFO_NAME)
    if info.get("prefill_select") == "cond" and not (Path(dest) / PHASES_MANIFEST).is_file():
        write_phase_graphs(dest)
    return path


# ---- the module export_onnx exports ----------------------------------------------------------------------------
def graph_module_from_info(loaded: Any, folder: Path, *, plan: Any = None, routed: Any = None) -> DecoderGraph:
    """``build_graph_module`` with the mode, dtype, opset, attention, prefill select, KV cache, logits and
    prefill-always layers that ``folder``'s export_info.json records; fails when the spec built here differs from the
    recorded one."""
    info = read_json(Path(folder) / INFO_NAME)
    graph = build_graph_module(loaded, mode=info["mode"], plan=plan, routed=routed, dtype=info["dtype"],
                               attention=info.get("attention", "auto"), opset=info["opset"],
                               prefill_select=info.get("prefill_select"), kv_cache=info.get("kv_cache", "growing"),
                               logits=info.get("logits", "all"),
                               prefill_always=list(info["spec"].get("prefill_always", [])))
    recorded = GraphSpec.from_dict(info["spec"]).to_dict()
    if graph.spec.to_dict() != recorded:
        raise ArtifactMismatch(f"the spec built here {graph.spec.to_dict()} differs from the export's {recorded}")
    return graph


# ---- selfcheck -------------------------------------------------------------------------------------------------
def _tiny_case(mode: str, seed: int, router_seed: int = 1) -> tuple[Any, Any, Any]:
    """A tiny random Llama (fp32, CPU) wrapped as rtexport loads models, with a plan (static: attention of layer
    1 skipped) or routers on layers 1 and 2 (gated; router weights drawn from ``router_seed``)."""
    from rtexport.models.loading import wrap_model
    from rtexport.models.shapes import random_model
    from rtexport.planning import SkipPlan
    from rtexport.routing import RoutedModel

    model = random_model("llama-tiny", device="cpu", dtype=torch.float32, seed=seed, std=0.08)
    loaded = wrap_model(model, model_id="llama-tiny")
    if mode == "static":
        plan = SkipPlan(base_model="llama-tiny", fingerprint=loaded.fingerprint, num_layers=4, target="attn",
                        method="manual", skip=[1], candidates=[1])
        return loaded, plan, None
    routed = RoutedModel.from_model(model, layers=[1, 2])
    g = torch.Generator().manual_seed(router_seed)
    with torch.no_grad():
        for r in routed.routers.values():
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g))
    return loaded, None, routed


def _ort_logits(folder: Path) -> list[np.ndarray]:
    """Logits of a few left-padded batches, a prefill and a step through the cache, under ONNX Runtime (CPU)."""
    from rtexport.onnx.runtime import OrtCausalLM

    lm = OrtCausalLM(folder, providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    out = []
    for batch, length in ((1, 7), (3, 5)):
        ids = g.integers(0, 256, (batch, length))
        mask = np.ones((batch, length), dtype=np.int64)
        mask[0, :2] = 0
        step = lm.forward(ids, mask)
        more = g.integers(0, 256, (batch, 2))
        full = np.concatenate([mask, np.ones((batch, 2), dtype=np.int64)], axis=1)
        out += [step.logits, lm.forward(more, full, cache=step.cache).logits]
    return out


def _graph_inputs(graph: DecoderGraph) -> list[torch.Tensor]:
    """Inputs for ``graph`` in its input order: batch 2, 3 new tokens after 5 cached ones (random cache values),
    gated: every routed layer run by both sequences."""
    g = torch.Generator().manual_seed(0)
    b, t, p = 2, 3, 5
    vocab = int(graph.embed_tokens.weight.shape[0])
    inputs = [torch.randint(0, vocab, (b, t), generator=g), torch.ones(b, p + t, dtype=torch.int64),
              torch.arange(p, p + t)[None].expand(b, t).contiguous()]
    shape = (b, graph.num_kv_heads, p, graph.head_dim)
    inputs += [torch.randn(shape, generator=g) for _ in range(2 * len(graph.spec.kv_layers))]
    if graph.spec.mode == "gated":
        inputs.append(torch.ones(b, len(graph.spec.routed_layers), dtype=torch.bool))
        inputs += [torch.tensor(True) for _ in graph.spec.routed_layers]
    return inputs


def _torch_vs_ort(graph: DecoderGraph, folder: Path) -> float:
    """Max abs difference of the logits of ``graph`` run by torch and of ``folder``'s graph under ONNX Runtime."""
    import onnxruntime as ort

    flat = _graph_inputs(graph)
    n_kv = 2 * len(graph.spec.kv_layers)
    args: list[Any] = [*flat[:3], flat[3:3 + n_kv]]
    if graph.spec.mode == "gated":
        args += [flat[3 + n_kv], flat[4 + n_kv:]]
    with torch.no_grad():
        want = graph(*args)[0].numpy()
    session = ort.InferenceSession(str(folder / GRAPH_NAME), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {n: v.numpy() for n, v in zip(graph.input_names(), flat)})[0]
    return float(np.abs(got - want).max())


def _check_mode(mode: str, root: Path) -> list[str]:
    """Export, strip, refill from the same model (logits identical) and from another model of the same shape
    (logits as that model's in torch). Returns failures."""
    from rtexport.onnx.export import export_onnx, load_export_info

    failures = []
    loaded, plan, routed = _tiny_case(mode, seed=0)
    original = root / f"{mode}-export"
    export_onnx(loaded, original, mode=mode, plan=plan, routed=routed, dtype="float32", attention="fused")
    for label, (other, other_plan, other_routed) in (("same model", (loaded, plan, routed)),
                                                     ("other values", _tiny_case(mode, seed=7))):
        dest = strip(original, root / f"{mode}-{label.replace(' ', '-')}")
        graph = graph_module_from_info(other, dest, plan=other_plan, routed=other_routed)
        fill(dest, graph)
        load_export_info(dest)
        if label == "same model":
            same_bytes = (dest / DATA_NAME).read_bytes() == (original / DATA_NAME).read_bytes()
            diff = max(float(np.abs(a - b).max()) for a, b in zip(_ort_logits(original), _ort_logits(dest)))
            print(f"  {mode:6s} {label:12s}: weights file byte-identical {same_bytes}, ORT logits max |diff| {diff}")
            if diff != 0.0 or not same_bytes:
                failures.append(f"{mode} {label}")
        else:
            diff = _torch_vs_ort(graph, dest)
            changed = (dest / DATA_NAME).read_bytes() != (original / DATA_NAME).read_bytes()
            print(f"  {mode:6s} {label:12s}: weights file differs {changed}, ORT vs torch DecoderGraph of the other "
                  f"model, max |diff| {diff:.2e}")
            if diff > 1e-4 or not changed:
                failures.append(f"{mode} {label}")
    return failures


def _refused(label: str, dest: Path, graph: DecoderGraph) -> list[str]:
    """``fill`` must refuse ``graph`` with a list of what differs, leaving the weights file as it was."""
    before = (dest / DATA_NAME).stat().st_mtime_ns
    try:
        fill(dest, graph)
    except ArtifactMismatch as e:
        lines = str(e).splitlines()
        print(f"  refused  {label:12s}: {len(lines) - 1} problems, e.g. {lines[1].strip()}")
        return [] if (dest / DATA_NAME).stat().st_mtime_ns == before else [f"refused fill ({label}) wrote"]
    return [f"fill accepted a module with {label}"]


def _check_rejects(root: Path) -> list[str]:
    """Refusals: a module of another shape, and one whose norm weights are not all 1 (the export, made from a
    random_model whose norms are all 1, merged them into one initializer)."""
    from rtexport.models.loading import wrap_model
    from rtexport.models.shapes import SHAPES, random_model

    dest = root / "static-same-model"
    wider = dict(SHAPES["llama-tiny"], intermediate_size=96)
    loaded = wrap_model(random_model(wider, device="cpu", dtype=torch.float32), model_id="llama-tiny")
    failures = _refused("other shape", dest, build_graph_module(loaded, mode="static", dtype="float32", attention="fused"))
    loaded, plan, _ = _tiny_case("static", seed=0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    graph = graph_module_from_info(loaded, dest, plan=plan)
    return failures + _refused("other norms", dest, graph)


def selfcheck() -> int:
    """Static and gated tiny exports stripped and refilled on CPU; prints PASS/FAIL, returns the exit status."""
    import warnings

    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="graph-weights-") as tmp:
        root = Path(tmp)
        failures = _check_mode("static", root) + _check_mode("gated", root) + _check_rejects(root)
    print("PASS" if not failures else f"FAIL: {', '.join(failures)}")
    return 1 if failures else 0


# ---- CLI -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("selfcheck", help="CPU round trip of tiny static and gated exports")
    p = sub.add_parser("strip", help="copy an export folder without its weights file")
    p.add_argument("folder", type=Path)
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "selfcheck":
        return selfcheck()
    if args.cmd == "strip":
        dest = strip(args.folder, args.dest)
        n = len(read_json(dest / MANIFEST_NAME)["tensors"])
        print(f"{dest}: {GRAPH_NAME} and {n} tensors in {MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
