"""Where ONNX Runtime's prefill loses to PyTorch's on the GPU: one Llama-3-8B layer's attention and GEMMs, timed alone.

ONNX Runtime (CUDA EP, fp16) runs single-node graphs, PyTorch the same operation, side by side in one process:

* attention at prefill, T tokens, 32 query heads, 8 KV heads, head size 128 (the ONNX ``Attention`` node the
  exported graphs use, with an empty past): an additive (1,1,T,T) causal mask, as the graphs feed it today;
  ``is_causal=1`` with a padding-only mask (zeros here; ONNX Runtime wants the mask's query dimension, so it is
  (1,1,T,T) too); ``is_causal=1`` and no mask; against PyTorch SDPA with
  ``is_causal=True`` (what the pruned HF model runs without padding) and with the same additive mask;
* the MLP's GEMMs (T x 4096 @ 4096 x 14336 and back), ONNX ``MatMul`` on [in, out] weights (the export's layout)
  against ``torch.nn.functional.linear`` on [out, in] weights.

Usage (GPU machine, onnxruntime-gpu importable): python examples/benchmarks/ort_prefill_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

H, KV, D, HIDDEN, FFN = 32, 8, 128, 4096, 14336


def _attention_graph(t: int, mask: str, causal: bool) -> onnx.ModelProto:
    f16 = TensorProto.FLOAT16
    inputs = [helper.make_tensor_value_info("q", f16, [1, t, H * D]),
              helper.make_tensor_value_info("k", f16, [1, t, KV * D]),
              helper.make_tensor_value_info("v", f16, [1, t, KV * D])]
    names = ["q", "k", "v"]
    if mask == "full":
        inputs.append(helper.make_tensor_value_info("mask", f16, [1, 1, t, t]))
        names.append("mask")
    elif mask == "keys":
        inputs.append(helper.make_tensor_value_info("mask", f16, [1, 1, t, t]))
        names.append("mask")
    else:
        names.append("")
    inputs += [helper.make_tensor_value_info("past_k", f16, [1, KV, 0, D]),
               helper.make_tensor_value_info("past_v", f16, [1, KV, 0, D])]
    names += ["past_k", "past_v"]
    node = helper.make_node("Attention", names, ["y", "present_k", "present_v"], q_num_heads=H, kv_num_heads=KV,
                            scale=D ** -0.5, is_causal=int(causal))
    outputs = [helper.make_tensor_value_info("y", f16, [1, t, H * D]),
               helper.make_tensor_value_info("present_k", f16, [1, KV, t, D]),
               helper.make_tensor_value_info("present_v", f16, [1, KV, t, D])]
    model = helper.make_model(helper.make_graph([node], "attn", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _matmul_graph(t: int, k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    f16 = TensorProto.FLOAT16
    w = onnx.numpy_helper.from_array(weight, "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    model = helper.make_model(helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", f16, [1, t, k])],
                                                [helper.make_tensor_value_info("y", f16, [1, t, n])], [w]),
                              opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def _median_ms(run, reps: int, sync=None) -> float:
    """Median ms of ``run()`` (then ``sync()``, if given) over ``reps`` calls, after three untimed ones."""
    for _ in range(3):
        run()
    if sync:
        sync()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        if sync:
            sync()
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def _time_ort(model: onnx.ModelProto, feeds: dict[str, torch.Tensor], reps: int) -> float:
    """One run with every input and output on the GPU (IO binding; a run returns when the GPU is done)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_input(name, "cuda", 0, np.float16, list(value.shape), value.data_ptr())
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)
    return _median_ms(lambda: session.run_with_iobinding(binding), reps)


def _time_torch(fn, reps: int) -> float:
    return _median_ms(fn, reps, torch.cuda.synchronize)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="ort-prefill-kernels")
    args = ap.parse_args()
    t, dev = args.tokens, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, t, H * D, device=dev, dtype=torch.float16, generator=g)
    k = torch.randn(1, t, KV * D, device=dev, dtype=torch.float16, generator=g)
    v = torch.randn(1, t, KV * D, device=dev, dtype=torch.float16, generator=g)
    empty = torch.zeros(1, KV, 0, D, device=dev, dtype=torch.float16)
    low = torch.finfo(torch.float16).min / 2
    causal = torch.full((t, t), low, device=dev, dtype=torch.float16).triu(1)[None, None].contiguous()
    keys = torch.zeros(1, 1, t, t, device=dev, dtype=torch.float16)
    res: dict[str, float] = {}
    base = {"q": q, "k": k, "v": v, "past_k": empty, "past_v": empty}
    res["ort_attention_full_mask"] = _time_ort(_attention_graph(t, "full", False), {**base, "mask": causal}, args.reps)
    res["ort_attention_causal_key_mask"] = _time_ort(_attention_graph(t, "keys", True), {**base, "mask": keys},
                                                     args.reps)
    res["ort_attention_causal_no_mask"] = _time_ort(_attention_graph(t, "none", True), base, args.reps)
    q4 = q.view(1, t, H, D).transpose(1, 2)
    k4 = k.view(1, t, KV, D).transpose(1, 2)
    v4 = v.view(1, t, KV, D).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    res["torch_sdpa_causal"] = _time_torch(lambda: sdpa(q4, k4, v4, is_causal=True, enable_gqa=True), args.reps)
    res["torch_sdpa_full_mask"] = _time_torch(lambda: sdpa(q4, k4, v4, attn_mask=causal, enable_gqa=True), args.reps)
    # the MLP's GEMMs: up (4096 -> 14336) and down (14336 -> 4096)
    for name, (kin, nout) in {"up": (HIDDEN, FFN), "down": (FFN, HIDDEN)}.items():
        w = torch.randn(nout, kin, device=dev, dtype=torch.float16, generator=g) * 0.02
        x = torch.randn(1, t, kin, device=dev, dtype=torch.float16, generator=g)
        res[f"ort_matmul_{name}"] = _time_ort(_matmul_graph(t, kin, nout, w.t().contiguous().cpu().numpy()),
                                              {"x": x}, args.reps)
        res[f"torch_linear_{name}"] = _time_torch(lambda: torch.nn.functional.linear(x, w), args.reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    record = {"tokens": t, "reps": args.reps, "ms": res, "onnxruntime": ort.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name()}
    (out / "ort_prefill_kernels.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
