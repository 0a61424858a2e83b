"""The HTML page of a validation report: predicted over measured timelines, and errors per pass."""

from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tide.ir import LANES, OP_LANES, Timeline

# One colour per op kind, the same in every chart.
KIND_COLOURS = dict(zip(OP_LANES, (
    "#7f7f7f", "#1f77b4", "#aec7e8", "#9467bd", "#c5b0d5", "#d62728", "#2ca02c", "#98df8a", "#ff7f0e",
    "#8c564b", "#ffbb78", "#17becf", "#bcbd22")))
PASS_KIND_COLOURS = {"prefill": "#d62728", "denoise": "#1f77b4", "cache_write": "#2ca02c"}


def _first_passes(timeline: Timeline, count: int) -> list:
    forwards = sorted({span.forward for span in timeline.spans})[:count]
    keep = set(forwards)
    return [span for span in timeline.spans if span.forward in keep]


def overlay_figure(measured: Timeline, predicted: Timeline, *, passes: int, title: str) -> go.Figure:
    """Draw each lane twice, measured above predicted, for the first ``passes`` passes.

    Both timelines start at 0 s, so the rows line up where the prediction is right and
    drift apart where it is not.
    """
    figure = go.Figure()
    rows = []
    for lane in LANES:
        rows += [f"{lane} measured", f"{lane} predicted"]
    by_kind: dict[str, tuple[list, list, list]] = {}
    for label, timeline in (("measured", measured), ("predicted", predicted)):
        spans = _first_passes(timeline, passes)
        origin = min((s.start_s for s in spans), default=0.0)
        for span in spans:
            xs, ys, texts = by_kind.setdefault(span.kind, ([], [], []))
            text = f"{label}, pass {span.forward}: {span.op_id}, {span.duration_s * 1e6:.1f} us"
            xs += ((span.start_s - origin) * 1e3, (span.end_s - origin) * 1e3, None)
            ys += (f"{span.lane} {label}", f"{span.lane} {label}", None)
            texts += (text, text, None)
    for kind in OP_LANES:
        if kind in by_kind:
            xs, ys, texts = by_kind[kind]
            figure.add_trace(go.Scattergl(x=xs, y=ys, mode="lines", name=kind, text=texts, hoverinfo="text",
                                          line={"width": 14, "color": KIND_COLOURS[kind]}))
    used = {y for xs, ys, _ in by_kind.values() for y in ys if y is not None}
    figure.update_yaxes(categoryorder="array", categoryarray=[r for r in reversed(rows) if r in used])
    figure.update_xaxes(title_text="time from the first pass (ms)")
    figure.update_layout(title=title, height=420, legend={"title": "op kind"}, hovermode="closest")
    return figure


def step_error_figure(result) -> go.Figure:
    """Plot the relative error of every pass, one panel per policy, coloured by pass kind."""
    names = list(result.policies)
    figure = make_subplots(rows=len(names), cols=1, shared_xaxes=False, vertical_spacing=0.06,
                           subplot_titles=[f"{name}: (predicted - measured) / measured per pass (%)"
                                           for name in names])
    limit = result.settings.thresholds.max_step_p90_error * 100
    for row, name in enumerate(names, start=1):
        steps = result.policies[name].comparison.steps
        for kind, colour in PASS_KIND_COLOURS.items():
            chosen = [s for s in steps if s.kind == kind]
            if not chosen:
                continue
            figure.add_trace(go.Scatter(
                x=[s.forward for s in chosen], y=[s.error * 100 for s in chosen], mode="markers", name=kind,
                legendgroup=kind, showlegend=row == 1, marker={"color": colour, "size": 5},
                text=[f"pass {s.forward} ({s.kind}, block {s.block}, step {s.step}): measured "
                      f"{s.measured_s * 1e3:.3f} ms, predicted {s.predicted_s * 1e3:.3f} ms" for s in chosen],
                hoverinfo="text"), row=row, col=1)
        for sign in (1, -1):
            figure.add_hline(y=sign * limit, line={"dash": "dot", "color": "#999"}, row=row, col=1)
        figure.update_yaxes(title_text="%", row=row, col=1)
    figure.update_xaxes(title_text="forward pass", row=len(names), col=1)
    figure.update_layout(height=260 * len(names) + 80, legend={"title": "pass kind"})
    return figure


def kind_error_figure(result) -> go.Figure:
    """Bar chart of the summed-duration error of each op kind, one group of bars per policy."""
    figure = go.Figure()
    for name, policy in result.policies.items():
        kinds = list(policy.comparison.by_kind)
        figure.add_trace(go.Bar(x=kinds, y=[policy.comparison.by_kind[k].error * 100 for k in kinds], name=name))
    figure.update_layout(title="error of the summed time of each op kind (%)", barmode="group", height=420)
    figure.update_yaxes(title_text="%")
    return figure


def _summary_table(result) -> str:
    header = ("policy", "measured tok/s", "predicted tok/s", "end-to-end error", "per-step mean |error|",
              "p50", "p90", "max", "ops matched", "verdict")
    rows = []
    for name, policy in result.policies.items():
        stats = policy.comparison.step_stats
        cells = (name, f"{policy.measured_tokens_per_s:.1f}", f"{policy.predicted_tokens_per_s:.1f}",
                 f"{policy.comparison.e2e_error:+.2%}", f"{stats.mean_abs:.2%}", f"{stats.p50:.2%}",
                 f"{stats.p90:.2%}", f"{stats.max:.2%}", str(policy.comparison.matched),
                 "pass" if not policy.failures else "FAIL")
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def build_html(result, *, overlay_passes: int = 6) -> str:
    """Return one self-contained HTML page (plotly.js inline, so it opens offline)."""
    parts = []
    include = True
    for name, policy in result.policies.items():
        figure = overlay_figure(policy.measured, policy.predicted, passes=overlay_passes,
                                title=f"{name}: first {overlay_passes} passes, measured above predicted")
        parts.append(figure.to_html(full_html=False, include_plotlyjs=include))
        include = False
    parts.append(step_error_figure(result).to_html(full_html=False, include_plotlyjs=False))
    parts.append(kind_error_figure(result).to_html(full_html=False, include_plotlyjs=False))
    verdict = "passed" if result.passed else "failed"
    failures = "".join(f"<li>{html.escape(f)}</li>" for f in result.failures) or "<li>none</li>"
    ranking = ""
    if result.ranking is not None:
        ranking = (f"<p>Ranking by measured throughput: {html.escape(' > '.join(result.ranking.measured_order))}"
                   f"<br>Ranking by predicted throughput: {html.escape(' > '.join(result.ranking.predicted_order))}"
                   "</p>")
    style = ("body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>validation: {html.escape(result.profile_name)}"
            f"</title><style>{style}</style></head><body>"
            f"<h1>Simulator against executor: {verdict}</h1>"
            f"<p>Profile {html.escape(result.profile_name)}, device {html.escape(result.device)}, "
            f"{result.threads} thread(s), {result.settings.repeats} repeat(s) per policy.</p>"
            f"{_summary_table(result)}<h2>Failures</h2><ul>{failures}</ul>{ranking}"
            + "".join(parts) + "</body></html>")
