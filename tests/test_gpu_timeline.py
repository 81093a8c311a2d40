"""The device-timeline summary of ``examples/benchmarks/gpu_timeline.py``: BENCHMARKS.md's idle-time figures for the
gated prefill rest on it."""

import pytest
from conftest import benchmark_script


def _module():
    return benchmark_script("gpu_timeline")


def _event(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_idle_time_and_the_idle_time_after_host_copies():
    events = [
        _event("user_annotation", "call", 0, 1000),
        _event("kernel", "gemm", 10, 100),  # 10..110
        _event("kernel", "norm", 100, 20),  # overlaps: busy to 120
        _event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 130, 2),  # idle 10 before it
        _event("kernel", "gemm", 182, 100),  # idle 50 after the copy
        _event("gpu_memset", "Memset", 300, 5),  # idle 18
        # a second call
        _event("user_annotation", "call", 2000, 1000),
        _event("kernel", "gemm", 2000, 50),
        _event("cpu_op", "ignored", 2100, 5),
    ]
    summary = _module().summarize({"traceEvents": events})
    first = _module().summarize_call([e for e in events[1:6]], (0, 1000))
    assert first == {"kernels": 3, "dtoh_copies": 1, "htod_copies": 0, "span_us": 295.0, "busy_us": 217.0,
                     "idle_us": 78.0, "after_dtoh_idle_us": 50.0, "lead_us": 10.0, "tail_us": 695.0}
    assert summary["calls"] == 2
    assert summary["kernels"] == 2  # the median of 3 and 1
    assert summary["dtoh_kinds"] == ["Memcpy DtoH (Device -> Pageable)"]


def test_a_trace_without_marked_calls_is_refused():
    with pytest.raises(ValueError, match="no calls marked"):
        _module().summarize({"traceEvents": [_event("kernel", "gemm", 0, 10)]})
