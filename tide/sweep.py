"""Capacity-planning sweeps: the planner and the simulator over models x hardware x GPU memory x policies.

A sweep point is one (model, hardware profile, GPU memory budget, policy). For ``tide``
the planner chooses per-layer slot budgets and intervals on a profiling trace, and the
simulator replays the scored trace under that plan. Every other policy gets the slots per
MoE layer that the same memory budget leaves room for (``tide.memory.plan_memory``), and
``static`` picks its hot sets from the profiling trace. Scoring on a trace that neither
the planner nor the static policy saw keeps both honest: a synthetic sweep scores seed
``seed`` and profiles on seed ``seed + PROFILE_SEED_OFFSET`` of the same generator.

Points run in local worker processes (``concurrent.futures``) or as Ray tasks. The driver
writes each finished point to ``OUT/points/<key>.json`` atomically, together with the
settings that produced it, so a rerun of an interrupted sweep reuses every finished
point whose settings match. ``write_outputs`` then writes the table (CSV and JSON) and
plotly figures of the whole grid.

Public API: ``make_config``, ``SweepConfig``, ``TraceSource``, ``SweepPoint``,
``run_sweep``, ``run_point``, ``speedup_rows``, ``write_outputs``; the figures are in
``tide.sweep_figures``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from tide import __version__
from tide.errors import InputError, TideError
from tide.io import write_text_atomic

logger = logging.getLogger(__name__)

# Policies a sweep runs by default, in table order. ``oracle`` needs a MILP over the whole
# trace per point and is not a sweep policy.
SWEEP_POLICIES = ("tide", "every-step", "static", "lru-fetch", "cpu-experts", "all-gpu")
# The offloading baselines that ``tide`` is compared with. ``all-gpu`` is the no-offload
# upper bound, so it is shown but never counted as a baseline.
BASELINES = ("every-step", "static", "lru-fetch", "cpu-experts")
DEFAULT_GEN_TOKENS = 256
GIB = 1 << 30

# Columns of results.csv, in order; lists are joined with ';'.
CSV_COLUMNS = ("model", "hardware", "gpu_memory_gib", "gpu_memory_bytes", "policy", "status", "tokens_per_s",
               "hit_rate", "slots_per_layer", "slot_budget_min", "slot_budget_max", "slot_budget_mean",
               "intervals", "total_s", "tokens", "h2d_bytes", "d2h_bytes", "expert_copies", "critical_lane",
               "predicted_tokens_per_s", "plan_s", "simulate_s", "reason")


@dataclass(frozen=True)
class TraceSource:
    """The source of each model's scored trace and profiling trace.

    With ``trace_path`` every point replays that recorded trace, and the planner and the
    static policy profile on ``profile_trace_path`` (the scored trace itself when that is
    None, which flatters both). Without it, each model gets a synthetic trace of
    ``gen_tokens`` tokens drawn with ``seed``, profiled on the same generator's
    ``seed + PROFILE_SEED_OFFSET``.
    """

    trace_path: str | None = None
    profile_trace_path: str | None = None
    gen_tokens: int = DEFAULT_GEN_TOKENS
    seed: int = 0
    # Content hashes of the trace files, so a resumed sweep notices a changed file.
    trace_sha256: str | None = None
    profile_trace_sha256: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        if self.trace_path is None:
            return {"synthetic": True, "gen_tokens": self.gen_tokens, "seed": self.seed}
        return {"trace_sha256": self.trace_sha256, "profile_trace_sha256": self.profile_trace_sha256}


@dataclass(frozen=True)
class SweepPoint:
    model: str  # a spec name or path, as given
    hardware: str  # a profile name or path, as given
    gpu_memory_bytes: int
    policy: str

    @property
    def key(self) -> str:
        """File stem of the point's result: readable, unique within a sweep, safe on any file system."""
        parts = (Path(self.model).stem if "/" in self.model else self.model,
                 Path(self.hardware).stem if "/" in self.hardware else self.hardware,
                 memory_label(self.gpu_memory_bytes), self.policy)
        return "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in parts)


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[str, ...]
    hardware: tuple[str, ...]
    gpu_memory_bytes: tuple[int, ...]
    policies: tuple[str, ...] = SWEEP_POLICIES
    traces: TraceSource = field(default_factory=TraceSource)
    solver: str = "cbc"
    time_limit_s: float = 60.0

    def points(self) -> list[SweepPoint]:
        return [SweepPoint(model, hardware, memory, policy) for model in self.models for hardware in self.hardware
                for memory in self.gpu_memory_bytes for policy in self.policies]

    def fingerprint(self) -> dict[str, Any]:
        """Return every setting besides the point itself that a result depends on.

        The solver's time limit is not one, because the planner accepts only proven
        optimal solutions. So a rerun with a larger limit retries the points that ran out
        of time and keeps the others.
        """
        return {"traces": self.traces.fingerprint(), "solver": self.solver, "tide_version": __version__}


