"""The MILP solvers the planner can use through PuLP, and how their outcomes are read.

CBC ships with PuLP and is the default. HiGHS is used when ``highspy`` is installed and
the caller asks for it. Every outcome that is not a proven optimum is reported as such:
``solve`` raises ``SolverError`` when no solution came back, and marks a solution that a
time limit cut short as not proven optimal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass

import pulp

from tide.errors import InputError, SolverError

logger = logging.getLogger(__name__)

SOLVERS = ("cbc", "highs")

_highs_banner_silenced = False


@dataclass(frozen=True)
class SolveOutcome:
    """The outcome of solving one program."""

    solver: str
    status: str  # PuLP's status name, e.g. "Optimal"
    proven_optimal: bool  # False when a time limit stopped the search at a feasible solution
    objective: float
    solve_time_s: float


def check_solver(name: str) -> str:
    """Return ``name`` if it is a known solver that is installed, else raise InputError."""
    if name not in SOLVERS:
        raise InputError("unknown solver", field="solver", value=name, accepted=", ".join(SOLVERS))
    if name == "highs" and not pulp.HiGHS().available():
        raise InputError("the HiGHS solver is not installed (pip install highspy)", field="solver", value=name,
                         accepted="cbc, or highs once highspy is installed")
    if name == "cbc" and not _cbc(None).available():
        raise InputError("no CBC binary found (pip install 'pulp[cbc]')", field="solver", value=name,
                         accepted="highs, or cbc once a CBC binary is installed")
    return name


def make_solver(name: str, time_limit_s: float | None) -> pulp.LpSolver:
    """Return a quiet PuLP solver that searches a MILP to a zero relative gap.

    HiGHS would otherwise stop within 1e-4 of the optimum, and the brute-force checks
    compare exact optima.
    """
    check_solver(name)
    if name == "cbc":
        return _cbc(time_limit_s)
    _silence_highs_banner()
    return pulp.HiGHS(msg=False, timeLimit=time_limit_s, gapRel=0.0)


def _cbc(time_limit_s: float | None) -> pulp.LpSolver:
    """Return CBC from a CBC binary on the path if there is one, else the binary PuLP 3 bundles."""
    found = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0)
    if found.available():
        return found
    with warnings.catch_warnings():
        # PuLP 3.x deprecates the class of its bundled binary in favour of ``pulp[cbc]``.
        warnings.simplefilter("ignore", DeprecationWarning)
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=0.0)


def new_variable(problem: pulp.LpProblem, name: str, low: float, high: float,
                 category: str = pulp.LpContinuous) -> pulp.LpVariable:
    """Create a variable of ``problem``, the PuLP 4 way where this PuLP has it."""
    if hasattr(problem, "add_variable"):
        return problem.add_variable(name, low, high, cat=category)
    return pulp.LpVariable(name, low, high, cat=category)


def _silence_highs_banner() -> None:
    """Create the process's first HiGHS instance with standard output sent to standard error.

    highspy 1.16 prints a copyright banner on stdout when the first ``Highs`` object is
    created, whatever the output options, and that line would break ``--json`` output.
    """
    global _highs_banner_silenced
    if _highs_banner_silenced:
        return
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _highs_banner_silenced = True


def solve(problem: pulp.LpProblem, solver: str, time_limit_s: float | None, *, what: str) -> SolveOutcome:
    """Solve ``problem`` and classify the outcome.

    Raises SolverError when the solver failed, found the program infeasible or
    unbounded, or stopped (e.g. on its time limit) without any feasible solution.
    ``what`` names the program in messages.
    """
    started = time.perf_counter()
    try:
        problem.solve(make_solver(solver, time_limit_s))
    except pulp.PulpSolverError as error:
        raise SolverError(f"{what}: solver {solver} failed: {error}") from None
    elapsed = time.perf_counter() - started
    status = pulp.LpStatus.get(problem.status, str(problem.status))
    solution = problem.sol_status
    logger.debug("%s: %s status %s, solution status %s, %.3f s", what, solver, status, solution, elapsed)
    if problem.status == pulp.LpStatusInfeasible or solution == pulp.LpSolutionInfeasible:
        raise SolverError(f"{what}: solver {solver} found the program infeasible")
    if problem.status == pulp.LpStatusUnbounded or solution == pulp.LpSolutionUnbounded:
        raise SolverError(f"{what}: solver {solver} found the program unbounded")
    if problem.status != pulp.LpStatusOptimal or solution not in (pulp.LpSolutionOptimal,
                                                                   pulp.LpSolutionIntegerFeasible):
        limit = f" within its time limit of {time_limit_s} s" if time_limit_s is not None else ""
        raise SolverError(f"{what}: solver {solver} returned no solution{limit} (status {status})")
    objective = pulp.value(problem.objective)
    return SolveOutcome(solver=solver, status=status, proven_optimal=solution == pulp.LpSolutionOptimal,
                        objective=float(objective or 0.0), solve_time_s=elapsed)
