"""The planner: choose each MoE layer's slot budget and refresh interval τ by mixed-integer programming.

``plan(spec, profile, gpu_memory_bytes, trace)`` prices every (slot budget, τ) pair of a
grid for every MoE layer by replaying the ``tide`` policy over the trace
(``tide.planner.stats``). It then solves the program of ``tide.planner.formulation``
with PuLP, and prices the chosen plan exactly by lowering the whole trace
(``tide.planner.predict``). ``tide.planner.oracle`` bounds the copy-plus-CPU cost that
any policy with the same slot budgets could reach. ``docs/planner.md`` states the
formulation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tide import __version__
from tide.errors import InputError
from tide.hardware import HardwareProfile, load_profile
from tide.ir import Plan
from tide.memory import MemoryBudget, plan_memory
from tide.planner.formulation import CandidateCosts, Choice, solve_choice
from tide.planner.predict import Prediction, predict
from tide.planner.pricing import PassCosts, Pricing
from tide.planner.solvers import SOLVERS, check_solver
from tide.planner.stats import LayerPricer, candidate_intervals, refresh_flags, routing_counts
from tide.policies import make_plan
from tide.trace import Trace, check_trace_matches_spec
from tide.units import format_bytes

logger = logging.getLogger(__name__)

__all__ = ["PlanResult", "SOLVERS", "budget_grid", "expert_pool_slots", "plan", "plan_for_pool", "planning_trace",
           "price_candidates"]

# Generated tokens of the synthetic trace used when the caller gives no trace.
DEFAULT_GEN_TOKENS = 256


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan, its exact prediction and how the program got there."""

    plan: Plan
    prediction: Prediction
    choice: Choice | None  # None when every expert fits and no program was solved
    candidates: CandidateCosts | None
    memory: MemoryBudget | None  # None when the caller gave the slot pool directly
    pool_slots: int
    timings_s: dict[str, float]


def expert_pool_slots(spec, profile: HardwareProfile, gpu_memory_bytes: int, **memory_options) -> tuple[MemoryBudget, int]:
    """Return the memory budget and the number of expert slots in its pool, over all MoE layers.

    Raises InputError when the budget leaves no room for a single expert.
    """
    memory = plan_memory(spec, gpu_memory_bytes, device_memory_bytes=int(profile.gpu.memory_bytes),
                         **memory_options)
    expert_bytes = spec.expert_bytes()
    pool_slots = max(memory.expert_pool_bytes, 0) // expert_bytes
    if pool_slots < 1:
        raise InputError(
            f"GPU memory budget {format_bytes(gpu_memory_bytes)} leaves {format_bytes(memory.expert_pool_bytes)} "
            f"for expert slots after the non-expert weights, KV cache, activations and reserve, less than one "
            f"expert of model '{spec.name}' ({format_bytes(expert_bytes)})", field="gpu_memory",
            value=gpu_memory_bytes, accepted=f"at least {memory.gpu_memory_bytes - memory.expert_pool_bytes + expert_bytes} bytes")
    return memory, int(pool_slots)


