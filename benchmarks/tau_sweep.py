"""Check the planner against the simulator: does its plan match the best τ a sweep finds?

For each model, hardware profile and GPU memory budget, the planner chooses per-layer
slot budgets and intervals on a planning trace (synthetic, seed 0). A held-out trace
(seed 1) is then simulated under

* the planner's plan (a τ per layer),
* the planner's plan with one τ for all layers (``--same-interval``),
* the planner's slot budgets with every uniform τ from 1 to ``--max-interval``,
* equal slot budgets (the memory pool split evenly) with every uniform τ, for context.

The check passes when the planner's simulated throughput is at least 98% of the best
uniform τ with the same budgets. Run from the repository root:

    PYTHONPATH=. python benchmarks/tau_sweep.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time

from sim import simulate
from tide.hardware import load_profile
from tide.ir import Plan
from tide.planner import expert_pool_slots, plan
from tide.policies import make_plan
from tide.spec import load_spec
from tide.synth import synthesize_trace
from tide.units import parse_size

CASES = [
    ("llada2-mini", "h100-pcie", "8GiB"),
    ("llada2-mini", "h100-pcie", "16GiB"),
    ("llada2-mini", "a100-80g", "8GiB"),
    ("llada2-mini", "a100-80g", "16GiB"),
    ("llada2-flash", "h100-pcie", "48GiB"),
    ("llada2-flash", "h100-pcie", "72GiB"),
    ("llada2-flash", "a100-80g", "48GiB"),
    ("llada2-flash", "a100-80g", "72GiB"),
]
TOLERANCE = 0.02


def with_uniform_interval(chosen: Plan, interval: int) -> Plan:
    return Plan(policy="tide", slot_budgets=chosen.slot_budgets, intervals=(interval,) * chosen.num_moe_layers,
                miss_service=chosen.miss_service, first_block_rule=chosen.first_block_rule)


def sweep(spec, profile, trace, budgets_plan: Plan, max_interval: int) -> dict[int, float]:
    return {interval: simulate(spec, profile, with_uniform_interval(budgets_plan, interval), trace).tokens_per_s
            for interval in range(1, max_interval + 1)}


def run_case(model: str, hardware: str, memory: str, *, gen_tokens: int, max_interval: int) -> dict:
    spec = load_spec(model)
    profile = load_profile(hardware)
    gpu_memory = parse_size(memory)
    planning = synthesize_trace(spec, gen_tokens=gen_tokens, seed=0)
    held_out = synthesize_trace(spec, gen_tokens=gen_tokens, seed=1)

    started = time.perf_counter()
    per_layer = plan(spec, profile, gpu_memory, planning)
    same = plan(spec, profile, gpu_memory, planning, same_interval=True)
    plan_s = time.perf_counter() - started

    planner_tps = simulate(spec, profile, per_layer.plan, held_out).tokens_per_s
    same_tps = simulate(spec, profile, same.plan, held_out).tokens_per_s
    planner_sweep = sweep(spec, profile, held_out, per_layer.plan, max_interval)
    _, pool_slots = expert_pool_slots(spec, profile, gpu_memory)
    equal = make_plan("tide", spec, slot_budget=min(spec.num_experts, pool_slots // spec.num_moe_layers))
    equal_sweep = sweep(spec, profile, held_out, equal, max_interval)

    best_interval = max(planner_sweep, key=planner_sweep.get)
    best_equal = max(equal_sweep, key=equal_sweep.get)
    return {
        "case": f"{model} {hardware} {memory}",
        "budgets": f"{min(per_layer.plan.slot_budgets)}..{max(per_layer.plan.slot_budgets)} "
                   f"(sum {sum(per_layer.plan.slot_budgets)}/{pool_slots})",
        "planner_intervals": sorted(set(per_layer.plan.intervals)),
        "planner_tps": planner_tps,
        "predicted_tps": per_layer.prediction.tokens_per_s,
        "same_interval": same.plan.intervals[0],
        "same_tps": same_tps,
        "best_interval": best_interval,
        "best_tps": planner_sweep[best_interval],
        "sweep": planner_sweep,
        "equal_best_interval": best_equal,
        "equal_best_tps": equal_sweep[best_equal],
        "ratio": planner_tps / planner_sweep[best_interval],
        "same_ratio": same_tps / planner_sweep[best_interval],
        "plan_s": plan_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-tokens", type=int, default=256, help="generated tokens per trace (default: 256)")
    parser.add_argument("--max-interval", type=int, default=16, help="largest uniform τ swept (default: 16)")
    parser.add_argument("--quick", action="store_true", help="only the first and the fifth case")
    args = parser.parse_args()
    cases = [CASES[0], CASES[4]] if args.quick else CASES

    failures = 0
    for model, hardware, memory in cases:
        row = run_case(model, hardware, memory, gen_tokens=args.gen_tokens, max_interval=args.max_interval)
        passed = row["ratio"] >= 1.0 - TOLERANCE
        failures += not passed
        sweep_text = " ".join(f"{t}:{v:.1f}" for t, v in row["sweep"].items())
        print(f"{row['case']}: slots {row['budgets']}, planner τ {row['planner_intervals']}")
        print(f"  simulated tokens/s: planner {row['planner_tps']:.2f} (predicted on the planning trace "
              f"{row['predicted_tps']:.2f}), one-τ planner τ={row['same_interval']} {row['same_tps']:.2f}, "
              f"best uniform τ={row['best_interval']} {row['best_tps']:.2f}; "
              f"planner / best = {row['ratio']:.4f}, one-τ planner / best = {row['same_ratio']:.4f} "
              f"[{'ok' if passed else 'FAIL'}]")
        print(f"  equal slots, best uniform τ={row['equal_best_interval']}: {row['equal_best_tps']:.2f} tokens/s; "
              f"planning took {row['plan_s']:.1f} s")
        print(f"  sweep with the planner's slots (τ:tokens/s): {sweep_text}")
        sys.stdout.flush()
    print(f"{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
