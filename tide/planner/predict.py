"""Price a whole plan on a trace: lower every forward pass and list-schedule its ops.

Each lane runs its ops in schedule order, and an op starts once its lane is free and its
dependencies have ended. A forward pass ends when its last op ends, and the next pass
starts then. These are the simulator's rules, computed directly instead of as SimPy
events, so the planner can report a chosen plan's tokens per second and cost breakdown
without depending on ``sim``. Op durations are ``CostModel.duration_s`` in float seconds;
the simulator rounds each to whole nanoseconds, which moves a run's total by at most a
nanosecond per op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tide.costs import CostModel
from tide.errors import InputError
from tide.ir import LANES, Plan
from tide.lowering import Lowering
from tide.planner.pricing import Pricing
from tide.trace import Trace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """A plan's predicted run on one trace."""

    total_s: float
    tokens: int  # generated tokens: committed tokens over all passes
    forward_times_s: np.ndarray  # [F]
    lane_busy_s: dict[str, float]
    busy_by_kind_s: dict[str, float]
    hits: int  # assignments served by experts resident before the pass
    misses: int
    expert_copies: int
    h2d_bytes: float
    d2h_bytes: float
    # Per pass and MoE layer: seconds of expert copies plus the per-expert CPU time of
    # misses (the measure the oracle bound is stated in), [F, L].
    copy_cpu_s: np.ndarray = field(repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def breakdown(self) -> dict[str, Any]:
        """Return the cost breakdown as a JSON-ready dict."""
        busy = self.busy_by_kind_s
        expert_gpu = busy.get("gpu_experts", 0.0) + busy.get("gpu_expert", 0.0)
        gpu_other = self.lane_busy_s["gpu"] - expert_gpu
        return {
            "total_s": self.total_s,
            "expert_copy_s": busy.get("expert_copy", 0.0),
            "cpu_expert_s": busy.get("cpu_experts", 0.0),
            "gpu_expert_s": expert_gpu,
            "gpu_other_s": gpu_other,
            "activation_copy_s": busy.get("act_d2h", 0.0) + busy.get("act_h2d", 0.0),
            "lane_busy_s": dict(self.lane_busy_s),
            "lane_busy_fraction": {lane: (s / self.total_s if self.total_s > 0 else 0.0)
                                   for lane, s in self.lane_busy_s.items()},
            "copy_cpu_s": float(self.copy_cpu_s.sum()),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_per_s": self.tokens_per_s,
            "total_s": self.total_s,
            "tokens": self.tokens,
            "num_forwards": int(self.forward_times_s.size),
            "hit_rate": self.hit_rate,
            "hits": self.hits,
            "misses": self.misses,
            "expert_copies": self.expert_copies,
            "h2d_bytes": self.h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "breakdown": self.breakdown(),
        }


def predict(spec, plan: Plan, trace: Trace, *, profile=None, pricing: Pricing | None = None) -> Prediction:
    """List-schedule every forward pass of ``trace`` under ``plan`` with the cost model.

    Pass either a hardware ``profile`` or a ``pricing`` (whose cost model is then used).
    """
    if pricing is None:
        if profile is None:
            raise ValueError("predict needs a profile or a pricing")
        pricing = Pricing(spec, profile)
    cost_model: CostModel = pricing.cost_model
    if cost_model.shared_cores:
        raise NotImplementedError("predicting a plan on a profile whose GPU and CPU lanes share cores "
                                  f"({cost_model.profile.name}): the lanes would not overlap")
    moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}
    num_layers = len(moe_index)
    lowering = Lowering(plan, spec)
    duration = cost_model.duration_s
    forward_times = np.zeros(trace.num_forwards)
    copy_cpu = np.zeros((trace.num_forwards, num_layers))
    lane_busy = {lane: 0.0 for lane in LANES}
    by_kind: dict[str, float] = {}
    hits = misses = copies = 0
    h2d_bytes = d2h_bytes = 0.0
    tokens = 0

    for forward, routing in trace:
        schedule = lowering.lower_forward(forward, routing)
        lane_free = dict.fromkeys(LANES, 0.0)
        end: dict[str, float] = {}
        last = 0.0
        row = forward.index
        for op in schedule.ops:
            start = lane_free[op.lane]
            for dep in op.deps:
                if end[dep] > start:
                    start = end[dep]
            seconds = duration(op)
            finish = start + seconds
            end[op.id] = finish
            lane_free[op.lane] = finish
            last = max(last, finish)
            lane_busy[op.lane] += seconds
            by_kind[op.kind] = by_kind.get(op.kind, 0.0) + seconds
            kind = op.kind
            if kind == "gpu_experts":
                hits += op.tokens
            elif kind in ("gpu_expert", "cpu_experts"):
                misses += op.tokens
            if kind == "expert_copy":
                copies += 1
                copy_cpu[row, moe_index[op.layer]] += seconds
            elif kind == "cpu_experts":
                counts = np.fromiter((n for _, n in op.experts), dtype=np.int64, count=len(op.experts))
                copy_cpu[row, moe_index[op.layer]] += float(pricing.cpu_marginal_s(counts).sum())
            if op.lane == "h2d":
                h2d_bytes += op.bytes
            elif op.lane == "d2h":
                d2h_bytes += op.bytes
        forward_times[row] = last
        tokens += forward.committed_tokens

    total = float(forward_times.sum())
    if tokens == 0:
        raise InputError("the trace commits no tokens, so it has no throughput", field="trace",
                         value=trace.num_forwards, accepted="a trace with denoising passes that commit tokens")
    # Tokens per second divides the returned tokens, as the simulator and the executor do.
    tokens = trace.output_tokens() or tokens
    return Prediction(total_s=total, tokens=tokens, forward_times_s=forward_times, lane_busy_s=lane_busy,
                      busy_by_kind_s=by_kind, hits=int(hits), misses=int(misses), expert_copies=copies,
                      h2d_bytes=h2d_bytes, d2h_bytes=d2h_bytes, copy_cpu_s=copy_cpu)
