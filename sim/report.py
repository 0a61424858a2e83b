"""An interactive HTML report of a simulated run: a Gantt chart per lane and a per-step breakdown."""

from __future__ import annotations

import logging

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from sim.result import SimResult
from tide.io import write_text_atomic
from tide.ir import LANES, OP_LANES

logger = logging.getLogger(__name__)

# One colour per op kind, the same in both charts.
KIND_COLOURS = dict(zip(OP_LANES, (
    "#7f7f7f", "#1f77b4", "#aec7e8", "#9467bd", "#c5b0d5", "#d62728", "#2ca02c", "#98df8a", "#ff7f0e",
    "#8c564b", "#ffbb78", "#17becf", "#bcbd22")))


def build_figure(result: SimResult, *, title: str = "") -> go.Figure:
    """Build the report figure; ``result`` needs a timeline (``record_timeline=True``).

    The Gantt chart draws every span as a bar on its lane, one trace per op kind, with
    WebGL so that runs of a few hundred thousand ops stay responsive. The breakdown splits
    each forward pass's time by the op kinds on its critical path, so each bar's height is
    the pass's time.
    """
    if result.timeline is None:
        raise ValueError("the report needs a timeline: simulate with record_timeline=True")
    figure = make_subplots(rows=2, cols=1, row_heights=[0.55, 0.45], vertical_spacing=0.12,
                           subplot_titles=("Gantt chart per lane (ms)",
                                           "Time per forward pass on its critical path, by op kind (ms)"))

    # Gantt: x contains start, end, None for each span, so one line trace draws many bars.
    by_kind: dict[str, tuple[list, list, list]] = {}
    for span in result.timeline.spans:
        xs, ys, labels = by_kind.setdefault(span.kind, ([], [], []))
        label = f"forward {span.forward}: {span.op_id}, {span.duration_s * 1e6:.1f} us"
        xs += (span.start_s * 1e3, span.end_s * 1e3, None)
        ys += (span.lane, span.lane, None)
        labels += (label, label, None)
    for kind in OP_LANES:
        if kind not in by_kind:
            continue
        xs, ys, labels = by_kind[kind]
        figure.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", line={"width": 18, "color": KIND_COLOURS[kind]},
                                      name=kind, legendgroup=kind, text=labels, hoverinfo="text"), row=1, col=1)
    figure.update_yaxes(categoryorder="array", categoryarray=list(reversed(LANES)), row=1, col=1)
    figure.update_xaxes(title_text="time (ms)", row=1, col=1)

    # Breakdown: one stacked bar per forward pass.
    forwards = [f"{f.index} {f.kind}" + (f" b{f.block} s{f.step}" if f.step >= 0 else "")
                for f in result.timeline.forwards]
    for kind in OP_LANES:
        heights = [breakdown.get(kind, 0.0) * 1e3 for breakdown in result.forward_breakdown_s]
        if not any(heights):
            continue
        figure.add_trace(go.Bar(x=forwards, y=heights, name=kind, legendgroup=kind, showlegend=kind not in by_kind,
                                marker_color=KIND_COLOURS[kind]), row=2, col=1)
    figure.update_layout(barmode="stack", height=900, title=title or "simulated run",
                         legend={"title": "op kind"}, hovermode="closest")
    figure.update_xaxes(title_text="forward pass", row=2, col=1)
    figure.update_yaxes(title_text="ms", row=2, col=1)
    return figure


def write_html(result: SimResult, path: str, *, title: str = "") -> None:
    """Write the report as one self-contained HTML file (plotly.js inline, so it opens offline)."""
    figure = build_figure(result, title=title)
    write_text_atomic(path, figure.to_html(include_plotlyjs=True, full_html=True))
    logger.info("wrote the HTML report %s", path)