def memory_label(num_bytes: int) -> str:
    """Return a memory size as whole GiB or MiB when it is one, else in bytes: 24GiB, 17MiB, 1000B."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if num_bytes % size == 0:
            return f"{num_bytes // size}{unit}"
    return f"{num_bytes}B"


def make_config(models: Sequence[str], hardware: Sequence[str], gpu_memory_bytes: Sequence[int], *,
                policies: Sequence[str] = SWEEP_POLICIES, trace_path: str | None = None,
                profile_trace_path: str | None = None, gen_tokens: int = DEFAULT_GEN_TOKENS, seed: int = 0,
                solver: str = "cbc", time_limit_s: float = 60.0) -> SweepConfig:
    """Check the grid and build its config. Raises InputError naming the first bad value."""
    from tide.hardware import load_profile
    from tide.planner import SOLVERS
    from tide.spec import load_spec
    from tide.trace import TraceReader, check_trace_matches_spec

    for name, values in (("--models", models), ("--hardware", hardware), ("--gpu-memory", gpu_memory_bytes),
                         ("--policies", policies)):
        if not values:
            raise InputError("needs at least one value", field=name, value="")
        if len(set(values)) != len(values):
            raise InputError("lists a value twice", field=name, value=",".join(map(str, values)))
    for policy in policies:
        if policy not in SWEEP_POLICIES:
            reason = ("the oracle needs a MILP over the whole trace per point; run 'tide plan --oracle' for it"
                      if policy == "oracle" else "unknown policy")
            raise InputError(reason, field="--policies", value=policy, accepted=", ".join(SWEEP_POLICIES))
    for memory in gpu_memory_bytes:
        if memory <= 0:
            raise InputError("must be positive", field="--gpu-memory", value=memory)
    if gen_tokens < 1:
        raise InputError("must be at least 1", field="--gen-tokens", value=gen_tokens)
    if seed < 0:
        raise InputError("must not be negative", field="--seed", value=seed)
    if solver not in SOLVERS:
        raise InputError("unknown solver", field="--solver", value=solver, accepted=", ".join(SOLVERS))
    if time_limit_s <= 0:
        raise InputError("must be positive", field="--time-limit", value=time_limit_s)
    for name in hardware:
        load_profile(name)
    specs = [load_spec(model) for model in models]

    trace_sha256 = profile_sha256 = None
    if trace_path is not None:
        for path in filter(None, (trace_path, profile_trace_path)):
            reader = TraceReader(path)
            for spec in specs:
                check_trace_matches_spec(reader.metadata, spec, source=path)
        trace_sha256 = _file_sha256(trace_path)
        profile_sha256 = _file_sha256(profile_trace_path) if profile_trace_path else None
    elif profile_trace_path is not None:
        raise InputError("a profiling trace needs a recorded trace to score; synthetic sweeps draw their own",
                         field="--profile-trace", value=profile_trace_path, accepted="--trace PATH with it")
    source = TraceSource(trace_path=trace_path, profile_trace_path=profile_trace_path, gen_tokens=gen_tokens,
                         seed=seed, trace_sha256=trace_sha256, profile_trace_sha256=profile_sha256)
    return SweepConfig(models=tuple(models), hardware=tuple(hardware), gpu_memory_bytes=tuple(gpu_memory_bytes),
                       policies=tuple(policies), traces=source, solver=solver, time_limit_s=time_limit_s)


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# One point


@lru_cache(maxsize=8)
def _model_traces(model: str, source: TraceSource):
    """Return (spec, scored trace, profiling trace) for a model; cached per worker process."""
    from tide.spec import load_spec
    from tide.synth import profiling_trace_for, synthesize_trace
    from tide.trace import load_trace

    spec = load_spec(model)
    if source.trace_path is not None:
        trace = load_trace(source.trace_path)
        if source.profile_trace_path is None:
            logger.warning("the planner and the static policy profile on the scored trace %s itself, which no "
                           "real deployment could know in advance", source.trace_path)
            return spec, trace, trace
        return spec, trace, load_trace(source.profile_trace_path)
    trace = synthesize_trace(spec, gen_tokens=source.gen_tokens, seed=source.seed)
    return spec, trace, profiling_trace_for(trace, spec)


def run_point(point: SweepPoint, config: SweepConfig) -> dict[str, Any]:
    """Plan (for tide) and simulate one point; return its result row.

    Some points cannot run: a budget larger than the device or too small for the
    non-expert weights, all-gpu without room for every expert, or a case the planner does
    not implement. Those return status "skipped" with the reason. Other errors propagate.
    """
    from sim import simulate
    from tide.hardware import load_profile
    from tide.memory import plan_memory
    from tide.planner import plan
    from tide.policies import make_plan

    spec, trace, profile_trace = _model_traces(point.model, config.traces)
    profile = load_profile(point.hardware)
    began = time.perf_counter()
    row: dict[str, Any] = {
        "key": point.key, "model": spec.name, "hardware": profile.name,
        "gpu_memory_gib": point.gpu_memory_bytes / GIB, "gpu_memory_bytes": point.gpu_memory_bytes,
        "policy": point.policy, "status": "ok", "reason": None, "settings": config.fingerprint(),
    }
    try:
        memory = plan_memory(spec, point.gpu_memory_bytes, device_memory_bytes=int(profile.gpu.memory_bytes))
        row["slots_per_layer"] = memory.slots_per_layer
        if point.policy == "tide":
            result = plan(spec, profile, point.gpu_memory_bytes, profile_trace, solver=config.solver,
                          time_limit_s=config.time_limit_s)
            chosen = result.plan
            row["predicted_tokens_per_s"] = result.prediction.tokens_per_s
        elif point.policy == "all-gpu" and memory.slots_per_layer < spec.num_experts:
            raise InputError(f"all-gpu needs all {spec.num_experts} experts of every MoE layer resident, but "
                             f"the budget leaves room for {memory.slots_per_layer} slots per layer",
                             field="gpu_memory")
        else:
            chosen = make_plan(point.policy, spec, slot_budget=memory.slots_per_layer,
                               profiling_trace=profile_trace, provenance={"source": "tide sweep"})
    except (InputError, NotImplementedError) as error:
        # NotImplementedError: a known gap, such as planning on a profile whose GPU and CPU
        # lanes share cores, which no rerun can fix.
        row.update(status="skipped", reason=str(error))
        logger.info("point %s skipped: %s", point.key, error)
        return row
    row["plan_s"] = time.perf_counter() - began  # the planner's MILP for tide, make_plan for the others

    simulated_at = time.perf_counter()
    simulated = simulate(spec, profile, chosen, trace)
    row["simulate_s"] = time.perf_counter() - simulated_at
    budgets = chosen.slot_budgets
    row.update({
        "tokens_per_s": simulated.tokens_per_s,
        "hit_rate": simulated.hit_rate,
        "total_s": simulated.total_s,
        "tokens": simulated.tokens,
        "h2d_bytes": simulated.h2d_bytes,
        "d2h_bytes": simulated.d2h_bytes,
        "expert_copies": simulated.expert_copies,
        "critical_lane": simulated.critical_lane,
        "slot_budget_min": min(budgets),
        "slot_budget_max": max(budgets),
        "slot_budget_mean": sum(budgets) / len(budgets),
        "intervals": sorted(set(chosen.intervals)) if chosen.policy in ("tide", "every-step") else [],
        "plan_policy": chosen.policy,
    })
    logger.info("point %s: %.4g tokens/s, hit rate %.4f, %.1f s", point.key, simulated.tokens_per_s,
                simulated.hit_rate, time.perf_counter() - began)
    return row


# ---------------------------------------------------------------------------------------
# The grid


@dataclass
class SweepOutcome:
    """Rows of every point of the grid that has a result, and what this run did."""

    rows: list[dict[str, Any]]
    computed: int
    reused: int
    failed: dict[str, str]  # point key -> error


def point_path(out_dir: str | os.PathLike, point: SweepPoint) -> Path:
    return Path(out_dir) / "points" / f"{point.key}.json"


def load_finished(out_dir: str | os.PathLike, point: SweepPoint, config: SweepConfig) -> dict[str, Any] | None:
    """Return the stored result of ``point`` when it exists and was made with the same settings."""
    path = point_path(out_dir, point)
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("recomputing point %s: its result file %s cannot be read (%s)", point.key, path, error)
        return None
    if row.get("settings") != config.fingerprint():
        logger.info("recomputing point %s: its result was made with other settings", point.key)
        return None
    return row


def run_sweep(config: SweepConfig, out_dir: str | os.PathLike, *, workers: int | None = None, use_ray: bool = False,
              ray_address: str | None = None,
              on_point: Callable[[SweepPoint, dict[str, Any] | None], None] | None = None) -> SweepOutcome:
    """Run every point of the grid that has no stored result, storing each as it finishes.

    ``workers`` local processes run the points (default: one per CPU core, at most one
    per point; 1 runs them in this process). ``use_ray`` runs them as Ray tasks instead,
    on the cluster at ``ray_address``. Without an address, Ray starts a local instance
    unless RAY_ADDRESS names a cluster or this process already joined one. A point that
    raises is logged and reported in ``failed``, and the others go on. ``on_point`` is
    called with each point and its row (None when it failed), in completion order.
    """
    points = config.points()
    rows: dict[SweepPoint, dict[str, Any]] = {}
    pending = []
    for point in points:
        row = load_finished(out_dir, point, config)
        if row is None:
            pending.append(point)
        else:
            rows[point] = row
    reused = len(rows)
    logger.info("sweep of %d points: %d stored, %d to run", len(points), reused, len(pending))

    failed: dict[str, str] = {}

    def finish(point: SweepPoint, row: dict[str, Any] | None, error: BaseException | None) -> None:
        if row is not None:
            write_text_atomic(point_path(out_dir, point), json.dumps(row, indent=1, default=_json_default) + "\n")
            rows[point] = row
        else:
            logger.error("point %s failed: %s", point.key, error)
            failed[point.key] = f"{type(error).__name__}: {error}"
        if on_point is not None:
            on_point(point, row)

    if pending:
        if use_ray:
            _run_ray(pending, config, ray_address, finish)
        elif (workers or 0) == 1:
            for point in pending:
                try:
                    row = run_point(point, config)
                except Exception as error:  # noqa: BLE001 - reported per point, the sweep goes on
                    finish(point, None, error)
                else:
                    finish(point, row, None)
        else:
            _run_processes(pending, config, workers, finish)

    ordered = [rows[point] for point in points if point in rows]
    return SweepOutcome(rows=ordered, computed=len(rows) - reused, reused=reused, failed=failed)


def _run_processes(pending: list[SweepPoint], config: SweepConfig, workers: int | None, finish) -> None:
    count = workers or min(os.cpu_count() or 1, len(pending))
    if count < 1:
        raise InputError("must be at least 1", field="--workers", value=count)
    # spawn, not fork: a forked child would inherit the parent's threads and locks.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
        futures = {pool.submit(run_point, point, config): point for point in pending}
        try:
            for future in concurrent.futures.as_completed(futures):
                point = futures[future]
                try:
                    row = future.result()
                except Exception as error:  # noqa: BLE001 - reported per point, the sweep goes on
                    finish(point, None, error)
                else:
                    finish(point, row, None)
        except BaseException:
            # Interrupted: finished points are stored, so drop the queued ones and leave.
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _run_ray(pending: list[SweepPoint], config: SweepConfig, address: str | None, finish) -> None:
    try:
        import ray
    except ImportError:
        raise InputError("Ray is not installed", field="--ray", value=address or "",
                         accepted="pip install 'tide-moe[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING)
        started = True
    try:
        remote = ray.remote(num_cpus=1)(run_point)
        config_ref = ray.put(config)
        refs = {remote.remote(point, config_ref): point for point in pending}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                point = refs.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - reported per point, the sweep goes on
                    finish(point, None, error)
                else:
                    finish(point, row, None)
    finally:
        if started:
            ray.shutdown()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} as JSON")


# ---------------------------------------------------------------------------------------
# Table and figures


def speedup_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return tide's speedup over each baseline and over the best one, per (model, hardware, memory).

    Only points that ran count. A group without a tide row, or without any baseline that
    ran, gives no row.
    """
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault((row["model"], row["hardware"], row["gpu_memory_bytes"]), {})[row["policy"]] = row
    result = []
    for (model, hardware, memory), by_policy in groups.items():
        tide = by_policy.get("tide")
        baselines = {name: by_policy[name]["tokens_per_s"] for name in BASELINES if name in by_policy}
        if tide is None or not baselines:
            continue
        best = max(baselines, key=lambda name: (baselines[name], name))
        entry: dict[str, Any] = {
            "model": model, "hardware": hardware, "gpu_memory_gib": memory / GIB, "gpu_memory_bytes": memory,
            "tide_tokens_per_s": tide["tokens_per_s"], "tide_plan": tide.get("plan_policy", "tide"),
            "best_baseline": best, "best_baseline_tokens_per_s": baselines[best],
            "speedup_over_best": _ratio(tide["tokens_per_s"], baselines[best]),
        }
        for name in BASELINES:
            entry[f"speedup_over_{name}"] = _ratio(tide["tokens_per_s"], baselines[name]) if name in baselines \
                else None
        result.append(entry)
    return result


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