def budget_grid(num_experts: int, pool_slots: int, num_layers: int, step: int | None = None) -> np.ndarray:
    """Return the slot budgets the program may give one layer.

    0, every ``step`` slots (every slot up to 64 experts, else num_experts / 32), the
    equal share of the pool, and the largest budget one layer can take, all capped at
    the smaller of the expert count and the pool.
    """
    if step is None:
        step = 1 if num_experts <= 64 else max(1, num_experts // 32)
    if step < 1:
        raise InputError("must be at least 1", field="budget_step", value=step)
    largest = min(num_experts, pool_slots)
    grid = set(range(0, largest + 1, step))
    grid.add(largest)
    grid.add(min(largest, pool_slots // max(num_layers, 1)))
    return np.array(sorted(grid), dtype=np.int64)


def planning_trace(spec, trace: Trace | None, *, gen_tokens: int = DEFAULT_GEN_TOKENS, seed: int = 0) -> Trace:
    """Return ``trace`` after checking it fits ``spec``, or a synthetic one drawn from the spec's statistics."""
    if trace is None:
        from tide.synth import synthesize_trace

        logger.info("no trace given: synthesizing %d tokens for %s (seed %d)", gen_tokens, spec.name, seed)
        return synthesize_trace(spec, gen_tokens=gen_tokens, seed=seed)
    check_trace_matches_spec(trace.metadata, spec)
    if not any(f.committed_tokens for f in trace.forwards):
        raise InputError("the trace commits no tokens, so a plan cannot be priced on it", field="trace",
                         value=trace.num_forwards, accepted="a trace with denoising passes that commit tokens")
    return trace


def price_candidates(spec, trace: Trace, pricing: Pricing, budgets: np.ndarray, *,
                     first_block_rule: str = "every-step", passes: PassCosts | None = None) -> CandidateCosts:
    """Price every (layer, τ, budget) candidate: the layer's time summed over the trace."""
    counts = routing_counts(trace)
    passes = passes if passes is not None else pricing.pass_costs(trace.forwards)
    intervals = candidate_intervals(trace.forwards, first_block_rule)
    flags = [refresh_flags(trace.forwards, interval, first_block_rule) for interval in intervals]
    cost = np.zeros((spec.num_moe_layers, len(intervals), budgets.size))
    for layer in range(spec.num_moe_layers):
        pricer = LayerPricer(counts[:, layer], pricing, passes, budgets)
        for t, state in enumerate(pricer.replay_intervals(flags)):
            cost[layer, t] = state.time_s.sum(axis=0)
    return CandidateCosts(budgets=budgets, intervals=np.array(intervals, dtype=np.int64), cost_s=cost)


def plan(spec, profile: HardwareProfile | str, gpu_memory_bytes: int, trace: Trace | None = None, *,
         solver: str = "cbc", time_limit_s: float | None = 60.0, same_interval: bool = False,
         first_block_rule: str = "every-step", budget_step: int | None = None,
         gen_tokens: int = DEFAULT_GEN_TOKENS, seed: int = 0) -> PlanResult:
    """Choose per-layer slot budgets and intervals for the ``tide`` policy.

    ``trace`` supplies the routing statistics; without one, a synthetic trace of
    ``gen_tokens`` tokens is drawn from the spec's published statistics with ``seed``.
    ``same_interval`` forces one τ for all MoE layers. Raises InputError for bad input
    (a budget too small for one expert, a trace of another model) and SolverError when
    the program is not solved to proven optimality.
    """
    started = time.perf_counter()
    check_solver(solver)
    if isinstance(profile, str):
        profile = load_profile(profile)
    memory, pool_slots = expert_pool_slots(spec, profile, gpu_memory_bytes)
    trace = planning_trace(spec, trace, gen_tokens=gen_tokens, seed=seed)
    provenance = {"gpu_memory_bytes": int(gpu_memory_bytes), "expert_pool_bytes": int(memory.expert_pool_bytes)}
    result = plan_for_pool(spec, profile, trace, pool_slots, solver=solver, time_limit_s=time_limit_s,
                           same_interval=same_interval, first_block_rule=first_block_rule,
                           budget_step=budget_step, provenance=provenance)
    result.timings_s["total_s"] = time.perf_counter() - started
    return dataclasses.replace(result, memory=memory)


def plan_for_pool(spec, profile: HardwareProfile, trace: Trace, pool_slots: int, *, solver: str = "cbc",
                  time_limit_s: float | None = 60.0, same_interval: bool = False,
                  first_block_rule: str = "every-step", budget_step: int | None = None,
                  pricing: Pricing | None = None, provenance: dict[str, Any] | None = None) -> PlanResult:
    """Choose budgets and intervals for a pool of ``pool_slots`` expert slots over all MoE layers.

    ``plan`` derives the pool from a GPU memory budget; this entry point takes it as given.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_solver(solver)
    if profile.shared_cores:
        raise NotImplementedError(f"planning for profile '{profile.name}', whose GPU and CPU lanes share cores: "
                                  "the planner's layer times assume the two lanes overlap")
    if pool_slots < 1:
        raise InputError("the slot pool must hold at least one expert", field="pool_slots", value=pool_slots)
    check_trace_matches_spec(trace.metadata, spec)
    pricing = pricing or Pricing(spec, profile)
    provenance = {
        "planner": f"tide {__version__}",
        "hardware": profile.name,
        **(provenance or {}),
        "pool_slots": int(pool_slots),
        "trace": {"spec_name": trace.metadata.spec_name, "source": trace.metadata.source,
                  "num_forwards": trace.num_forwards},
    }

    if pool_slots >= spec.num_moe_layers * spec.num_experts:
        logger.info("every expert fits in the %d-slot pool: planning all-gpu", pool_slots)
        chosen = make_plan("all-gpu", spec, first_block_rule=first_block_rule,
                           provenance={**provenance, "reason": "every expert fits in the slot pool"})
        prediction = predict(spec, chosen, trace, pricing=pricing)
        timings["total_s"] = time.perf_counter() - started
        return PlanResult(_with_prediction(chosen, prediction, None), prediction, None, None, None, pool_slots,
                          timings)

    budgets = budget_grid(spec.num_experts, pool_slots, spec.num_moe_layers, budget_step)
    phase = time.perf_counter()
    passes = pricing.pass_costs(trace.forwards)
    candidates = price_candidates(spec, trace, pricing, budgets, first_block_rule=first_block_rule,
                                  passes=passes)
    timings["pricing_s"] = time.perf_counter() - phase

    phase = time.perf_counter()
    choice = solve_choice(candidates, pool_slots, same_interval=same_interval, solver=solver,
                          time_limit_s=time_limit_s)
    timings["solve_s"] = time.perf_counter() - phase

    # Price the chosen plan exactly, by lowering the whole trace.
    phase = time.perf_counter()
    chosen = Plan(policy="tide", slot_budgets=choice.slot_budgets, intervals=choice.intervals,
                  miss_service=("cpu",) * spec.num_moe_layers, first_block_rule=first_block_rule,
                  spec_name=spec.name, spec_hash=spec.config_hash)
    prediction = predict(spec, chosen, trace, pricing=pricing)
    timings["predict_s"] = time.perf_counter() - phase
    timings["total_s"] = time.perf_counter() - started

    program_total_s = choice.objective_s + float(passes.outside_moe_s.sum())
    if abs(program_total_s - prediction.total_s) > 0.005 * prediction.total_s:
        logger.warning("the program's time (%.6g s) and the lowered plan's (%.6g s) differ by more than 0.5%%",
                       program_total_s, prediction.total_s)
    provenance.update({
        "solver": solver,
        "solver_status": choice.outcome.status,
        "proven_optimal": choice.outcome.proven_optimal,
        "solve_time_s": choice.outcome.solve_time_s,
        "time_limit_s": time_limit_s,
        "same_interval": same_interval,
        "num_variables": choice.num_variables,
        "num_constraints": choice.num_constraints,
        "budget_grid": [int(b) for b in budgets],
        "interval_candidates": [int(t) for t in candidates.intervals],
        "program_total_s": program_total_s,
        "timings_s": dict(timings),
    })
    chosen = _with_prediction(dataclasses.replace(chosen, provenance=provenance), prediction, choice)
    return PlanResult(chosen, prediction, choice, candidates, None, pool_slots, timings)


def _with_prediction(chosen: Plan, prediction: Prediction, choice: Choice | None) -> Plan:
    predicted = prediction.to_json()
    if choice is not None:
        predicted["program_objective_s"] = choice.objective_s
    return dataclasses.replace(chosen, predicted=predicted)
