"""Plotly figures of a sweep (``tide.sweep``): throughput and tide's speedup against GPU memory."""

from __future__ import annotations

import math
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from tide.ir import POLICY_NAMES
from tide.sweep import BASELINES


def _grid_axes(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[str]]:
    models = list(dict.fromkeys(row["model"] for row in rows))
    hardware = list(dict.fromkeys(row["hardware"] for row in rows))
    return models, hardware


def throughput_figure(rows: Sequence[dict[str, Any]]):
    """Tokens per second against GPU memory, one panel per (model, GPU), one line per policy."""
    ran = [row for row in rows if row["status"] == "ok"]
    models, hardware = _grid_axes(ran or rows)
    figure = make_subplots(rows=max(len(models), 1), cols=max(len(hardware), 1), shared_xaxes=False,
                           subplot_titles=[f"{model} on {gpu}" for model in models for gpu in hardware],
                           vertical_spacing=0.12, horizontal_spacing=0.06)
    policies = [name for name in POLICY_NAMES if any(row["policy"] == name for row in ran)]
    colors = {name: qualitative.Plotly[i % len(qualitative.Plotly)] for i, name in enumerate(policies)}
    for r, model in enumerate(models, start=1):
        for c, gpu in enumerate(hardware, start=1):
            for policy in policies:
                points = sorted((row["gpu_memory_gib"], row["tokens_per_s"], row["hit_rate"]) for row in ran
                                if (row["model"], row["hardware"], row["policy"]) == (model, gpu, policy))
                if not points:
                    continue
                figure.add_trace(go.Scatter(
                    x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=policy,
                    legendgroup=policy, showlegend=policy not in _shown(figure),
                    line={"color": colors[policy], "width": 3 if policy == "tide" else 1.5},
                    customdata=[[p[2]] for p in points],
                    hovertemplate=f"{policy}<br>%{{x:.4g}} GiB: %{{y:.4g}} tokens/s<br>hit rate %{{customdata[0]:.3f}}"
                                  "<extra></extra>"), row=r, col=c)
            figure.update_xaxes(title_text="GPU memory (GiB)", row=r, col=c)
            figure.update_yaxes(title_text="tokens/s", rangemode="tozero", row=r, col=c)
    figure.update_layout(title="Simulated throughput against GPU memory", height=320 * max(len(models), 1) + 80,
                         template="plotly_white")
    return figure


def speedup_figure(speedups: Sequence[dict[str, Any]]):
    """Tide's speedup over each baseline and the best one against GPU memory, one panel per (model, GPU)."""
    models, hardware = _grid_axes(speedups)
    figure = make_subplots(rows=max(len(models), 1), cols=max(len(hardware), 1),
                           subplot_titles=[f"{model} on {gpu}" for model in models for gpu in hardware],
                           vertical_spacing=0.12, horizontal_spacing=0.06)
    series = [("speedup_over_best", "best baseline")] + [(f"speedup_over_{name}", name) for name in BASELINES]
    colors = {label: qualitative.Plotly[i % len(qualitative.Plotly)] for i, (_, label) in enumerate(series)}
    for r, model in enumerate(models, start=1):
        for c, gpu in enumerate(hardware, start=1):
            group = sorted((row for row in speedups if (row["model"], row["hardware"]) == (model, gpu)),
                           key=lambda row: row["gpu_memory_bytes"])
            for column, label in series:
                points = [(row["gpu_memory_gib"], row[column], row["best_baseline"]) for row in group
                          if row[column] is not None and math.isfinite(row[column])]
                if not points:
                    continue
                figure.add_trace(go.Scatter(
                    x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers", name=f"over {label}",
                    legendgroup=label, showlegend=label not in _shown(figure),
                    line={"color": colors[label], "width": 3 if label == "best baseline" else 1.5,
                          "dash": "solid" if label == "best baseline" else "dot"},
                    customdata=[[p[2]] for p in points],
                    hovertemplate=f"over {label}<br>%{{x:.4g}} GiB: %{{y:.3f}}x<br>best baseline %{{customdata[0]}}"
                                  "<extra></extra>"), row=r, col=c)
            figure.add_hline(y=1.0, line={"color": "grey", "width": 1}, row=r, col=c)
            figure.update_xaxes(title_text="GPU memory (GiB)", row=r, col=c)
            figure.update_yaxes(title_text="tide speedup (x)", row=r, col=c)
    figure.update_layout(title="Simulated speedup of tide over the offloading baselines",
                         height=320 * max(len(models), 1) + 80, template="plotly_white")
    return figure


def _shown(figure) -> set[str]:
    """Legend groups that already have a legend entry."""
    return {trace.legendgroup for trace in figure.data if trace.showlegend is not False}
