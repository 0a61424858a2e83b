"""``tide plan``: choose slot budgets and refresh intervals by mixed-integer programming."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tide.cli.common import add_json_flag, emit, format_table
from tide.errors import InputError
from tide.hardware import load_profile
from tide.ir import FIRST_BLOCK_RULES, save_plan
from tide.planner import DEFAULT_GEN_TOKENS, SOLVERS, PlanResult, plan
from tide.planner.oracle import (WINDOWS, OracleResult, copy_cpu_cost_s, forwards_of_blocks, oracle_bound,
                                 oracle_plan)
from tide.planner.pricing import Pricing
from tide.spec import list_specs, load_spec
from tide.trace import load_trace
from tide.units import format_bytes, parse_size

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan", help="choose slot budgets and the refresh interval by mixed-integer programming",
        description="Price every (slot budget, refresh interval) pair of every MoE layer on a trace, choose one "
                    "pair per layer within the GPU memory budget by solving a MILP with PuLP, and write the "
                    "tide plan with its predicted tokens per second and cost breakdown. With --oracle, also "
                    "bound the copy-plus-CPU cost that any policy with the same slot budgets could reach.")
    parser.add_argument("--model", required=True, metavar="SPEC",
                        help=f"model spec: a shipped name ({', '.join(list_specs())}), a config.json or a "
                             "checkpoint folder")
    parser.add_argument("--hardware", required=True, metavar="NAME|PATH",
                        help="a shipped hardware profile (see 'tide hw list') or a profile JSON file")
    parser.add_argument("--gpu-memory", required=True, metavar="SIZE",
                        help="GPU memory budget, e.g. 16GiB; what remains after the non-expert weights, KV "
                             "cache, activations and a reserve holds expert slots")
    parser.add_argument("--trace", default=None, metavar="PATH",
                        help="trace whose routing statistics the plan is priced on (default: a synthetic "
                             "trace drawn from the spec's published statistics)")
    parser.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, metavar="N",
                        help=f"generated tokens of the synthetic trace (default: {DEFAULT_GEN_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the synthetic trace (default: 0)")
    parser.add_argument("--solver", default="cbc", choices=SOLVERS,
                        help="MILP solver: cbc (bundled with PuLP, the default) or highs (needs highspy)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                        help="solver time limit per program; a program not solved to optimality within it "
                             "is an error (default: 60)")
    parser.add_argument("--same-interval", action="store_true",
                        help="choose one refresh interval for all MoE layers instead of one per layer")
    parser.add_argument("--first-block-rule", default="every-step", choices=FIRST_BLOCK_RULES,
                        help="refresh rule of the first generated block (default: every-step)")
    parser.add_argument("--budget-step", type=int, default=None, metavar="N",
                        help="spacing of the slot budgets the program chooses from (default: 1 up to 64 "
                             "experts, else experts / 32)")
    parser.add_argument("--out", default=None, metavar="PLAN.json", help="write the plan to this file")
    parser.add_argument("--oracle", action="store_true",
                        help="also solve the oracle program: a lower bound on copy-plus-CPU seconds for any "
                             "policy with the plan's slot budgets, and the tide plan's gap to it")
    parser.add_argument("--oracle-window", default="trace", choices=WINDOWS,
                        help="trace: one program per MoE layer over the whole trace (tightest); block: one per "
                             "layer and block, each starting from a free resident set (smaller, looser)")
    parser.add_argument("--oracle-blocks", type=int, default=None, metavar="N",
                        help="bound only the prompt and the first N generated blocks (default: the whole trace)")
    parser.add_argument("--oracle-time-limit", type=float, default=300.0, metavar="SECONDS",
                        help="solver time limit per oracle program (default: 300)")
    parser.add_argument("--oracle-out", default=None, metavar="PLAN.json",
                        help="write the oracle policy's plan, which replays the bound's placements")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.model)
    profile = load_profile(args.hardware)
    gpu_memory = parse_size(args.gpu_memory, field="gpu_memory")
    if args.gen_tokens < 1:
        raise InputError("must be at least 1", field="gen_tokens", value=args.gen_tokens)
    if args.time_limit <= 0 or args.oracle_time_limit <= 0:
        raise InputError("a time limit must be positive", field="time_limit",
                         value=min(args.time_limit, args.oracle_time_limit), accepted="seconds > 0")
    trace = load_trace(args.trace) if args.trace else None

    result = plan(spec, profile, gpu_memory, trace, solver=args.solver, time_limit_s=args.time_limit,
                  same_interval=args.same_interval, first_block_rule=args.first_block_rule,
                  budget_step=args.budget_step, gen_tokens=args.gen_tokens, seed=args.seed)
    if args.out:
        save_plan(result.plan, args.out)
        logger.info("wrote the plan to %s", args.out)

    oracle_json = None
    oracle_lines: list[str] = []
    if args.oracle:
        oracle_json, oracle_lines = _run_oracle(args, spec, profile, result, trace)

    output: dict[str, Any] = {"plan": result.plan.to_json(), "out": args.out}
    if oracle_json is not None:
        output["oracle"] = oracle_json
    emit(output, _describe(spec, profile, result, args.out) + "".join("\n" + line for line in oracle_lines),
         args.json)
    return 0


def _run_oracle(args, spec, profile, result: PlanResult, trace) -> tuple[dict[str, Any], list[str]]:
    """Bound the copy-plus-CPU cost with the plan's budgets and compare the plan and the oracle's replay."""
    from tide.planner import planning_trace

    trace = planning_trace(spec, trace, gen_tokens=args.gen_tokens, seed=args.seed)
    covered = forwards_of_blocks(trace, args.oracle_blocks) if args.oracle_blocks else None
    pricing = Pricing(spec, profile)
    bound: OracleResult = oracle_bound(spec, trace, result.plan.slot_budgets, pricing=pricing,
                                       window=args.oracle_window, covered=covered, solver=args.solver,
                                       time_limit_s=args.oracle_time_limit)
    replay = oracle_plan(spec, bound, result.plan)
    tide_cost = copy_cpu_cost_s(spec, result.plan, trace, pricing, bound.covered)
    replay_cost = copy_cpu_cost_s(spec, replay, trace, pricing, bound.covered)
    if bound.bound_s > 0:
        gap = tide_cost / bound.bound_s - 1.0
    else:
        gap = 0.0 if tide_cost == 0 else float("inf")
    if args.oracle_out:
        save_plan(replay, args.oracle_out)
        logger.info("wrote the oracle plan to %s", args.oracle_out)
    data = {**bound.to_json(), "tide_copy_cpu_s": tide_cost, "gap": gap, "oracle_replay_copy_cpu_s": replay_cost,
            "out": args.oracle_out}
    lines = [
        f"oracle bound ({bound.window} window, forwards {bound.covered[0]}..{bound.covered[1] - 1}): "
        f"{bound.bound_s:.6g} s of copies plus CPU expert work",
        f"  tide plan {tide_cost:.6g} s (gap {gap * 100:.1f}%), oracle placements replayed {replay_cost:.6g} s",
        f"  {bound.num_variables} variables, LP {'integral' if bound.integral else 'fractional'}, "
        f"built in {bound.build_time_s:.2f} s, solved in {bound.solve_time_s:.2f} s",
    ]
    return data, lines


def _describe(spec, profile, result: PlanResult, out: str | None) -> str:
    chosen = result.plan
    predicted = chosen.predicted
    breakdown = predicted["breakdown"]
    provenance = chosen.provenance
    rows = [[i, layer, chosen.slot_budgets[i], chosen.intervals[i]] for i, layer in enumerate(spec.moe_layers)]
    lines = [
        f"{chosen.policy} plan for {spec.name} on {profile.name}: {result.pool_slots} expert slots in "
        f"{format_bytes(provenance.get('expert_pool_bytes', 0))}",
        f"predicted {predicted['tokens_per_s']:.2f} tokens/s ({predicted['tokens']} tokens in "
        f"{predicted['total_s']:.4g} s), hit rate {predicted['hit_rate']:.3f}, {predicted['expert_copies']} expert "
        f"copies ({format_bytes(predicted['h2d_bytes'])} host to device)",
        f"busy: expert copies {breakdown['expert_copy_s']:.4g} s, CPU experts {breakdown['cpu_expert_s']:.4g} s, "
        f"GPU experts {breakdown['gpu_expert_s']:.4g} s, other GPU {breakdown['gpu_other_s']:.4g} s",
    ]
    if "solver" in provenance:
        lines.append(f"solver {provenance['solver']}: {provenance['solver_status']} in "
                     f"{provenance['solve_time_s']:.3f} s, {provenance['num_variables']} variables")
    lines.append(format_table(rows, ["moe_layer", "decoder_layer", "slots", "interval"]))
    if out:
        lines.append(f"wrote {out}")
    return "\n".join(lines)
