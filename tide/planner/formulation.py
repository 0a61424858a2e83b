"""The planner's mixed-integer program: one (slot budget, τ) pair per MoE layer within the memory pool.

Symbols (``docs/planner.md`` derives them): for MoE layer l, budget b of the grid and
interval t of the candidate list, ``cost_s[l, t, b]`` is the layer's time summed over
every pass of the trace when it runs the ``tide`` policy with b slots and τ = t. The
binary ``x[l, t, b]`` picks one pair per layer. The program minimises the sum of the
picked costs subject to

* one pair per layer: sum over (t, b) of x[l, t, b] = 1;
* the slot pool: sum over (l, t, b) of b x[l, t, b] <= pool slots;
* with one τ for all layers: binaries z[t] with sum z[t] = 1 and, for every layer,
  sum over b of x[l, t, b] = z[t].

With a τ per layer, τ enters no constraint, so for each (layer, budget) only the best τ
can be optimal: the builder keeps that one before the solve. In both modes a budget that
costs no less than a smaller budget of the same (layer, τ) is dropped too, because it
only takes memory. Both reductions keep the optimum.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pulp

from tide.errors import SolverError
from tide.planner.solvers import SolveOutcome, new_variable, solve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateCosts:
    """Priced candidates: ``cost_s[l, t, b]`` for budgets[b] slots and τ = intervals[t]."""

    budgets: np.ndarray  # [B] int
    intervals: np.ndarray  # [T] int
    cost_s: np.ndarray  # [L, T, B]

    @property
    def num_layers(self) -> int:
        return self.cost_s.shape[0]


@dataclass(frozen=True)
class Choice:
    """The program's solution: a slot budget and a τ per MoE layer."""

    slot_budgets: tuple[int, ...]
    intervals: tuple[int, ...]
    objective_s: float
    outcome: SolveOutcome
    num_variables: int
    num_constraints: int


def _undominated(costs: np.ndarray, budgets: np.ndarray) -> list[int]:
    """Indices of budgets that cost strictly less than every smaller budget, in budget order."""
    undominated = []
    best = np.inf
    for index in np.argsort(budgets, kind="stable"):
        if costs[index] < best:
            undominated.append(int(index))
            best = costs[index]
    return undominated


def solve_choice(candidates: CandidateCosts, pool_slots: int, *, same_interval: bool = False,
                 solver: str = "cbc", time_limit_s: float | None = 60.0) -> Choice:
    """Choose each layer's budget and τ by solving the program with PuLP.

    Raises SolverError when the solver fails, times out without a solution, or stops
    before proving its solution optimal.
    """
    budgets = candidates.budgets
    intervals = candidates.intervals
    cost = candidates.cost_s
    num_layers = candidates.num_layers
    problem = pulp.LpProblem("tide_slot_plan", pulp.LpMinimize)
    x: dict[tuple[int, int, int], pulp.LpVariable] = {}
    for layer in range(num_layers):
        if same_interval:
            pairs = [(t, b) for t in range(len(intervals)) for b in _undominated(cost[layer, t], budgets)]
        else:
            best_t = cost[layer].argmin(axis=0)  # [B]
            best = cost[layer, best_t, np.arange(len(budgets))]
            pairs = [(int(best_t[b]), b) for b in _undominated(best, budgets)]
        for t, b in pairs:
            x[layer, t, b] = new_variable(problem, f"x_{layer}_{t}_{b}", 0, 1, pulp.LpBinary)

    by_layer: dict[int, list[pulp.LpVariable]] = {layer: [] for layer in range(num_layers)}
    by_layer_interval: dict[tuple[int, int], list[pulp.LpVariable]] = {}
    for (layer, t, _), var in x.items():
        by_layer[layer].append(var)
        by_layer_interval.setdefault((layer, t), []).append(var)

    problem += pulp.lpSum(float(cost[key]) * var for key, var in x.items())
    for layer in range(num_layers):
        problem += pulp.lpSum(by_layer[layer]) == 1, f"one_pair_{layer}"
    problem += pulp.lpSum(int(budgets[key[2]]) * var for key, var in x.items()) <= int(pool_slots), "slot_pool"
    if same_interval:
        z = [new_variable(problem, f"z_{t}", 0, 1, pulp.LpBinary) for t in range(len(intervals))]
        problem += pulp.lpSum(z) == 1, "one_interval"
        for layer in range(num_layers):
            for t in range(len(intervals)):
                problem += pulp.lpSum(by_layer_interval.get((layer, t), [])) == z[t], f"interval_{layer}_{t}"

    outcome = solve(problem, solver, time_limit_s, what="slot plan program")
    if not outcome.proven_optimal:
        raise SolverError(f"slot plan program: solver {solver} stopped at its time limit of {time_limit_s} s "
                          "before proving its solution optimal; raise the time limit")
    slot_budgets = [0] * num_layers
    chosen_intervals = [0] * num_layers
    for (layer, t, b), var in x.items():
        if (var.value() or 0.0) > 0.5:
            slot_budgets[layer] = int(budgets[b])
            chosen_intervals[layer] = int(intervals[t])
    if 0 in chosen_intervals:
        raise SolverError(f"slot plan program: solver {solver} returned no pair for MoE layer "
                          f"{chosen_intervals.index(0)}")
    objective = float(sum(cost[layer, int(np.flatnonzero(intervals == chosen_intervals[layer])[0]),
                               int(np.flatnonzero(budgets == slot_budgets[layer])[0])]
                          for layer in range(num_layers)))
    logger.info("slot plan program: %d variables, %d constraints, %s in %.3f s", len(x),
                problem.numConstraints(), outcome.status, outcome.solve_time_s)
    return Choice(tuple(slot_budgets), tuple(chosen_intervals), objective, outcome, len(problem.variables()),
                  problem.numConstraints())
