"""The cost model: how long one op of a schedule takes on a hardware profile.

Each op kind gets a duration function, built once per ``CostModel`` so that the
simulator's many calls do no dictionary walks or allocations beyond the lookup by kind.

Where the profile has a calibration table for the op kind, the table decides:

* between measured points, linear interpolation;
* past the largest measured x, linear growth with the slope of the last two points, so
  predictions keep growing outside the profiled range instead of flattening;
* below the smallest measured x, linear interpolation from the op's fixed cost at x = 0
  (the lane's op overhead, plus the link latency for copies) to the first point.

A table's x is tokens per expert for expert kinds (``gpu_experts``, ``gpu_expert``,
``cpu_experts``), tokens x context for ``attention``, bytes for copies and tokens for the
rest (``tide.hardware.TABLE_X_NAMES``). A table point of an expert kind is the duration
of an op with one expert, so an op with several experts costs its fixed cost plus, per
expert, the table value for that expert's tokens minus the fixed cost.

Without a table, the roofline of the profile's datasheet figures decides:

* GPU ops: op overhead + max(flops / (peak x gemm_flops), bytes / (hbm x hbm));
* copies (``expert_copy`` and ``act_h2d`` host-to-device, ``act_d2h`` device-to-host):
  op overhead + link latency + bytes / bandwidth, pinned bandwidth unless the model is
  built with ``pinned=False``;
* ``cpu_experts``: op overhead + the sum over its experts of
  max(flops_e / (cpu flops x cpu_flops), bytes_e / (cpu memory bandwidth x cpu_memory)).
  The op carries totals. ``flops_e`` is the op's FLOPs split by the expert's share of the
  op's tokens, because FLOPs grow with tokens. ``bytes_e`` is the op's bytes split evenly,
  because each expert's weights, which dominate the bytes, are read once however many
  tokens it has.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable

from tide.errors import InputError
from tide.hardware import COPY_KINDS, EXPERT_KINDS, CalibrationTable, HardwareProfile
from tide.ir import OP_LANES, Op

DurationFunction = Callable[[Op], float]


class CostModel:
    """Durations of ops on one hardware profile.

    ``duration_s(op)`` is a deterministic function of the profile, the constructor
    options and the op. ``dtype_bytes`` is the element size that the schedule's byte
    counts assume (2 for bf16). It does not change any duration, because ops carry their
    own byte counts. Callers can compare it with the model spec's element size.
    """

    def __init__(self, profile: HardwareProfile, *, dtype_bytes: int = 2, pinned: bool = True) -> None:
        if dtype_bytes not in (1, 2, 4):
            raise InputError("invalid element size", field="dtype_bytes", value=dtype_bytes, accepted="1, 2 or 4")
        self.profile = profile
        self.dtype_bytes = dtype_bytes
        self.pinned = pinned
        self._functions: dict[str, DurationFunction] = {}
        for kind in OP_LANES:
            table = profile.tables.get(kind)
            if table is not None:
                self._functions[kind] = self._table_function(kind, table)
            else:
                self._functions[kind] = self._roofline_function(kind)

    @property
    def shared_cores(self) -> bool:
        """Whether the ``gpu`` and ``cpu`` lanes share cores, so a simulator must not
        overlap their ops."""
        return self.profile.shared_cores

    def lane_of(self, op: Op) -> str:
        """Return the lane that runs ops of this op's kind."""
        lane = OP_LANES.get(op.kind)
        if lane is None:
            raise _unknown_kind(op)
        return lane

    def duration_s(self, op: Op) -> float:
        """Return the predicted duration of ``op`` in seconds."""
        function = self._functions.get(op.kind)
        if function is None:
            raise _unknown_kind(op)
        return function(op)

    # --- roofline -------------------------------------------------------------------

    def _roofline_function(self, kind: str) -> DurationFunction:
        profile = self.profile
        overhead = float(profile.op_overhead_s[OP_LANES[kind]])
        efficiency = profile.efficiency

        if kind in COPY_KINDS:
            link = profile.link
            if OP_LANES[kind] == "h2d":
                bandwidth = link.h2d_pinned_bytes_per_s if self.pinned else link.h2d_pageable_bytes_per_s
            else:
                bandwidth = link.d2h_pinned_bytes_per_s if self.pinned else link.d2h_pageable_bytes_per_s
            fixed = overhead + link.latency_s

            def copy_duration(op: Op) -> float:
                return fixed + op.bytes / bandwidth

            return copy_duration

        if kind == "cpu_experts":
            cpu_flops = profile.cpu.expert_flops * efficiency["cpu_flops"]
            cpu_bytes_per_s = profile.cpu.memory_bytes_per_s * efficiency["cpu_memory"]

            def cpu_experts_duration(op: Op) -> float:
                experts = op.experts
                if not experts:
                    return overhead + max(op.flops / cpu_flops, op.bytes / cpu_bytes_per_s)
                total_tokens = 0
                for _, tokens in experts:
                    total_tokens += tokens
                memory_s = op.bytes / len(experts) / cpu_bytes_per_s
                if total_tokens == 0:
                    return overhead + len(experts) * max(op.flops / len(experts) / cpu_flops, memory_s)
                seconds_per_token = op.flops / total_tokens / cpu_flops
                total = overhead
                for _, tokens in experts:
                    compute_s = tokens * seconds_per_token
                    total += compute_s if compute_s > memory_s else memory_s
                return total

            return cpu_experts_duration

        gpu_flops = profile.gpu.bf16_dense_flops * efficiency["gemm_flops"]
        hbm_bytes_per_s = profile.gpu.hbm_bytes_per_s * efficiency["hbm"]

        def gpu_duration(op: Op) -> float:
            compute_s = op.flops / gpu_flops
            memory_s = op.bytes / hbm_bytes_per_s
            return overhead + (compute_s if compute_s > memory_s else memory_s)

        return gpu_duration

    # --- calibration tables ---------------------------------------------------------

    def _table_function(self, kind: str, table: CalibrationTable) -> DurationFunction:
        fixed = self.profile.fixed_cost_s(kind)
        lookup = _table_lookup(table, fixed)

        if kind in EXPERT_KINDS:

            def experts_duration(op: Op) -> float:
                experts = op.experts
                if not experts:
                    # An expert op without a per-expert list: one expert with all its tokens.
                    return lookup(op.tokens) if op.tokens > 0 else fixed
                total = fixed
                for _, tokens in experts:
                    total += lookup(tokens) - fixed
                return total

            return experts_duration

        if kind == "attention":
            return lambda op: lookup(op.tokens * op.context)
        if kind in COPY_KINDS:
            return lambda op: lookup(op.bytes)
        return lambda op: lookup(op.tokens)


def _table_lookup(table: CalibrationTable, fixed_s: float) -> Callable[[float], float]:
    """Build a piecewise linear function through (0, fixed_s) and the table's points,
    extended past the last point with the slope of the last two."""
    xs = table.x
    seconds = table.seconds
    slopes = tuple((seconds[i + 1] - seconds[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1))
    first_x, first_s = xs[0], seconds[0]
    last_x, last_s, last_slope = xs[-1], seconds[-1], slopes[-1]
    first_slope = (first_s - fixed_s) / first_x

    def lookup(x: float) -> float:
        if x <= first_x:
            return fixed_s + first_slope * x
        if x >= last_x:
            return last_s + last_slope * (x - last_x)
        i = bisect_right(xs, x) - 1
        return seconds[i] + slopes[i] * (x - xs[i])

    return lookup


def _unknown_kind(op: Op) -> InputError:
    return InputError("unknown op kind", field=f"op {op.id!r} kind", value=op.kind, accepted=", ".join(OP_LANES))
