"""``tide sweep``: the planner and the simulator over a grid of models, GPUs, memory budgets and policies."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from tide.cli.common import add_json_flag, emit, format_table, progress
from tide.errors import InputError
from tide.planner import SOLVERS
from tide.sweep import (DEFAULT_GEN_TOKENS, SWEEP_POLICIES, check_outcome, make_config, run_sweep, speedup_rows,
                        write_outputs)
from tide.synth import PROFILE_SEED_OFFSET
from tide.units import format_bytes, parse_size

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help="predict throughput over models x GPUs x memory budgets x policies",
        description="For every point of the grid, choose the tide plan with the planner and replay a trace "
                    "under each policy on the simulator. Writes results.csv, speedup.csv and results.json "
                    "(one row per point, and tide's speedup over each baseline), throughput.html and "
                    "speedup.html, and one result file per point under OUT/points/. A rerun with the same "
                    "settings reuses the stored points, so an interrupted sweep resumes where it stopped.")
    parser.add_argument("--models", required=True, metavar="SPEC,...",
                        help="comma-separated model specs: shipped names or config.json paths")
    parser.add_argument("--hardware", required=True, metavar="NAME,...",
                        help="comma-separated hardware profiles: shipped names (see 'tide hw list') or JSON paths")
    parser.add_argument("--gpu-memory", required=True, metavar="SIZE,...",
                        help="comma-separated GPU memory budgets, e.g. 16GiB,24GiB; a budget larger than a GPU "
                             "or too small for a model's non-expert weights is recorded as skipped")
    parser.add_argument("--policies", default=",".join(SWEEP_POLICIES), metavar="NAME,...",
                        help=f"comma-separated policies (default: {','.join(SWEEP_POLICIES)})")

    traces = parser.add_mutually_exclusive_group()
    traces.add_argument("--trace", default=None, metavar="PATH",
                        help="replay this recorded trace at every point (every model must match it)")
    traces.add_argument("--synthetic", action="store_true",
                        help="replay a synthetic trace per model, drawn from the spec's statistics (the default)")
    parser.add_argument("--profile-trace", default=None, metavar="PATH",
                        help="with --trace: the trace the planner and the static policy profile on (default: "
                             "the replayed trace itself, which flatters both)")
    parser.add_argument("--gen-tokens", type=int, default=DEFAULT_GEN_TOKENS, metavar="N",
                        help=f"generated tokens of each synthetic trace (default: {DEFAULT_GEN_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the synthetic trace that is replayed; the planner and the static policy "
                             f"profile on seed N + {PROFILE_SEED_OFFSET} (default: 0)")

    parser.add_argument("--solver", default="cbc", choices=SOLVERS, help="MILP solver of the planner (default: cbc)")
    parser.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS",
                        help="planner's solver time limit per program (default: 60)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="local worker processes (default: one per CPU core; 1 runs in this process)")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run the points as Ray tasks on the cluster at ADDRESS; without ADDRESS, Ray starts "
                             "a local instance unless RAY_ADDRESS is set (needs the 'ray' extra)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the table, figures and point files")
    add_json_flag(parser)
    parser.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise InputError("must be at least 1", field="--workers", value=args.workers)
    if args.ray is not None and args.workers is not None:
        raise InputError("Ray schedules the points itself, so --workers does not apply", field="--workers",
                         value=args.workers, accepted="--workers or --ray, not both")
    memories = [parse_size(text, field="--gpu-memory") for text in _split(args.gpu_memory, "--gpu-memory")]
    config = make_config(_split(args.models, "--models"), _split(args.hardware, "--hardware"), memories,
                         policies=_split(args.policies, "--policies"), trace_path=args.trace,
                         profile_trace_path=args.profile_trace, gen_tokens=args.gen_tokens, seed=args.seed,
                         solver=args.solver, time_limit_s=args.time_limit)

    began = time.perf_counter()
    points = config.points()
    with progress(len(points), "sweep points", unit="point") as bar:
        outcome = run_sweep(config, args.out, workers=args.workers, use_ray=args.ray is not None,
                            ray_address=args.ray or None, on_point=lambda point, row: bar.update(1))
    written = write_outputs(config, outcome, args.out)
    logger.info("sweep of %d points took %.1f s", len(points), time.perf_counter() - began)

    speedups = speedup_rows(outcome.rows)
    skipped = {row["key"]: row["reason"] for row in outcome.rows if row["status"] == "skipped"}
    output: dict[str, Any] = {
        "out": args.out,
        "num_points": len(points),
        "computed": outcome.computed,
        "reused": outcome.reused,
        "skipped": skipped,
        "failed": outcome.failed,
        "speedups": speedups,
        "written": written,
    }
    emit(output, _human(output), args.json)
    check_outcome(outcome)
    return 0


def _split(text: str, field: str) -> list[str]:
    values = [value.strip() for value in text.split(",")]
    if not all(values):
        raise InputError("has an empty entry", field=field, value=text, accepted="comma-separated values")
    return values


def _human(output: dict[str, Any]) -> str:
    lines = [f"{output['num_points']} points: {output['computed']} simulated, {output['reused']} reused from "
             f"{output['out']}/points, {len(output['skipped'])} skipped, {len(output['failed'])} failed"]
    rows = [[row["model"], row["hardware"], format_bytes(row["gpu_memory_bytes"]), row["tide_tokens_per_s"],
             row["best_baseline"], row["best_baseline_tokens_per_s"], f"{row['speedup_over_best']:.3f}x"]
            for row in output["speedups"]]
    if rows:
        lines += ["", format_table(rows, ["model", "hardware", "GPU memory", "tide tokens/s", "best baseline",
                                          "baseline tokens/s", "speedup"])]
    # Points skipped for the same reason (a budget larger than the GPU skips every policy)
    # share one line.
    by_reason: dict[str, list[str]] = {}
    for key, reason in output["skipped"].items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        lines.append(f"skipped {', '.join(keys)}: {reason}")
    for path in output["written"]:
        lines.append(f"wrote {path}")
    return "\n".join(lines)
