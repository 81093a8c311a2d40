"""The model card's figures, drawn with matplotlib's object API (``Figure`` + the Agg canvas; pyplot's global state
and the global backend are never touched). Each function takes plain data and returns PNG bytes; the caller decides
whether the data exists and where the file goes."""

from __future__ import annotations

import io
import math
from typing import Mapping, Sequence

# One colour per method, used in every figure.
COLOURS = {
    "router-tuning": "#1f6fb4",
    "attention-drop": "#e07b00",
    "base": "#444444",
    "skipped": "#c0392b",
    "kept": "#1f6fb4",
}
METHOD_LABELS = {"router-tuning": "Router-Tuning", "attention-drop": "Attention-Drop", "base": "base model"}
DPI = 110


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "rtexport (matplotlib)"})
    return buf.getvalue()


def execution_rates_png(
    rates: Mapping[int, float],
    skipped: Sequence[int],
    *,
    num_layers: int | None = None,
    title: str = "Router execution rate per layer",
    what: str = "attention",
) -> bytes:
    """Bars of each routed layer's execution rate (the fraction of sequences whose router runs the sub-block); the
    layers the plan drops are drawn in red."""
    layers = sorted(int(i) for i in rates)
    skip = {int(i) for i in skipped}
    n = num_layers or (max(layers) + 1)
    fig, (ax,) = _figure(max(6.0, 0.22 * n + 2.0), 3.4)
    colours = [COLOURS["skipped"] if i in skip else COLOURS["kept"] for i in layers]
    unrouted = [i for i in range(n) if i not in set(layers)]
    ax.bar(unrouted, [100.0] * len(unrouted), color="#dddddd", width=0.8)
    ax.bar(layers, [100 * float(rates[i]) for i in layers], color=colours, width=0.8)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(0, 105)
    ax.set_xlabel("layer")
    ax.set_ylabel("execution rate (%)")
    ax.set_title(title)
    step = 1 if n <= 32 else 2 if n <= 64 else 4
    ax.set_xticks(range(0, n, step))
    ax.tick_params(axis="x", labelsize=8)
    from matplotlib.patches import Patch

    handles = [Patch(color=COLOURS["skipped"], label=f"{what} removed"),
               Patch(color=COLOURS["kept"], label=f"{what} kept")]
    if unrouted:
        handles.append(Patch(color="#dddddd", label="no router (always runs)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _png(fig)


def quality_vs_skip_ratio_png(
    series: Mapping[str, Sequence[tuple[float, float | None, float | None]]],
    base: tuple[float | None, float | None] | None = None,
    *,
    current_ratio: float | None = None,
) -> bytes:
    """Perplexity (left) and mean accuracy (right) against skip ratio, one line per method.

    ``series``: method -> [(skip_ratio, perplexity or None, mean accuracy in [0, 1] or None), ...]; ``base``: the base
    model's (perplexity, mean accuracy), drawn as a dashed line. The accuracy panel is left out when no point has one.
    """
    has_acc = any(p[2] is not None for pts in series.values() for p in pts) or (base is not None and base[1] is not None)
    fig, axes = _figure(10.0 if has_acc else 5.6, 3.6, ncols=2 if has_acc else 1)
    panels = [(axes[0], 1, "held-out perplexity", 1.0)]
    if has_acc:
        panels.append((axes[1], 2, "mean accuracy (%)", 100.0))
    for ax, k, label, scale in panels:
        values: list[float] = []
        for method, points in series.items():
            pts = sorted((float(p[0]), float(p[k]) * scale) for p in points if p[k] is not None)
            if not pts:
                continue
            values += [v for _, v in pts]
            ax.plot([100 * x for x, _ in pts], [v for _, v in pts], marker="o",
                    color=COLOURS.get(method), label=METHOD_LABELS.get(method, method))
        if base is not None and base[k - 1] is not None:
            b = float(base[k - 1]) * scale
            values.append(b)
            ax.axhline(b, color=COLOURS["base"], linestyle="--", linewidth=1, label=METHOD_LABELS["base"])
        if current_ratio is not None:
            ax.axvline(100 * current_ratio, color="#999999", linestyle=":", linewidth=1, label="this model")
        if k == 1 and values and min(values) > 0 and max(values) / min(values) > 8:
            ax.set_yscale("log")
        ax.set_xlabel("skip ratio (% of layers)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("Quality against skip ratio")
    return _png(fig)


def speed_png(rows: Sequence[Mapping[str, object]]) -> bytes:
    """Speedup over the full model per benchmark cell: lines against skip ratio when the rows carry several skip
    ratios, grouped bars per variant otherwise."""
    cells = list(dict.fromkeys(str(r["cell"]) for r in rows))
    ratios = {r.get("skip_ratio") for r in rows if r.get("skip_ratio") is not None}
    if len(ratios) > 1:
        fig, (ax,) = _figure(6.4, 3.6)
        for cell in cells:
            pts = sorted((float(r["skip_ratio"]), float(r["speedup"])) for r in rows  # type: ignore[arg-type]
                         if str(r["cell"]) == cell and r.get("skip_ratio") is not None and r.get("speedup") is not None)
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=cell)
        ax.set_xlabel("skip ratio (% of layers)")
    else:
        variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
        fig, (ax,) = _figure(max(6.0, 1.2 * len(cells) * max(1, len(variants)) / 2 + 2.5), 3.6)
        width = 0.8 / max(1, len(variants))
        for j, variant in enumerate(variants):
            xs, ys = [], []
            for c, cell in enumerate(cells):
                for r in rows:
                    if str(r["cell"]) == cell and str(r["variant"]) == variant and r.get("speedup") is not None:
                        xs.append(c + (j - (len(variants) - 1) / 2) * width)
                        ys.append(float(r["speedup"]))  # type: ignore[arg-type]
            bars = ax.bar(xs, ys, width=width * 0.95, label=variant)
            ax.bar_label(bars, labels=[f"{y:.2f}×" for y in ys], fontsize=7, padding=1)
        ax.set_xticks(range(len(cells)))
        ax.set_xticklabels(cells, fontsize=8, rotation=15 if len(cells) > 3 else 0)
        top = max((float(r["speedup"]) for r in rows if r.get("speedup") is not None), default=1.0)  # type: ignore[arg-type]
        ax.set_ylim(0, max(1.1, math.ceil(top * 12) / 10))
    ax.axhline(1.0, color=COLOURS["base"], linestyle="--", linewidth=1)
    ax.set_ylabel("speedup over the full model (×)")
    ax.set_title("Measured speed")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)
