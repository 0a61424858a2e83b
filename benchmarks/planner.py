"""Planner solve times: the slot plan for LLaDA2.0-mini and -flash, and the oracle for one block of mini.

Targets on a 2-core development machine: the plan for mini in at most 5 s, for flash in
at most 15 s, and the oracle bound for the prompt and first block of mini in at most
60 s. Each is timed end to end: pricing the candidates, the PuLP solve and the exact
prediction.
The baseline, in the same run, prices candidates the direct way, by lowering the whole
trace for each one; its time is measured on a few candidates and scaled to the full
candidate count, so it is an estimate. Run from the repository root:

    PYTHONPATH=. python benchmarks/planner.py [--solver cbc|highs] [--full-oracle]
"""

from __future__ import annotations

import argparse
import sys
import time

from tide.hardware import load_profile
from tide.ir import Plan
from tide.planner import plan, planning_trace
from tide.planner.oracle import copy_cpu_cost_s, forwards_of_blocks, oracle_bound
from tide.planner.predict import predict
from tide.planner.pricing import Pricing
from tide.spec import load_spec
from tide.units import parse_size

PLAN_CASES = [("llada2-mini", "16GiB", 5.0), ("llada2-flash", "48GiB", 15.0)]
ORACLE_TARGET_S = 60.0
HARDWARE = "h100-pcie"
BASELINE_SAMPLES = 3


def direct_pricing_estimate_s(spec, profile, trace, result) -> float:
    """Time pricing a few candidates by lowering the whole trace, scaled to every candidate."""
    pricing = Pricing(spec, profile)
    candidates = result.candidates
    started = time.perf_counter()
    for sample in range(BASELINE_SAMPLES):
        budget = int(candidates.budgets[(sample + 1) * len(candidates.budgets) // (BASELINE_SAMPLES + 1)])
        interval = int(candidates.intervals[sample % len(candidates.intervals)])
        uniform = Plan(policy="tide", slot_budgets=(budget,) * spec.num_moe_layers,
                       intervals=(interval,) * spec.num_moe_layers, miss_service=("cpu",) * spec.num_moe_layers)
        predict(spec, uniform, trace, pricing=pricing)
    per_plan_s = (time.perf_counter() - started) / BASELINE_SAMPLES
    # One lowered plan prices one candidate of every layer at once.
    return per_plan_s * len(candidates.budgets) * len(candidates.intervals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solver", default="cbc", choices=("cbc", "highs"))
    parser.add_argument("--full-oracle", action="store_true", help="also time the oracle over the whole mini trace")
    args = parser.parse_args()
    profile = load_profile(HARDWARE)
    misses = 0

    print(f"slot plan on {HARDWARE}, synthetic 256-token trace, solver {args.solver}")
    for model, memory, target_s in PLAN_CASES:
        spec = load_spec(model)
        trace = planning_trace(spec, None)
        started = time.perf_counter()
        result = plan(spec, profile, parse_size(memory), trace, solver=args.solver)
        wall_s = time.perf_counter() - started
        timings = result.timings_s
        candidates = result.candidates
        num_candidates = candidates.cost_s.size
        baseline_s = direct_pricing_estimate_s(spec, profile, trace, result)
        met = wall_s <= target_s
        misses += not met
        print(f"  {model} {memory}: {wall_s:.2f} s end to end (target {target_s:.0f} s: {'met' if met else 'MISSED'}); "
              f"pricing {timings['pricing_s']:.2f} s for {num_candidates} candidates "
              f"({len(candidates.budgets)} budgets x {len(candidates.intervals)} τ x {spec.num_moe_layers} layers), "
              f"MILP {result.choice.outcome.solve_time_s:.3f} s with {result.choice.num_variables} binaries, "
              f"exact prediction {timings['predict_s']:.2f} s")
        print(f"    baseline: pricing by lowering the trace per candidate, estimated {baseline_s:.1f} s "
              f"({baseline_s / timings['pricing_s']:.0f}x the vectorised pricing)")
        print(f"    plan: {result.prediction.tokens_per_s:.2f} tokens/s predicted, intervals "
              f"{sorted(set(result.plan.intervals))}, slots {min(result.plan.slot_budgets)}.."
              f"{max(result.plan.slot_budgets)}")
        sys.stdout.flush()

        if model != "llada2-mini":
            continue
        pricing = Pricing(spec, profile)
        covered = forwards_of_blocks(trace, 1)
        started = time.perf_counter()
        bound = oracle_bound(spec, trace, result.plan.slot_budgets, pricing=pricing, covered=covered,
                             solver=args.solver)
        oracle_s = time.perf_counter() - started
        met = oracle_s <= ORACLE_TARGET_S
        misses += not met
        tide_cost = copy_cpu_cost_s(spec, result.plan, trace, pricing, covered)
        print(f"  oracle, {model} prompt and first block (forwards {covered[0]}..{covered[1] - 1}): {oracle_s:.2f} s "
              f"(target {ORACLE_TARGET_S:.0f} s: {'met' if met else 'MISSED'}); build {bound.build_time_s:.2f} s, "
              f"solve {bound.solve_time_s:.2f} s, {bound.num_variables} variables, "
              f"LP {'integral' if bound.integral else 'fractional'}")
        print(f"    bound {bound.bound_s:.4f} s of copies plus CPU work; tide plan {tide_cost:.4f} s "
              f"(gap {100 * (tide_cost / bound.bound_s - 1):.1f}%)")
        block = oracle_bound(spec, trace, result.plan.slot_budgets, pricing=pricing, covered=covered,
                             window="block", solver=args.solver)
        print(f"    baseline: block window over the same passes {block.solve_time_s + block.build_time_s:.2f} s, "
              f"bound {block.bound_s:.4f} s (looser: each block starts from a free resident set)")
        if args.full_oracle:
            started = time.perf_counter()
            whole = oracle_bound(spec, trace, result.plan.slot_budgets, pricing=pricing, solver=args.solver)
            whole_s = time.perf_counter() - started
            tide_whole = copy_cpu_cost_s(spec, result.plan, trace, pricing)
            print(f"  oracle, {model} whole trace ({trace.num_forwards} forwards): {whole_s:.2f} s, bound "
                  f"{whole.bound_s:.4f} s, tide plan {tide_whole:.4f} s (gap "
                  f"{100 * (tide_whole / whole.bound_s - 1):.1f}%)")
        sys.stdout.flush()
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