def write_outputs(config: SweepConfig, outcome: SweepOutcome, out_dir: str | os.PathLike) -> list[str]:
    """Write results.csv, speedup.csv, results.json, throughput.html and speedup.html; return their paths."""
    out = Path(out_dir)
    speedups = speedup_rows(outcome.rows)
    written = []

    path = out / "results.csv"
    write_text_atomic(path, _csv(outcome.rows, CSV_COLUMNS))
    written.append(str(path))
    path = out / "speedup.csv"
    speedup_columns = ("model", "hardware", "gpu_memory_gib", "gpu_memory_bytes", "tide_tokens_per_s", "tide_plan",
                       "best_baseline", "best_baseline_tokens_per_s", "speedup_over_best") \
        + tuple(f"speedup_over_{name}" for name in BASELINES)
    write_text_atomic(path, _csv(speedups, speedup_columns))
    written.append(str(path))
    path = out / "results.json"
    document = {
        "grid": {"models": list(config.models), "hardware": list(config.hardware),
                 "gpu_memory_bytes": list(config.gpu_memory_bytes), "policies": list(config.policies)},
        "settings": config.fingerprint(),
        "points": outcome.rows,
        "speedups": speedups,
        "failed": outcome.failed,
    }
    write_text_atomic(path, json.dumps(document, indent=1, default=_json_default) + "\n")
    written.append(str(path))

    from tide.sweep_figures import speedup_figure, throughput_figure

    for name, figure in (("throughput.html", throughput_figure(outcome.rows)),
                         ("speedup.html", speedup_figure(speedups))):
        path = out / name
        write_text_atomic(path, figure.to_html(include_plotlyjs=True, full_html=True))
        written.append(str(path))
    return written


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: ";".join(map(str, value)) if isinstance(value, list) else value
                         for name, value in row.items()})
    return buffer.getvalue()


def check_outcome(outcome: SweepOutcome) -> None:
    """Raise TideError listing the failed points, if any."""
    if outcome.failed:
        listed = "; ".join(f"{key}: {error}" for key, error in sorted(outcome.failed.items()))
        raise TideError(f"{len(outcome.failed)} sweep points failed and were not stored (rerun to retry them): "
                        f"{listed}")


__all__ = ["BASELINES", "SWEEP_POLICIES", "SweepConfig", "SweepOutcome", "SweepPoint", "TraceSource",
           "check_outcome", "make_config", "run_point", "run_sweep", "speedup_rows", "write_outputs"]
