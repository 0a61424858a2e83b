"""The oracle bound: the least copy-plus-CPU cost any policy could pay on a trace with given slot budgets.

Cost measure, per MoE layer: the duration of every expert copy plus, for every
(expert, pass) served on the CPU, that expert's marginal CPU time for its tokens
(``Pricing.cpu_marginal_s``: the ``cpu_experts`` op's time without its fixed part).
Overlap and the GPU's own expert work are left out, so this measures the I/O and CPU
work a placement causes, not wall time.

The program (``docs/planner.md`` gives the proof that it is a lower bound) uses the
interval form of offline caching. For expert e with active passes q_1 < ... < q_r in a
segment of the trace:

* ``s[e, j]`` in [0, 1]: e is served on the GPU in pass q_j, which costs a copy
  unless e was kept since its previous use;
* ``k[e, j]`` in [0, 1]: e stays in a slot from its previous use q_{j-1} until q_j, or,
  for j = 1, from the start of the segment until q_1 (at no cost);
* k[e, j] <= s[e, j] and k[e, j] <= s[e, j - 1]: only an expert that was on the GPU in
  both passes can have stayed in between;
* at every boundary between two passes, and at the segment start, the experts kept
  across it number at most B;
* cost: sum over (e, j) of copy x (s[e, j] - k[e, j]) + cpu[e, q_j] x (1 - s[e, j]).

The run starts with empty slots, as every policy's state does except the hot sets of
``static`` and ``all-gpu``, which are loaded before the first pass (count those loads as
copies to compare them with the bound). So a segment that starts at the first pass of the
trace has no k[e, 1] from its start. Any other segment may start with any B experts
resident.

Any policy maps to a feasible point of this program whose cost is at most what the
policy pays, so the minimum, and a fortiori the LP relaxation's minimum, is a lower
bound. Layers are independent; a trace is split into segments either not at all
(``window="trace"``) or per block (``window="block"``). Splitting lets each segment start
from a free resident set, which only lowers the bound, so it stays valid.

The LP relaxation is solved first, and its value is the reported bound. When its
solution is integral it is also the program's optimum and gives the placements;
otherwise the MILP is solved for integral placements only, because a MILP solver stops
within a relative gap (HiGHS: 1e-4 by default) and its value need not be a bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pulp

from tide.errors import InputError, SolverError
from tide.ir import Plan
from tide.planner.predict import predict
from tide.planner.pricing import Pricing
from tide.planner.solvers import check_solver, new_variable, solve
from tide.planner.stats import routing_counts
from tide.policies import make_plan
from tide.trace import Trace, check_trace_matches_spec

logger = logging.getLogger(__name__)

WINDOWS = ("trace", "block")
# Above this many variables, independent (layer, segment) programs go into separate solves.
MAX_VARIABLES_PER_SOLVE = 10_000
INTEGRALITY_TOLERANCE = 1e-6
# An LP solver stops once its primal and dual residuals are within about 1e-7 (the CBC and
# HiGHS defaults). The value of its primal solution can exceed the true minimum by that
# much, so the reported bound is lowered by this fraction of itself.
BOUND_RELATIVE_MARGIN = 1e-6


@dataclass(frozen=True)
class OracleResult:
    """The bound, the placements that reach it, and how they were found."""

    bound_s: float  # lower bound on copy-plus-CPU seconds over the covered passes
    layer_bound_s: np.ndarray  # [L]
    placements: dict[int, tuple[tuple[int, ...], ...]]  # forward index -> resident experts per MoE layer
    slot_budgets: tuple[int, ...]
    covered: tuple[int, int]  # forward passes [start, stop) the bound covers
    window: str
    integral: bool  # whether the LP relaxation's solution was integral, so the placements reach the bound
    placements_optimal: bool  # False when a MILP for placements stopped at its time limit
    num_programs: int
    num_variables: int
    solve_time_s: float
    build_time_s: float
    solver: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bound_s": self.bound_s,
            "layer_bound_s": [float(v) for v in self.layer_bound_s],
            "covered_forwards": list(self.covered),
            "window": self.window,
            "lp_integral": self.integral,
            "placements_optimal": self.placements_optimal,
            "num_programs": self.num_programs,
            "num_variables": self.num_variables,
            "solve_time_s": self.solve_time_s,
            "build_time_s": self.build_time_s,
            "solver": self.solver,
            **self.details,
        }


def segments(trace: Trace, window: str, covered: tuple[int, int]) -> list[tuple[int, int]]:
    """Split the covered passes into [start, stop) segments: one, or one per (sequence, block)."""
    if window not in WINDOWS:
        raise InputError("unknown oracle window", field="window", value=window, accepted=", ".join(WINDOWS))
    start, stop = covered
    if window == "trace":
        return [(start, stop)]
    parts = []
    begin = start
    for index in range(start + 1, stop):
        previous, current = trace.forwards[index - 1], trace.forwards[index]
        if (previous.sequence, previous.block, previous.kind == "prefill") != (current.sequence, current.block,
                                                                               current.kind == "prefill"):
            parts.append((begin, index))
            begin = index
    parts.append((begin, stop))
    return parts


def forwards_of_blocks(trace: Trace, num_blocks: int) -> tuple[int, int]:
    """Return the passes [0, stop) up to the end of the first ``num_blocks`` generated blocks."""
    if num_blocks < 1:
        raise InputError("must be at least 1", field="oracle_blocks", value=num_blocks)
    blocks_seen: list[tuple[int, int]] = []
    for forward in trace.forwards:
        if forward.kind == "prefill":
            continue
        key = (forward.sequence, forward.block)
        if key not in blocks_seen:
            if len(blocks_seen) == num_blocks:
                return (0, forward.index)
            blocks_seen.append(key)
    return (0, trace.num_forwards)


class _Program:
    """The interval-form program of one (layer, segment), as PuLP variables and expressions.

    Expressions and constraints are built from (variable, coefficient) lists, not with
    PuLP's operators, which cost several times more on programs of this size.
    """

    def __init__(self, problem: pulp.LpProblem, name: str, counts: np.ndarray, cpu_s: np.ndarray,
                 copy_s: float, budget: int, free_start: bool) -> None:
        self.counts = counts  # [m, E] tokens per expert in the segment's passes
        self.budget = budget
        num_passes = counts.shape[0]
        self.occurrences: dict[int, np.ndarray] = {}
        self.served: dict[int, list[pulp.LpVariable]] = {}
        self.kept: dict[int, list[pulp.LpVariable | None]] = {}
        boundary_terms: list[list[pulp.LpVariable]] = [[] for _ in range(num_passes)]  # boundary b: before pass b
        cost_terms: list[tuple[pulp.LpVariable, float]] = []
        constant = 0.0
        less_equal = pulp.LpConstraintLE
        for expert in np.flatnonzero(counts.any(axis=0)).tolist():
            passes = np.flatnonzero(counts[:, expert]).tolist()
            self.occurrences[expert] = np.array(passes)
            served = [new_variable(problem, f"{name}_s_{expert}_{j}", 0, 1) for j in range(len(passes))]
            # kept[j]: in a slot from use j - 1 (from the segment start for j = 0) until use j.
            kept: list[pulp.LpVariable | None] = [
                new_variable(problem, f"{name}_k_{expert}_{j}", 0, 1) if j > 0 or free_start else None
                for j in range(len(passes))]
            self.served[expert] = served
            self.kept[expert] = kept
            for j, pass_index in enumerate(passes):
                cpu = float(cpu_s[pass_index, expert])
                constant += cpu
                cost_terms.append((served[j], copy_s - cpu))
                if kept[j] is None:
                    continue
                cost_terms.append((kept[j], -copy_s))
                problem.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(kept[j], 1.0), (served[j], -1.0)]),
                                                        less_equal, f"{name}_kin_{expert}_{j}", 0.0))
                if j > 0:
                    problem.addConstraint(pulp.LpConstraint(
                        pulp.LpAffineExpression([(kept[j], 1.0), (served[j - 1], -1.0)]), less_equal,
                        f"{name}_kout_{expert}_{j}", 0.0))
                # Boundary b lies just before pass b; kept[j] spans those after use j - 1 up to use j.
                first = -1 if j == 0 else passes[j - 1]
                for boundary in range(first + 1, pass_index + 1):
                    boundary_terms[boundary].append(kept[j])
        for boundary, terms in enumerate(boundary_terms):
            if len(terms) > budget:
                problem.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(v, 1.0) for v in terms]),
                                                        less_equal, f"{name}_cap_{boundary}", float(budget)))
        self.cost_terms = cost_terms
        self.cost = pulp.LpAffineExpression(cost_terms, constant=constant)
        self.num_variables = sum(len(s) + sum(k is not None for k in self.kept[e]) for e, s in self.served.items())

    def value(self) -> float:
        return float(pulp.value(self.cost))

    def is_integral(self) -> bool:
        for variables in (*self.served.values(), *self.kept.values()):
            for var in variables:
                if var is None:
                    continue
                value = var.value() or 0.0
                if min(value, 1.0 - value) > INTEGRALITY_TOLERANCE:
                    return False
        return True

    def resident_sets(self) -> list[tuple[int, ...]]:
        """Turn the solution into the resident set of each pass, at most ``budget`` experts each.

        A pass's set is what the solution keeps across the boundary after it, then the
        experts it serves from a slot they already held, while slots remain.
        """
        num_passes = self.counts.shape[0]
        carried: list[list[int]] = [[] for _ in range(num_passes)]  # kept across the boundary after pass i
        already: list[list[int]] = [[] for _ in range(num_passes)]  # served in pass i from a kept slot
        for expert, passes in self.occurrences.items():
            served = [(v.value() or 0.0) > 0.5 for v in self.served[expert]]
            kept = [v is not None and (v.value() or 0.0) > 0.5 for v in self.kept[expert]]
            for j, pass_index in enumerate(passes.tolist()):
                if served[j] and kept[j]:
                    already[pass_index].append(expert)
                if j + 1 < len(passes) and kept[j + 1]:
                    for index in range(pass_index, int(passes[j + 1])):
                        carried[index].append(expert)
        sets = []
        for index in range(num_passes):
            chosen = list(dict.fromkeys(carried[index]))
            for expert in already[index]:
                if len(chosen) >= self.budget:
                    break
                if expert not in chosen:
                    chosen.append(expert)
            sets.append(tuple(sorted(chosen[:self.budget])))
        return sets


def oracle_bound(spec, trace: Trace, slot_budgets, *, profile=None, pricing: Pricing | None = None,
                 window: str = "trace", covered: tuple[int, int] | None = None, solver: str = "cbc",
                 time_limit_s: float | None = 300.0) -> OracleResult:
    """Bound the copy-plus-CPU cost of any policy with ``slot_budgets`` on ``trace``.

    ``covered`` restricts the bound to passes [start, stop); by default it covers the
    whole trace. Raises SolverError when a program cannot be solved.
    """
    check_solver(solver)
    check_trace_matches_spec(trace.metadata, spec)
    budgets = tuple(int(b) for b in slot_budgets)
    if len(budgets) != spec.num_moe_layers:
        raise InputError(f"needs one slot budget per MoE layer ({spec.num_moe_layers})", field="slot_budgets",
                         value=len(budgets))
    if pricing is None:
        if profile is None:
            raise ValueError("oracle_bound needs a profile or a pricing")
        pricing = Pricing(spec, profile)
    covered = covered or (0, trace.num_forwards)
    if not 0 <= covered[0] < covered[1] <= trace.num_forwards:
        raise InputError("invalid range of forward passes", field="covered", value=covered,
                         accepted=f"0 <= start < stop <= {trace.num_forwards}")
    counts = routing_counts(trace)
    cpu_s = np.where(counts > 0, pricing.cpu_marginal_s(counts), 0.0)  # [F, L, E]
    copy_s = pricing.expert_copy_s
    parts = segments(trace, window, covered)

    # Build the (layer, segment) programs, packing independent ones into shared solves.
    started = time.perf_counter()
    batches: list[tuple[pulp.LpProblem, list[tuple[int, int, _Program]]]] = []
    problem = None
    members: list[tuple[int, int, _Program]] = []
    size = 0
    for layer in range(spec.num_moe_layers):
        for begin, end in parts:
            if problem is None:
                problem = pulp.LpProblem(f"oracle_{len(batches)}", pulp.LpMinimize)
            program = _Program(problem, f"l{layer}_f{begin}", counts[begin:end, layer], cpu_s[begin:end, layer],
                               copy_s, budgets[layer], free_start=begin > 0)
            members.append((layer, begin, program))
            size += program.num_variables
            if size >= MAX_VARIABLES_PER_SOLVE:
                batches.append((problem, members))
                problem, members, size = None, [], 0
    if members:
        batches.append((problem, members))
    build_time = time.perf_counter() - started

    layer_bound = np.zeros(spec.num_moe_layers)
    placements: dict[int, list[tuple[int, ...]]] = {}
    all_integral = True
    placements_optimal = True
    solve_time = 0.0
    num_variables = 0
    for number, (problem, members) in enumerate(batches):
        problem.setObjective(pulp.LpAffineExpression(
            [term for _, _, program in members for term in program.cost_terms],
            constant=sum(program.cost.constant for _, _, program in members)))
        num_variables += len(problem.variables())
        what = f"oracle program {number + 1} of {len(batches)}"
        relaxed = solve(problem, solver, time_limit_s, what=f"{what} (LP relaxation)")
        solve_time += relaxed.solve_time_s
        if not relaxed.proven_optimal:
            raise SolverError(f"{what}: the LP relaxation was not solved to optimality within {time_limit_s} s")
        for layer, _, program in members:
            value = program.value()
            layer_bound[layer] += value - BOUND_RELATIVE_MARGIN * abs(value)
        integral = all(program.is_integral() for _, _, program in members)
        if not integral:
            all_integral = False
            for var in problem.variables():
                var.cat = pulp.LpBinary
            exact = solve(problem, solver, time_limit_s, what=what)
            solve_time += exact.solve_time_s
            if not exact.proven_optimal:
                placements_optimal = False
                logger.warning("%s: the MILP for placements stopped at its time limit", what)
        for layer, begin, program in members:
            for offset, resident in enumerate(program.resident_sets()):
                placements.setdefault(begin + offset, [()] * spec.num_moe_layers)[layer] = resident
        logger.info("%s: %d variables, LP value %.6g s, %s", what, len(problem.variables()), relaxed.objective,
                    "integral" if integral else "fractional, placements from the MILP")

    return OracleResult(
        bound_s=float(layer_bound.sum()), layer_bound_s=layer_bound,
        placements={index: tuple(sets) for index, sets in sorted(placements.items())},
        slot_budgets=budgets, covered=covered, window=window, integral=all_integral,
        placements_optimal=placements_optimal,
        num_programs=len(parts) * spec.num_moe_layers, num_variables=num_variables, solve_time_s=solve_time,
        build_time_s=build_time, solver=solver)


def oracle_plan(spec, result: OracleResult, base: Plan | None = None) -> Plan:
    """Make the ``oracle`` policy's plan that replays the bound's placements."""
    provenance = {"oracle": result.to_json()}
    if base is not None:
        provenance["budgets_from"] = base.policy
    return make_plan("oracle", spec, slot_budget=list(result.slot_budgets), placements=result.placements,
                     first_block_rule=base.first_block_rule if base is not None else "every-step",
                     provenance=provenance)


def copy_cpu_cost_s(spec, plan: Plan, trace: Trace, pricing: Pricing, covered: tuple[int, int] | None = None) -> float:
    """Return a plan's copy-plus-CPU cost over the covered passes, in the oracle's measure."""
    prediction = predict(spec, plan, trace, pricing=pricing)
    start, stop = covered or (0, trace.num_forwards)
    return float(prediction.copy_cpu_s[start:stop].sum())
