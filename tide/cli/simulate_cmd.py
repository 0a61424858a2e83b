"""``tide simulate``: replay a trace under one policy, or all of them, on a hardware profile."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from tide.cli.common import add_json_flag, emit, format_table
from tide.errors import InputError
from tide.hardware import load_profile
from tide.ir import FIRST_BLOCK_RULES, POLICY_NAMES, Plan, load_plan, save_timeline
from tide.memory import plan_memory
from tide.policies import check_plan_matches_spec, make_plan
from tide.spec import list_specs, load_spec
from tide.synth import PROFILE_SEED_OFFSET, profiling_trace_for
from tide.trace import TraceReader, check_trace_matches_spec, load_trace
from tide.units import format_bytes, parse_size

logger = logging.getLogger(__name__)

# The policies ``--policy all`` runs, in table order; ``tide`` is the reference row.
ALL_POLICIES = ("tide", "every-step", "static", "lru-fetch", "cpu-experts", "all-gpu", "oracle")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate", help="replay a trace under a policy on a hardware profile",
        description="Lower the trace under each plan with the shared lowering and run the schedules on the "
                    "SimPy model of GPU, copy engines and CPU, with durations from the hardware profile. "
                    "The static policy's hot sets come from a profiling trace other than the replayed one: "
                    "--profile-trace, or for a synthetic trace the same generator with another seed.")

    # What to simulate.
    parser.add_argument("--trace", required=True, metavar="PATH", help="trace file to replay")
    parser.add_argument("--hardware", required=True, metavar="NAME|PATH",
                        help="a shipped hardware profile (see 'tide hw list') or a profile JSON file")
    parser.add_argument("--gpu-memory", required=True, metavar="SIZE",
                        help="GPU memory budget, e.g. 48GiB; sets the slots per MoE layer")
    parser.add_argument("--model", metavar="SPEC", default=None,
                        help="model spec: a shipped name, a config.json or a checkpoint folder "
                             "(default: the spec the trace names)")

    # Which policy, with which settings.
    parser.add_argument("--policy", default=None, metavar="NAME|all",
                        help=f"placement policy: {', '.join(POLICY_NAMES)}, or 'all' for a comparison table "
                             "(default: tide, or the policy of --plan)")
    parser.add_argument("--interval", type=int, default=2, metavar="N",
                        help="refresh interval τ in steps for tide (default: 2)")
    parser.add_argument("--first-block-rule", default="every-step", choices=FIRST_BLOCK_RULES,
                        help="refresh rule of the first generated block (default: every-step)")
    parser.add_argument("--slots", type=int, default=None, metavar="N",
                        help="slots per MoE layer, replacing the number that --gpu-memory leaves room for")
    parser.add_argument("--plan", default=None, metavar="PLAN.json", help="simulate this plan (e.g. from the planner)")
    parser.add_argument("--profile-trace", default=None, metavar="PATH",
                        help="trace that chooses the static policy's hot sets (default: for a synthetic trace, "
                             f"one drawn with its arguments and seed + {PROFILE_SEED_OFFSET}; for a recorded "
                             "trace, the replayed trace itself, which flatters static)")

    # Outputs.
    parser.add_argument("--timeline-out", default=None, metavar="PATH",
                        help="write the simulated timeline as Chrome trace JSON (with --policy all, one file "
                             "per policy, named PATH with the policy before the suffix)")
    parser.add_argument("--html", default=None, metavar="PATH",
                        help="write an interactive HTML report: a Gantt chart per lane and a per-step cost "
                             "breakdown (with --policy all, one file per policy)")
    add_json_flag(parser)
    parser.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    from sim import simulate

    # Every input is checked before the first simulation starts.
    gpu_memory = parse_size(args.gpu_memory, field="--gpu-memory")
    if args.interval < 1:
        raise InputError("must be at least 1", field="--interval", value=args.interval)
    if args.policy is not None and args.policy != "all" and args.policy not in POLICY_NAMES:
        raise InputError("unknown policy", field="--policy", value=args.policy,
                         accepted=", ".join(POLICY_NAMES) + ", all")
    profile = load_profile(args.hardware)
    reader = TraceReader(args.trace)
    spec = _load_model(args.model, reader)
    check_trace_matches_spec(reader.metadata, spec, source=args.trace)
    forwards = reader.forwards
    budget = plan_memory(spec, gpu_memory, device_memory_bytes=int(profile.gpu.memory_bytes),
                         max_context_tokens=max(f.context_tokens for f in forwards),
                         batch_tokens=max(f.num_tokens for f in forwards))
    slots = _slots(args.slots, budget.slots_per_layer, spec)
    trace = load_trace(args.trace)
    profile_trace, profile_source = _profile_trace(args, trace, spec)
    plans, skipped = _plans(args, spec, slots, budget, profile_trace)

    results = {}
    for name, plan in plans.items():
        began = time.perf_counter()
        results[name] = simulate(spec, profile, plan, trace, record_timeline=bool(args.timeline_out or args.html),
                                 progress=True)
        logger.info("policy %s: %d ops simulated in %.2f s of wall time", name, results[name].num_ops,
                    time.perf_counter() - began)

    written = _write_outputs(args, results, len(plans) > 1)
    reference = results.get("tide")
    rows = []
    for name, result in results.items():
        relative = result.tokens_per_s / reference.tokens_per_s if reference and reference.tokens_per_s else None
        rows.append({"policy": name, "relative_to_tide": relative, **result.to_json(per_forward=len(plans) == 1)})
    output = {
        "trace": args.trace,
        "model": spec.name,
        "hardware": profile.name,
        "gpu_memory_bytes": gpu_memory,
        "slots_per_layer": slots,
        "static_profile": profile_source if "static" in plans else None,
        "policies": rows,
        "skipped": skipped,
        "written": written,
    }
    emit(output, _human(output, budget, len(plans) > 1), args.json)
    return 0


def _load_model(model: str | None, reader: TraceReader):
    if model is not None:
        return load_spec(model)
    name = reader.metadata.spec_name
    if name not in list_specs():
        raise InputError(f"the trace was recorded for model '{name}', which is not a shipped spec; pass --model",
                         source=reader.path, field="spec_name", value=name,
                         accepted="--model with a shipped name, a config.json or a checkpoint folder")
    return load_spec(name)


def _profile_trace(args: argparse.Namespace, trace, spec):
    """Return the trace that chooses the static policy's hot sets, and a description of it.

    A synthetic profiling trace is drawn only when the static policy runs, because
    drawing one takes about as long as the replayed trace did.
    """
    if args.profile_trace is not None:
        profile = load_trace(args.profile_trace)
        check_trace_matches_spec(profile.metadata, spec, source=args.profile_trace)
        return profile, args.profile_trace
    if args.plan is not None or args.policy not in ("static", "all"):
        return None, None
    profile = profiling_trace_for(trace, spec)
    if profile is not None:
        seed = profile.metadata.extra["synthetic"]["seed"]
        return profile, f"synthetic, seed {seed}"
    logger.warning("the static policy's hot sets come from the replayed trace itself, which no real deployment "
                   "could know in advance; pass --profile-trace with a trace of other prompts")
    return trace, "the replayed trace"


def _slots(requested: int | None, fitting: int, spec) -> int:
    if requested is None:
        return fitting
    if not 0 <= requested <= spec.num_experts:
        raise InputError("slot budget outside the layer's experts", field="--slots", value=requested,
                         accepted=f"0 to {spec.num_experts}")
    if requested > fitting:
        logger.warning("--slots %d is more than the %d slots per MoE layer that the GPU memory budget leaves "
                       "room for", requested, fitting)
    return requested


def _plans(args: argparse.Namespace, spec, slots: int, budget, profile_trace) -> tuple[dict[str, Plan], dict[str, str]]:
    """Build the plans to simulate, and the reasons for policies that cannot run."""
    if args.plan is not None:
        if args.policy == "all":
            raise InputError("--plan simulates one plan, so it cannot be combined with --policy all",
                             field="--policy", value=args.policy, accepted="a policy name or nothing")
        plan = load_plan(args.plan)
        check_plan_matches_spec(plan, spec, source=args.plan)
        if args.policy is not None and args.policy != plan.policy:
            raise InputError(f"the plan's policy is {plan.policy}", field="--policy", value=args.policy,
                             accepted=f"{plan.policy} or nothing")
        return {plan.policy: plan}, {}

    names = ALL_POLICIES if args.policy == "all" else (args.policy or "tide",)
    plans: dict[str, Plan] = {}
    skipped: dict[str, str] = {}
    for name in names:
        reason = _cannot_run(name, spec, budget)
        if reason is not None:
            if args.policy != "all":
                raise InputError(reason, field="--policy", value=name)
            skipped[name] = reason
            continue
        plans[name] = make_plan(name, spec, slot_budget=slots, interval=args.interval,
                                first_block_rule=args.first_block_rule, profiling_trace=profile_trace,
                                provenance={"source": "tide simulate"})
    return plans, skipped


def _cannot_run(policy: str, spec, budget) -> str | None:
    """Return why ``policy`` cannot run on this budget, or None. --slots does not count:
    all-gpu always keeps every expert resident, so only the memory decides."""
    if policy == "oracle":
        return "the oracle policy needs per-pass placements from the planner; pass its plan with --plan"
    slots = budget.slots_per_layer
    if policy == "all-gpu" and slots < spec.num_experts:
        needed = budget.gpu_memory_bytes - budget.expert_pool_bytes + spec.num_moe_layers * spec.num_experts \
            * budget.expert_bytes
        return (f"all-gpu needs all {spec.num_experts} experts of every MoE layer resident, but the GPU memory "
                f"budget leaves room for {slots} slots per layer; it needs about {format_bytes(needed)}")
    return None


def _write_outputs(args: argparse.Namespace, results: dict, several: bool) -> list[str]:
    from sim.report import write_html

    written = []
    for name, result in results.items():
        if args.timeline_out:
            path = _output_path(args.timeline_out, name, several)
            save_timeline(result.timeline, path)
            written.append(path)
        if args.html:
            path = _output_path(args.html, name, several)
            write_html(result, path, title=f"{result.metadata['spec']} on {result.metadata['hardware']}, "
                                           f"policy {name}")
            written.append(path)
    return written


def _output_path(path: str, policy: str, several: bool) -> str:
    if not several:
        return path
    target = Path(path)
    return str(target.with_name(f"{target.stem}.{policy}{target.suffix}"))


def _human(output: dict[str, Any], budget, several: bool) -> str:
    lines = [f"{output['trace']}: {output['model']} on {output['hardware']}, GPU memory "
             f"{format_bytes(output['gpu_memory_bytes'])} (non-expert weights {format_bytes(budget.non_expert_bytes)}), "
             f"{output['slots_per_layer']} slots per MoE layer"]
    if output["static_profile"]:
        lines.append(f"static hot sets profiled on {output['static_profile']}")
    rows = output["policies"]
    if several:
        table = [[r["policy"], r["tokens_per_s"], _relative(r["relative_to_tide"]), r["mean_forward_s"] * 1e3,
                  r["mean_block_s"], r["hit_rate"], r["h2d_bytes"] / 2**30, r["d2h_bytes"] / 2**30, r["critical_lane"]]
                 for r in rows]
        lines.append("")
        lines.append(format_table(table, ["policy", "tokens/s", "vs tide", "ms/forward", "s/block", "hit rate",
                                          "h2d GiB", "d2h GiB", "critical lane"]))
        for name, reason in output["skipped"].items():
            lines.append(f"{name}: skipped, {reason}")
    else:
        r = rows[0]
        busy = ", ".join(f"{lane} {fraction:.1%}" for lane, fraction in r["lane_busy_fraction"].items())
        lines += [
            f"policy           {r['policy']}",
            f"throughput       {r['tokens_per_s']:.4g} tokens/s ({r['tokens']} tokens in {r['total_s']:.4g} s)",
            f"per forward      {r['mean_forward_s'] * 1e3:.4g} ms over {r['num_forwards']} passes",
            f"per block        {r['mean_block_s'] * 1e3:.4g} ms over {r['num_blocks']} "
            f"block{'' if r['num_blocks'] == 1 else 's'}",
            f"hit rate         {r['hit_rate']:.4f} ({r['hits']} hits, {r['misses']} misses)",
            f"copied           h2d {format_bytes(r['h2d_bytes'])} ({r['expert_copies']} expert copies), "
            f"d2h {format_bytes(r['d2h_bytes'])}",
            f"lanes busy       {busy}",
            f"critical lane    {r['critical_lane']}",
        ]
    for path in output["written"]:
        lines.append(f"wrote {path}")
    return "\n".join(lines)


def _relative(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"
