"""The ORT profile summary of ``examples/benchmarks/ort_gpu_speed.py`` (``profile-summary``): BENCHMARKS.md's figures
for ONNX Runtime's own time per executed ``If`` rest on it."""

from __future__ import annotations

from conftest import benchmark_script


def _load():
    return benchmark_script("ort_gpu_speed")


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}


def _node(op, ts, dur, name=None):
    return {"cat": "Node", "name": f"{name or op}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_if_own_time_is_its_duration_minus_its_direct_children():
    summarize = _load().summarize_profile
    events = [
        _run(0, 500), _node("MatMul", 10, 400),  # the prefill run: left out
        _run(1000, 300),
        # an outer If (100 µs) holding an Identity (10) and an inner If (60) that holds a MatMul (25) and a Where (5)
        _node("If", 1010, 100, "outer"), _node("Identity", 1015, 10), _node("If", 1030, 60, "inner"),
        _node("MatMul", 1035, 25), _node("Where", 1070, 5),
        _node("Add", 1200, 7),  # main graph
    ]
    out = summarize(events, steps=1)
    assert out["model_run_us_median"] == 300
    assert out["ops"]["If"] == {"us_per_step": 160.0, "nodes_per_step": 2.0}
    assert out["ops"]["MatMul"] == {"us_per_step": 25.0, "nodes_per_step": 1.0}  # not the prefill's
    # outer: 100 - (10 + 60) = 30, with 2 direct children; inner: 60 - (25 + 5) = 30, with 2 direct children
    assert out["if_own_us"] == {"2 direct nodes": {"per_step": 2.0, "median_us": 30.0}}
