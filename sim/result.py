"""Simulation results: throughput, times per pass and block, hits, traffic, lanes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from sim.engine import NS_PER_S, EngineRun, critical_path
from tide.ir import LANES, Span, Timeline


@dataclass(frozen=True)
class SimResult:
    """The outcome of one simulated run. Times are seconds unless the name says otherwise.

    ``critical_path_s`` splits the run's time by the lane of the ops on each pass's
    critical path, so its values sum to ``total_s``. ``critical_lane`` is the lane with the
    largest share. ``forward_breakdown_s[i]`` splits pass i's time by op kind the same way.
    ``lane_busy_fraction`` is busy time over ``total_s``.
    """

    total_s: float
    total_ns: int
    tokens: int  # returned tokens (see tide.trace.Trace.output_tokens), else committed tokens of all passes
    tokens_per_s: float
    num_forwards: int
    num_ops: int
    forward_times_s: list[float]
    block_times_s: list[float]
    hit_rate: float
    hits: int
    misses: int
    expert_copies: int
    h2d_bytes: float
    d2h_bytes: float
    lane_busy_s: dict[str, float]
    lane_busy_fraction: dict[str, float]
    critical_lane: str
    critical_path_s: dict[str, float]
    forward_breakdown_s: list[dict[str, float]]
    timeline: Timeline | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean_forward_s(self) -> float:
        return self.total_s / self.num_forwards if self.num_forwards else 0.0

    @property
    def mean_block_s(self) -> float:
        return sum(self.block_times_s) / len(self.block_times_s) if self.block_times_s else 0.0

    def to_json(self, *, per_forward: bool = True) -> dict[str, Any]:
        """Return the figures as a JSON-ready dict; ``per_forward`` adds the per-pass and
        per-block lists. The timeline is left out (``tide.ir.save_timeline`` writes it)."""
        data: dict[str, Any] = {
            "total_s": self.total_s,
            "total_ns": self.total_ns,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "num_forwards": self.num_forwards,
            "num_ops": self.num_ops,
            "mean_forward_s": self.mean_forward_s,
            "num_blocks": len(self.block_times_s),
            "mean_block_s": self.mean_block_s,
            "hit_rate": self.hit_rate,
            "hits": self.hits,
            "misses": self.misses,
            "expert_copies": self.expert_copies,
            "h2d_bytes": self.h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "lane_busy_s": dict(self.lane_busy_s),
            "lane_busy_fraction": dict(self.lane_busy_fraction),
            "critical_lane": self.critical_lane,
            "critical_path_s": dict(self.critical_path_s),
            "metadata": dict(self.metadata),
        }
        if per_forward:
            data["forward_times_s"] = list(self.forward_times_s)
            data["block_times_s"] = list(self.block_times_s)
        return data


def build_result(run: EngineRun, *, record_timeline: bool, metadata: Mapping[str, Any] | None = None,
                 tokens: int | None = None) -> SimResult:
    """Summarise an engine run: counts from the compiled schedules, times from the run.

    ``tokens`` is the count that tokens per second divides; None counts the committed
    tokens of all passes.
    """
    program = run.program
    forwards = program.forwards
    total_ns = run.total_ns
    total_s = total_ns / NS_PER_S

    forward_ns = [end - begin for begin, end in zip(run.pass_begin_ns, run.pass_end_ns)]
    block_ns: dict[tuple[int, int], int] = {}
    for forward, elapsed in zip(forwards, forward_ns):
        if forward.block >= 0:
            key = (forward.sequence, forward.block)
            block_ns[key] = block_ns.get(key, 0) + elapsed

    busy_ns = [0] * len(LANES)
    for lane, duration in zip(program.lane, program.duration_ns):
        busy_ns[lane] += duration

    # Critical path per pass, by lane over the run and by op kind per pass.
    path_ns = [0] * len(LANES)
    breakdown = []
    for path in critical_path(run):
        by_kind: dict[str, int] = {}
        for i in path:
            path_ns[program.lane[i]] += program.duration_ns[i]
            kind = program.ops[i].kind
            by_kind[kind] = by_kind.get(kind, 0) + program.duration_ns[i]
        breakdown.append({kind: ns / NS_PER_S for kind, ns in by_kind.items()})
    critical_lane = LANES[max(range(len(LANES)), key=lambda lane: (path_ns[lane], -lane))] if total_ns else ""

    if tokens is None:
        tokens = sum(f.committed_tokens for f in forwards)
    assignments = program.hits + program.misses
    timeline = _timeline(run, metadata) if record_timeline else None
    return SimResult(
        total_s=total_s,
        total_ns=total_ns,
        tokens=tokens,
        tokens_per_s=tokens / total_s if total_ns else 0.0,
        num_forwards=len(forwards),
        num_ops=len(program.ops),
        forward_times_s=[ns / NS_PER_S for ns in forward_ns],
        block_times_s=[ns / NS_PER_S for ns in block_ns.values()],
        hit_rate=program.hits / assignments if assignments else 0.0,
        hits=program.hits,
        misses=program.misses,
        expert_copies=program.expert_copies,
        h2d_bytes=program.h2d_bytes,
        d2h_bytes=program.d2h_bytes,
        lane_busy_s={lane: busy_ns[i] / NS_PER_S for i, lane in enumerate(LANES)},
        lane_busy_fraction={lane: busy_ns[i] / total_ns if total_ns else 0.0 for i, lane in enumerate(LANES)},
        critical_lane=critical_lane,
        critical_path_s={lane: path_ns[i] / NS_PER_S for i, lane in enumerate(LANES)},
        forward_breakdown_s=breakdown,
        timeline=timeline,
        metadata=dict(metadata or {}),
    )


def _timeline(run: EngineRun, metadata: Mapping[str, Any] | None) -> Timeline:
    program = run.program
    spans = []
    for p, forward in enumerate(program.forwards):
        for i in range(program.pass_start[p], program.pass_start[p + 1]):
            op = program.ops[i]
            spans.append(Span(forward.index, op.id, op.kind, op.lane, run.start_ns[i] / NS_PER_S,
                              run.end_ns[i] / NS_PER_S, op.layer))
    return Timeline(source="simulated", spans=tuple(spans), forwards=tuple(program.forwards),
                    metadata=dict(metadata or {}))
