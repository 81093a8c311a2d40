"""GPU memory of a gated export's ONNX Runtime sessions: the phase graphs given one shared copy of the weights (what
``OrtCausalLM`` does on CUDA), the phase graphs each loading its own copy, and ``model.onnx`` alone.

Each variant runs in a process of its own, which opens the sessions and greedily generates 8 tokens after a 128-token
prompt; it reports the device memory in use (``torch.cuda.mem_get_info``, device-wide) after opening the sessions and
after generating, less what was in use before it opened them. The weights are written first from a same-shaped
random model, as ``ort_gpu_speed.py bench`` writes them (``graph_weights.fill``).

    # on the GPU machine, on a weightless gated export of ``ort_gpu_speed.py export``
    python3 examples/benchmarks/ort_shared_weights_memory.py --graphs graphs-1b --out $OUT
    # here: the same on the CPU's memory (the process's resident set instead of device memory)
    python examples/benchmarks/ort_shared_weights_memory.py --graphs dry --device cpu --out /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {
    "phase_graphs_shared": {"phase_graphs": True},
    "phase_graphs_unshared": {"phase_graphs": True, "share_weights": False},
    "model_onnx_alone": {"phase_graphs": False},
}


def measure(folder: Path, variant: str, device: str, vocab: int) -> dict:
    """One variant, in this process: memory in use (MiB) after opening its sessions and after generating."""
    import numpy as np

    import torch

    from rtexport.onnx.runtime import OrtCausalLM

    def in_use() -> float:
        if device == "cuda":
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2**20
        with open("/proc/self/statm") as f:  # resident set size, MiB
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    if device == "cuda":
        torch.zeros(1, device="cuda")  # torch's own CUDA context, before the baseline
    base = in_use()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    lm = OrtCausalLM(folder, providers=providers, **VARIANTS[variant])
    opened = in_use()
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 128), dtype=np.int64)
    tokens = lm.generate(ids, max_new_tokens=8)
    return {"variant": variant, "sessions": 1 if lm.prefill_session is lm.session else 2,
            "provider": lm.session.get_providers()[0], "opened_mib": round(opened - base, 1),
            "after_generate_mib": round(in_use() - base, 1), "tokens": tokens[0].tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", help="an `ort_gpu_speed.py export` folder with a gated export")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", default="memory")
    ap.add_argument("--measure", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the child process of one variant
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.device, args.vocab)))
        return
    if not args.graphs:
        ap.error("--graphs is required")

    import torch
    from graph_weights import fill_gated
    from ort_gpu_speed import _model_and_plan

    from rtexport.routing import RoutedModel

    graphs, out = Path(args.graphs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = json.loads((graphs / "bench.json").read_text())
    folder = graphs / "gated"
    loaded, plan = _model_and_plan(record["shape"], len(record["skip"]), args.device,
                                   torch.float16 if args.device == "cuda" else torch.float32)
    vocab = loaded.model.config.vocab_size
    routed = RoutedModel.from_model(loaded.model, layers=plan.candidates, base_model_id=loaded.source.model_id)
    fill_gated(folder, loaded, routed)
    del loaded, routed
    if args.device == "cuda":
        torch.cuda.empty_cache()
    log = {"shape": record["shape"], "device": args.device,
           "weights_mib": round((folder / "model.onnx.data").stat().st_size / 2**20, 1), "variants": {}}
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--device", args.device, "--vocab", str(vocab),
                                "--measure", str(folder), variant], capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{child.stderr[-3000:]}")
        log["variants"][variant] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(log["variants"][variant]), flush=True)
    tokens = {v["variant"]: v["tokens"] for v in log["variants"].values()}
    log["same_tokens"] = len({tuple(t) for t in tokens.values()}) == 1
    print("weights", log["weights_mib"], "MiB; same tokens in every variant:", log["same_tokens"], flush=True)
    (out / "ort_shared_weights_memory.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
