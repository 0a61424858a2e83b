"""Replay: lower a trace under a plan and run its schedules on the SimPy model."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

from sim.engine import DurationModel, Engine, compile_schedules, duration_ns
from sim.result import SimResult, build_result
from tide.costs import CostModel
from tide.ir import Op, Plan, Schedule
from tide.lowering import Lowering
from tide.policies import check_plan_matches_spec
from tide.trace import Trace, check_trace_matches_spec

logger = logging.getLogger(__name__)


def simulate_schedules(schedules: Iterable[Schedule], cost_model: DurationModel, *,
                       initial_slots: Mapping[int, Sequence[int]] | None = None, record_timeline: bool = True,
                       shared_cores: bool = False, metadata: Mapping[str, Any] | None = None) -> SimResult:
    """Run hand-built (or already lowered) schedules, one pass after another.

    ``cost_model`` is any object with ``duration_s(op)``. ``initial_slots`` maps a decoder
    layer to the experts in its slots at the start (-1 for empty); see
    ``sim.engine.SlotTracker`` for what it enables.
    """
    program = compile_schedules(schedules, cost_model, initial_slots=initial_slots)
    run = Engine(program, shared_cores=shared_cores).run()
    return build_result(run, record_timeline=record_timeline, metadata=metadata)


def simulate(spec, profile, plan: Plan, trace: Trace, *, record_timeline: bool = False,
             progress: bool = False) -> SimResult:
    """Replay ``trace`` under ``plan`` on hardware ``profile`` and return the simulated run.

    The schedules come from ``tide.lowering.Lowering``, the same code the executor runs,
    and the durations from ``tide.costs.CostModel(profile)``. Raises InputError before
    simulating when the trace or the plan was made for a model of another shape.
    """
    check_trace_matches_spec(trace.metadata, spec, source="trace")
    check_plan_matches_spec(plan, spec, source="plan")
    cost_model = CostModel(profile, dtype_bytes=spec.dtype_bytes)
    lowering = Lowering(plan, spec)
    # The policy's state before the first pass: what each MoE layer's slots hold at load time.
    initial_slots = {layer: list(lowering.state.layers[i].slots) for i, layer in enumerate(spec.moe_layers)}

    # The run allocates hundreds of thousands of ops, events and tuples that all live until
    # it ends, so the cyclic garbage collector's passes over them would cost time and free
    # nothing.
    collecting = gc.isenabled()
    gc.disable()
    try:
        began = time.perf_counter()
        schedules = _lowered(lowering, trace, progress)
        program = compile_schedules(schedules, cost_model, initial_slots=initial_slots,
                                    duration_function=_cached_durations(cost_model))
        lowered_s = time.perf_counter() - began
        run = Engine(program, shared_cores=profile.shared_cores).run()
        simulated_s = time.perf_counter() - began - lowered_s
        metadata = {
            "policy": plan.policy,
            "spec": spec.name,
            "hardware": profile.name,
            "slot_budgets": sorted(set(plan.slot_budgets)),
            "intervals": sorted(set(plan.intervals)),
            "trace_source": trace.metadata.source,
        }
        result = build_result(run, record_timeline=record_timeline, metadata=metadata,
                              tokens=trace.output_tokens())
        summarised_s = time.perf_counter() - began - lowered_s - simulated_s
        num_forwards, num_ops = len(program.forwards), len(program.ops)
        # Free the ops while the collector is off, or its first pass after it is back on
        # would walk every one of them.
        del run, program
    finally:
        if collecting:
            gc.enable()
    logger.info("replayed %d forward passes, %d ops in %.2f s of wall time: lowering and compiling %.2f s, "
                "simulation %.2f s, summary %.2f s", num_forwards, num_ops,
                lowered_s + simulated_s + summarised_s, lowered_s, simulated_s, summarised_s)
    return result


def _lowered(lowering: Lowering, trace: Trace, progress: bool) -> Iterator[Schedule]:
    from tide.cli.common import progress as progress_bar

    with progress_bar(trace.num_forwards, "lowering and compiling", unit="pass", disable=not progress) as bar:
        for forward, routing in trace:
            yield lowering.lower_forward(forward, routing)
            bar.update(1)


def _cached_durations(cost_model: CostModel):
    """Return op -> duration in ns, cached for ops with at most one expert.

    The cache assumes what ``tide.costs.CostModel`` does: an op's cost depends on its kind
    and sizes (tokens, context, FLOPs, bytes, tokens per expert), not on its id,
    dependencies, layer, slot or expert ids. Ops of one kind and size repeat across layers
    and passes. Ops with several experts list per-expert tokens that rarely repeat, so
    caching them would cost more than it saves.
    """
    cache: dict[tuple, int] = {}
    duration_s = cost_model.duration_s

    def duration(op: Op) -> int:
        experts = op.experts
        if len(experts) > 1:
            return duration_ns(duration_s(op), op)
        key = (op.kind, op.tokens, op.context, op.flops, op.bytes, experts[0][1] if experts else -1)
        value = cache.get(key)
        if value is None:
            value = cache[key] = duration_ns(duration_s(op), op)
        return value

    return duration
