"""Benchmark of the simulator: replay of a synthetic 1024-token LLaDA2.0-flash trace under tide.

Prints the wall time of the replay (``sim.simulate``: lowering, compiling, the SimPy run and
the summary), the simulated ops per second of wall time, the predicted run time and its
ratio to the wall time, and a breakdown by phase. Targets: the replay in at most 2 s and at
least 100 times faster than the run it predicts.

The baseline in the same run is the textbook SimPy model of the same schedules: one
process per op, waiting for its dependencies and its lane predecessor, then holding a
``simpy.Resource`` per lane. It replays the first passes only, and it must give the same
time for every op as the engine.

Usage: python benchmarks/simulator.py [--repeats N] [--baseline-passes N] [--gpu-memory SIZE]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sim import simulate  # noqa: E402
from sim.engine import Engine, compile_schedules  # noqa: E402
from sim.replay import _cached_durations  # noqa: E402
from sim.result import build_result  # noqa: E402
from sim.textbook import textbook_times  # noqa: E402
from tide.costs import CostModel  # noqa: E402
from tide.hardware import load_profile  # noqa: E402
from tide.lowering import Lowering, tokens_per_expert  # noqa: E402
from tide.memory import plan_memory  # noqa: E402
from tide.policies import make_plan  # noqa: E402
from tide.spec import load_spec  # noqa: E402
from tide.synth import synthesize_trace  # noqa: E402
from tide.units import parse_size  # noqa: E402

TARGET_WALL_S = 2.0
TARGET_RATIO = 100.0


def policy_decisions_s(plan, spec, trace) -> float:
    """Return the time of the policy's placements alone, the part of lowering that builds no op."""
    lowering = Lowering(plan, spec)
    policy, state = lowering.policy, lowering.state
    began = time.perf_counter()
    for forward, routing in trace:
        for moe_index in range(spec.num_moe_layers):
            tokens = tokens_per_expert(routing[:, moe_index, :], spec.num_experts)
            policy.place(plan, state, forward, moe_index, tokens)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="replays to take the median of (default: 3)")
    parser.add_argument("--baseline-passes", type=int, default=40,
                        help="forward passes the textbook baseline replays (default: 40)")
    parser.add_argument("--gpu-memory", default="48GiB", help="GPU memory budget (default: 48GiB)")
    args = parser.parse_args()

    spec = load_spec("llada2-flash")
    profile = load_profile("h100-pcie")
    began = time.perf_counter()
    trace = synthesize_trace(spec, gen_tokens=1024, seed=0)
    synth_s = time.perf_counter() - began
    budget = plan_memory(spec, parse_size(args.gpu_memory), device_memory_bytes=int(profile.gpu.memory_bytes),
                         max_context_tokens=max(f.context_tokens for f in trace.forwards),
                         batch_tokens=max(f.num_tokens for f in trace.forwards))
    plan = make_plan("tide", spec, slot_budget=budget.slots_per_layer, interval=2)
    print(f"trace: llada2-flash, 1024 generated tokens, seed 0, {trace.num_forwards} forward passes "
          f"(synthesized in {synth_s:.2f} s)")
    print(f"plan: tide, tau 2, {budget.slots_per_layer} slots per MoE layer ({args.gpu_memory}), profile h100-pcie")

    # End to end, as a caller sees it. CPU time is printed too, because on a shared machine
    # other processes stretch the wall time but not the CPU time.
    load = os.getloadavg()[0]
    walls, cpus = [], []
    for _ in range(args.repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        result = simulate(spec, profile, plan, trace)
        walls.append(time.perf_counter() - began)
        cpus.append(time.process_time() - began_cpu)
    wall_s = statistics.median(walls)
    ratio = result.total_s / wall_s
    print(f"load average before the replays: {load:.2f} on {os.cpu_count()} CPUs")
    print(f"replay wall time: median {wall_s:.3f} s, min {min(walls):.3f} s over {args.repeats} runs; CPU time "
          f"median {statistics.median(cpus):.3f} s (target <= {TARGET_WALL_S:g} s wall: "
          f"{'met' if wall_s <= TARGET_WALL_S else 'NOT met'})")
    print(f"ops simulated: {result.num_ops}, {result.num_ops / wall_s:,.0f} ops per second of wall time")
    print(f"predicted run: {result.total_s:.3f} s, {result.tokens_per_s:.2f} tokens/s, hit rate "
          f"{result.hit_rate:.4f}, critical lane {result.critical_lane}")
    print(f"predicted run / wall time: {ratio:.1f}x (target >= {TARGET_RATIO:g}x: "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")

    # Phases, timed one by one.
    gc.disable()
    try:
        cost_model = CostModel(profile, dtype_bytes=spec.dtype_bytes)
        lowering = Lowering(plan, spec)
        initial = {layer: list(lowering.state.layers[i].slots) for i, layer in enumerate(spec.moe_layers)}
        began = time.perf_counter()
        schedules = [lowering.lower_forward(forward, routing) for forward, routing in trace]
        lowered = time.perf_counter()
        program = compile_schedules(schedules, cost_model, initial_slots=initial,
                                    duration_function=_cached_durations(cost_model))
        compiled = time.perf_counter()
        run = Engine(program).run()
        simulated = time.perf_counter()
        build_result(run, record_timeline=False)
        summarised = time.perf_counter()
        decisions_s = policy_decisions_s(plan, spec, trace)
    finally:
        gc.enable()
    print(f"phases: lowering {lowered - began:.3f} s (policy decisions alone {decisions_s:.3f} s), compiling "
          f"{compiled - lowered:.3f} s, SimPy run {simulated - compiled:.3f} s "
          f"({len(program.ops) / (simulated - compiled):,.0f} ops/s), summary {summarised - simulated:.3f} s")

    # Baseline: the textbook model on the first passes, against the engine on the same passes.
    passes = min(args.baseline_passes, len(schedules))
    head = compile_schedules(schedules[:passes], cost_model, initial_slots=initial,
                             duration_function=_cached_durations(cost_model))
    began = time.perf_counter()
    engine_run = Engine(head).run()
    engine_s = time.perf_counter() - began
    began = time.perf_counter()
    start, end = textbook_times(head)
    textbook_s = time.perf_counter() - began
    same = start == engine_run.start_ns and end == engine_run.end_ns
    print(f"baseline, first {passes} passes ({len(head.ops)} ops): textbook SimPy model "
          f"{len(head.ops) / textbook_s:,.0f} ops/s, engine {len(head.ops) / engine_s:,.0f} ops/s "
          f"({textbook_s / engine_s:.1f}x faster); same time for every op: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
