"""Where a GPU run's time goes, from the device's own timeline: the kernels and copies of each call, as CUPTI
records them through ``torch.profiler`` (which records every kernel of the process, whichever library launched it:
ONNX Runtime's too).

For each call: ``span_us`` (first device event's start to the last one's end), ``busy_us`` (the union of the device
events' intervals), ``idle_us`` (span - busy: the device waits for the host), the kernels and the copies each
way counted, ``after_dtoh_idle_us``: the idle time right after each device→host copy (the device waiting while
the host reads the copied value and launches what follows), summed; ``lead_us`` and ``tail_us``: the host time of
the call before its first device event and after its last one. Medians over the calls.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Callable

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _device_events(trace: dict) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES),
                  key=lambda e: e["ts"])


def _calls(trace: dict, label: str) -> list[tuple[float, float]]:
    marks = [e for e in trace["traceEvents"]
             if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e.get("name") == label]
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in marks)


def summarize_call(events: list[dict], call: tuple[float, float] | None = None) -> dict:
    """The timeline numbers of one call's device events (sorted by start; times in µs). With ``call`` (its host
    start and end), also ``lead_us`` (host start to the first device event) and ``tail_us`` (the last device event's
    end to the host's end): host time with nothing on the device."""
    if not events:
        return {"kernels": 0, "dtoh_copies": 0, "htod_copies": 0, "span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0,
                "after_dtoh_idle_us": 0.0, "lead_us": 0.0, "tail_us": 0.0}
    busy, end = 0.0, events[0]["ts"]
    after_dtoh, pending_dtoh = 0.0, False
    for e in events:
        start, stop = e["ts"], e["ts"] + e["dur"]
        gap = start - end
        if gap > 0 and pending_dtoh:
            after_dtoh += gap
        if stop > end:
            busy += stop - max(start, end)
            end = stop
        pending_dtoh = e["cat"] == "gpu_memcpy" and "DtoH" in e["name"]
    span = end - events[0]["ts"]
    return {"kernels": sum(e["cat"] == "kernel" for e in events),
            "dtoh_copies": sum(e["cat"] == "gpu_memcpy" and "DtoH" in e["name"] for e in events),
            "htod_copies": sum(e["cat"] == "gpu_memcpy" and "HtoD" in e["name"] for e in events),
            "span_us": round(span, 1), "busy_us": round(busy, 1), "idle_us": round(span - busy, 1),
            "after_dtoh_idle_us": round(after_dtoh, 1),
            "lead_us": round(events[0]["ts"] - call[0], 1) if call else 0.0,
            "tail_us": round(call[1] - end, 1) if call else 0.0}


def summarize(trace: dict, label: str = "call") -> dict:
    """Median timeline numbers over the calls marked ``label`` in a Chrome trace (``export_chrome_trace``), with
    the kinds of device→host copy seen (pageable or pinned host memory)."""
    events = _device_events(trace)
    per_call = [summarize_call([e for e in events if a <= e["ts"] < b], (a, b)) for a, b in _calls(trace, label)]
    if not per_call:
        raise ValueError(f"no calls marked {label!r} in the trace")
    medians = {k: statistics.median(c[k] for c in per_call) for k in per_call[0]}
    medians["dtoh_kinds"] = sorted({e["name"] for e in events if e["cat"] == "gpu_memcpy" and "DtoH" in e["name"]})
    medians["calls"] = len(per_call)
    return medians


def profile_calls(fn: Callable[[], object], calls: int, label: str = "call") -> dict:
    """Run ``fn`` ``calls`` times under ``torch.profiler`` (CPU and CUDA activities) and summarize its device
    timeline (``summarize``)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            with record_function(label):
                fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return summarize(trace, label)
