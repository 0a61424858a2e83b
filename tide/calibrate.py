"""Calibration: measure the executor's ops on the machine at hand and build a calibrated profile.

The profile's tables feed ``tide.costs.CostModel`` directly, so a simulation with it
predicts the executor on this machine, for one model shape. A table point is measured in
two parts:

1. **Work.** Each op kind's work function in the offload engine (``executor.engine``) runs
   at controlled sizes, through the lane wrapper that records the engine's timeline
   (``SerialLanes`` on the CPU device, CUDA events on a GPU). Warm-up runs are discarded,
   and a point is the median of the repeats that follow. Expert kinds run with one expert
   of x tokens, and once with ``top_k`` such experts, which separates the fixed cost of an
   op from the cost of each expert in it.
2. **Engine overhead in place.** The engine then generates a short text under the
   policies of ``CALIBRATION_POLICIES``, which run every op kind. For each op kind, the gap between its measured spans and what the
   work tables predict is fitted as a constant per op plus, for expert kinds, a constant
   per expert, and added to the tables. This gap is the engine's own Python work between
   ops (dispatch, bookkeeping, and for a router the lowering of its layer), plus the cost
   of cold caches in a real pass.

The profile also records the copy bandwidth in both directions, pinned and pageable, the
device's matmul rate and memory bandwidth, the device and library names and the thread
count.

On the CPU device the accelerator lane and the CPU lane run on the same cores. The
executor then runs every op one at a time (``executor.lanes.SerialLanes``), the profile
sets ``shared_cores: true``, and the simulator runs each pass's ops one at a time in
schedule order. Two cores cannot run two lanes in parallel without each slowing the other
by an amount that depends on what runs beside it, and no lane model can predict that.

Calibration needs torch and the executor, which are imported when it runs, so ``tide``
stays importable without them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

import tide
from tide.errors import InputError
from tide.hardware import (COPY_KINDS, EXPERT_KINDS, TABLE_X_NAMES, CalibrationTable, CpuSpec, GpuSpec,
                           HardwareProfile, HostLink, Provenance)
from tide.ir import LANES, OP_LANES, ForwardInfo, Op

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")

# The prompt of the engine runs of step 2, code of about the length of a HumanEval prompt.
# It is long enough for a prefill pass with the embedded model's byte-level tokenizer, and
# it is not one of the prompts that validation uses by default.
CALIBRATION_PROMPTS = (
    "import math\n\n\ndef mean(values: list[float]) -> float:\n"
    "    \"\"\" Return the arithmetic mean of a non-empty list of numbers.\n"
    "    >>> mean([1.0, 2.0, 3.0])\n    2.0\n    \"\"\"\n    return sum(values) / len(values)\n\n\n"
    "def variance(values: list[float]) -> float:\n"
    "    \"\"\" Return the population variance of a non-empty list of numbers.\n"
    "    >>> variance([1.0, 2.0, 3.0])\n    0.6666666666666666\n    \"\"\"\n",
)
# The policies of the engine runs of step 2. Together they run every op kind: resident
# experts only (all-gpu), copies with CPU work (tide), copies with fetched experts
# (lru-fetch) and CPU work only (cpu-experts). every-step and static run the same kinds in
# between those mixes.
CALIBRATION_POLICIES = ("all-gpu", "tide", "lru-fetch", "cpu-experts")
# Kinds whose in-place correction also gets a constant per op: the one kind of the CPU
# lane, whose ops range from one expert to all of them. Other kinds share their lane's
# overhead with kinds whose smallest op is below it, so they get a factor only.
OFFSET_KINDS = ("cpu_experts",)


@dataclass(frozen=True)
class CalibrationSettings:
    """Sizes and repeat counts of a calibration.

    ``token_points`` are the x values of tokens tables and of tokens-per-expert tables.
    Attention is measured at ``block_length`` tokens against ``context_points`` and below
    that at tokens = context. ``copy_expert_counts`` are copy sizes in whole experts.
    """

    token_points: tuple[int, ...]
    context_points: tuple[int, ...]
    copy_expert_counts: tuple[int, ...]
    link_sizes_bytes: tuple[int, ...]
    warmup: int
    repeats: int
    engine_gen_tokens: int
    engine_repeats: int


QUICK = CalibrationSettings(
    token_points=(1, 4, 16, 32, 64, 128, 256, 512),
    context_points=(32, 64, 128, 256, 512, 1024),
    copy_expert_counts=(1, 2, 4, 8),
    link_sizes_bytes=(1 << 20, 16 << 20),
    warmup=3,
    repeats=9,
    engine_gen_tokens=32,
    engine_repeats=5,
)
FULL = CalibrationSettings(
    token_points=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
    context_points=(32, 64, 128, 256, 512, 1024, 2048, 4096),
    copy_expert_counts=(1, 2, 4, 8, 16),
    link_sizes_bytes=(1 << 20, 16 << 20, 64 << 20),
    warmup=5,
    repeats=21,
    engine_gen_tokens=64,
    engine_repeats=5,
)


@dataclass
class Calibration:
    """A calibrated profile and the measurements behind it (JSON-ready)."""

    profile: HardwareProfile
    measurements: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# Threads and devices


def default_threads(device: str) -> int:
    """Return the intra-op thread count of a calibration that is given none.

    On the CPU device, 1. The executor runs one op at a time there, and an op on a model
    small enough for a development machine gains little from more threads. The main reason
    is stability: OpenMP threads wait for each other at every barrier, so when another
    process takes one of the cores, an op with two threads can run ten times slower (seen
    on a 2-core machine). On a CUDA device, PyTorch's default.
    """
    import torch

    return 1 if device == "cpu" else torch.get_num_threads()


def set_threads(threads: int) -> None:
    """Set PyTorch's intra-op threads for this thread; the executor's worker pools copy it."""
    import torch

    if threads < 1:
        raise InputError("must be at least 1", field="threads", value=threads)
    torch.set_num_threads(threads)


def resolve_device(device: str | None) -> str:
    """Return ``cuda`` or ``cpu``: the one asked for (checked) or CUDA when there is one."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise InputError("unknown device", field="device", value=device, accepted=", ".join(DEVICES))
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA is not available on this machine", field="device", value=device, accepted="cpu")
    return device


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ----------------------------------------------------------------------------------------
# Timing through the engine's lanes


class _Timer:
    """Median duration of one op run alone through the engine's lane wrapper."""

    def __init__(self, lanes, warmup: int, repeats: int) -> None:
        self.lanes = lanes
        self.warmup = warmup
        self.repeats = repeats

    def median_s(self, op: Op, work: Callable[[], None], setup: Callable[[], None] | None = None) -> float:
        from tide.runs import garbage_collector_paused

        durations = []
        with garbage_collector_paused():
            for i in range(self.warmup + self.repeats):
                if setup is not None:
                    setup()
                self.lanes.begin_forward()
                self.lanes.run(op, work)
                ((_, start_s, end_s),) = self.lanes.finish_forward()
                if i >= self.warmup:
                    durations.append(end_s - start_s)
        return statistics.median(durations)


def _bench_op(kind: str, layer: int = -1, **values) -> Op:
    return Op(f"calibrate.{kind}", kind, OP_LANES[kind], (), layer, **values)


@contextlib.contextmanager
def _forced_routing(gate, ids, weights) -> Iterator[None]:
    """Make ``gate`` return the given expert ids and weights, so a benchmark controls tokens per expert."""
    gate.forward = lambda x: (ids[: x.shape[0]], weights[: x.shape[0]])
    try:
        yield
    finally:
        del gate.forward


class _Bench:
    """States of the offload engine at chosen sizes, for timing its ops one at a time.

    It drives the engine's own op implementations (``OffloadEngine._work`` and the methods
    behind it), so what it measures is what the engine runs.
    """

    def __init__(self, model, spec, device: str, settings: CalibrationSettings, block_length: int) -> None:
        import torch

        from executor.engine import OffloadEngine
        from tide.ir import Plan

        self.torch = torch
        self.spec = spec
        self.model = model
        self.device = torch.device(device)
        self.block_length = block_length
        self.top_k = spec.top_k
        self.layer = spec.moe_layers[0]
        self.moe_index = 0
        # A static plan keeps experts 0..K-1 resident in every MoE layer from load time on.
        resident = tuple(range(spec.top_k))
        num_layers = spec.num_moe_layers
        plan = Plan(policy="static", slot_budgets=(spec.top_k,) * num_layers, intervals=(1,) * num_layers,
                    miss_service=("cpu",) * num_layers, static_sets=(resident,) * num_layers,
                    spec_name=spec.name, spec_hash=spec.config_hash)
        # record_timeline makes the serial lanes time each op, as in the measured runs that
        # validation compares with. The timer runs ops through the lanes, not engine.forward,
        # so no spans pile up.
        self.engine = OffloadEngine(model, plan, spec, device=self.device, record_trace=False,
                                    record_timeline=True)
        self.timer = _Timer(self.engine.lanes, settings.warmup, settings.repeats)
        self.generator = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        self.safe_vocab = min(vocab, 256)
        gate = model.model.layers[self.layer].mlp.gate
        self.gate = gate
        max_tokens = max(settings.token_points)
        forced = torch.arange(spec.top_k, device=self.device).repeat(max_tokens, 1)
        self.forced_ids = forced
        self.forced_weights = torch.full((max_tokens, spec.top_k), 1.0 / spec.top_k, dtype=torch.float32,
                                         device=self.device)

    def close(self) -> None:
        self.engine.close()

    # --- states ---------------------------------------------------------------------

    def new_pass(self, tokens: int, context: int):
        """Return an engine pass state after ``embed``: ``tokens`` fed, ``context`` attended to."""
        from executor.engine import _Pass
        from executor.generate import block_causal_mask

        torch = self.torch
        info = ForwardInfo(index=0, kind="denoise", num_tokens=tokens, context_tokens=context)
        input_ids = torch.randint(0, self.safe_vocab, (1, tokens), generator=self.generator).to(self.device)
        position_ids = torch.arange(context - tokens, context, device=self.device)[None]
        # Like generation: one block at the end needs no mask; a longer feed starts at 0.
        mask = None if tokens <= self.block_length else block_causal_mask(tokens, self.block_length, self.device)
        kv_cache = self.engine.new_kv_cache(context)
        for keys, values in zip(kv_cache.keys, kv_cache.values):
            keys.normal_()
            values.normal_()
        kv_cache.advance(context - tokens)
        state = _Pass(info, input_ids, position_ids, mask, kv_cache)
        self.engine._embed(state)
        return state

    def routed_pass(self, tokens: int):
        """Return a pass state after a router whose every token chose experts 0..K-1."""
        state = self.new_pass(tokens, tokens)
        with _forced_routing(self.gate, self.forced_ids, self.forced_weights):
            self.engine._router(self.layer, state)
        state.moe.outputs.normal_()
        return state

    def experts_op(self, kind: str, tokens: int, num_experts: int) -> Op:
        experts = tuple((e, tokens) for e in range(num_experts))
        return _bench_op(kind, self.layer, tokens=tokens * num_experts, experts=experts)

    def prepare_cpu(self, state, num_experts: int) -> Op:
        op = self.experts_op("cpu_experts", state.info.num_tokens, num_experts)
        state.moe.layer_ops = [op]
        self.engine._act_d2h(state.moe)
        return op

    # --- measurements ---------------------------------------------------------------

    def time_kind(self, kind: str, tokens: int, context: int | None = None) -> float:
        """Return the median seconds of one op of a kind that is not an expert kind."""
        engine = self.engine
        layer = 0 if kind == "dense_mlp" else self.layer
        if kind == "attention":
            state = self.new_pass(tokens, context or tokens)
        elif kind in ("shared_expert", "combine", "act_d2h", "act_h2d"):
            state = self.routed_pass(tokens)
        else:
            state = self.new_pass(tokens, tokens)
        op = _bench_op(kind, layer, tokens=tokens, context=context or tokens)
        hidden = state.hidden
        setup = None

        if kind in ("attention", "dense_mlp", "router", "head", "embed"):
            def setup() -> None:
                state.hidden = hidden
        elif kind == "shared_expert":
            pass
        elif kind == "combine":
            if self.spec.num_shared_experts:
                engine._shared_expert(self.layer, state.moe)
            moe = state.moe

            def setup() -> None:
                state.moe = moe
        elif kind == "act_d2h":
            self.prepare_cpu(state, 1)
        elif kind == "act_h2d":
            self.prepare_cpu(state, 1)
            engine._cpu_experts(state.moe)
        # The engine runs a router outside _work, because lowering needs its routing.
        work = partial(engine._router, self.layer, state) if kind == "router" else engine._work(op, state)
        return self.timer.median_s(op, work, setup)

    def time_experts(self, kind: str, tokens: int, num_experts: int) -> float:
        """Return the median seconds of an expert op with ``num_experts`` experts of ``tokens`` tokens each."""
        state = self.routed_pass(tokens)
        if kind == "cpu_experts":
            op = self.prepare_cpu(state, num_experts)
        else:
            op = self.experts_op(kind, tokens, num_experts)
        return self.timer.median_s(op, self.engine._work(op, state))

    def time_copy(self, kind: str, num_bytes: int, *, pinned: bool | None = None) -> float:
        """Return the median seconds of one copy of ``num_bytes`` in the direction of ``kind``'s lane.

        ``expert_copy`` copies whole experts from the engine's master copies into device
        memory, like the engine. The others copy between a host buffer (pinned when
        ``pinned``, else like the engine's) and the device.
        """
        torch = self.torch
        engine = self.engine
        op = _bench_op(kind, bytes=float(num_bytes))
        use_pinned = engine.pinned if pinned is None else pinned
        if kind == "expert_copy":
            master = engine.master[self.moe_index]
            count = num_bytes // (master.shape[1] * master.element_size())
            target = torch.empty(count, master.shape[1], dtype=master.dtype, device=self.device)
            source = master[:count]

            def work() -> None:
                target.copy_(source, non_blocking=engine.pinned)

            return self.timer.median_s(op, work)
        elements = max(1, num_bytes // 4)
        host = torch.empty(elements, dtype=torch.float32, pin_memory=use_pinned and self.device.type == "cuda")
        host.normal_()
        device_buffer = torch.empty(elements, dtype=torch.float32, device=self.device)
        device_buffer.normal_()
        if OP_LANES[kind] == "h2d":
            def work() -> None:
                device_buffer.copy_(host, non_blocking=use_pinned)
        else:
            def work() -> None:
                host.copy_(device_buffer, non_blocking=use_pinned)
        return self.timer.median_s(op, work)

    def time_empty_op(self, kind: str) -> float:
        return self.timer.median_s(_bench_op(kind), lambda: None)


# ----------------------------------------------------------------------------------------
# Tables


def monotone_points(xs, seconds) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Make measured points a valid table: a running maximum, and the last point above the one before.

    A larger op is never faster, so a dip is measurement noise. The cost model extends a
    table past its last point with the slope of the last two, which must be positive.
    """
    values = np.maximum.accumulate(np.asarray(seconds, dtype=float))
    if len(values) >= 2 and values[-1] <= values[-2]:
        values[-1] = values[-2] * 1.001
    return tuple(float(x) for x in xs), tuple(float(v) for v in values)


def _fixed_cost(single_s: list[float], multiple_s: list[float], count: int) -> float:
    """Return the fixed cost of an expert op from ops with 1 and ``count`` experts of the same tokens.

    With T1 = F + m and Tk = F + k * m, F = (k * T1 - Tk) / (k - 1). The median over token
    counts, kept within [0, smallest T1].
    """
    if count < 2 or not single_s:
        return 0.0
    estimates = [(count * one - many) / (count - 1) for one, many in zip(single_s, multiple_s)]
    return float(min(max(statistics.median(estimates), 0.0), min(single_s)))


def measure_work(bench: _Bench, spec, settings: CalibrationSettings,
                 step: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """Measure the work tables, the fixed cost of expert ops and of an empty op per lane."""
    block = bench.block_length
    tokens = settings.token_points
    tables: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}
    raw: dict[str, Any] = {}

    kinds = ["embed", "router", "combine", "head"]
    if spec.first_k_dense_replace > 0:
        kinds.append("dense_mlp")
    if spec.num_shared_experts:
        kinds.append("shared_expert")
    for kind in kinds:
        step(kind)
        seconds = [bench.time_kind(kind, t) for t in tokens]
        raw[kind] = {"x": list(tokens), "seconds": seconds}
        tables[kind] = monotone_points(tokens, seconds)

    # Attention's x is tokens x context, so shapes must be chosen along one line: tokens =
    # context up to one block (a first block), one block of tokens against a growing context
    # (denoising steps with the KV cache), then tokens = context past that (prefill passes).
    step("attention")
    denoise = [(block, c) for c in settings.context_points if c >= block]
    largest = block * max(c for _, c in denoise)
    shapes = [(t, t) for t in tokens if t < block] + denoise + [(t, t) for t in tokens if t * t > largest]
    seconds = [bench.time_kind("attention", t, c) for t, c in shapes]
    xs = [t * c for t, c in shapes]
    raw["attention"] = {"tokens": [t for t, _ in shapes], "context": [c for _, c in shapes], "x": xs,
                        "seconds": seconds}
    tables["attention"] = monotone_points(xs, seconds)

    # Expert kinds: one expert of t tokens, and K experts of t tokens for the fixed cost.
    fixed: dict[str, float] = {}
    for kind in ("gpu_experts", "cpu_experts"):
        step(kind)
        single = [bench.time_experts(kind, t, 1) for t in tokens]
        multiple = [bench.time_experts(kind, t, spec.top_k) for t in tokens]
        raw[kind] = {"x": list(tokens), "seconds": single, "seconds_top_k_experts": multiple}
        fixed[kind] = _fixed_cost(single, multiple, spec.top_k)
        tables[kind] = monotone_points(tokens, single)
    # gpu_expert runs the same function with one expert; only its overhead in place differs.
    tables["gpu_expert"] = tables["gpu_experts"]

    # Activation copies, sized like the lowering declares them: rows x hidden x element size.
    activation_bytes = spec.hidden_size * spec.dtype_bytes
    for kind in ("act_d2h", "act_h2d"):
        step(kind)
        seconds = [bench.time_kind(kind, t) for t in tokens]
        xs = [t * activation_bytes for t in tokens]
        raw[kind] = {"x": xs, "seconds": seconds}
        tables[kind] = monotone_points(xs, seconds)

    step("expert_copy")
    expert_bytes = spec.expert_bytes()
    counts = [n for n in settings.copy_expert_counts if n <= spec.num_experts]
    seconds = [bench.time_copy("expert_copy", n * expert_bytes) for n in counts]
    xs = [n * expert_bytes for n in counts]
    raw["expert_copy"] = {"x": xs, "seconds": seconds}
    tables["expert_copy"] = monotone_points(xs, seconds)

    empty = {lane: bench.time_empty_op(kind) for lane, kind in
             (("gpu", "combine"), ("h2d", "act_h2d"), ("d2h", "act_d2h"), ("cpu", "cpu_experts"))}
    return {"tables": tables, "raw": raw, "expert_fixed_s": fixed, "empty_op_s": empty}


def measure_link(bench: _Bench, settings: CalibrationSettings) -> dict[str, Any]:
    """Measure copy bandwidth each way, pinned and pageable, and the link latency.

    On the CPU device a copy is a memcpy between host buffers and pinning does not apply,
    so the pinned figures repeat the pageable ones.
    """
    sizes = settings.link_sizes_bytes
    results: dict[str, Any] = {}
    modes = (True, False) if bench.device.type == "cuda" else (False,)
    intercepts = []
    for kind, direction in (("act_h2d", "h2d"), ("act_d2h", "d2h")):
        for pinned in modes:
            seconds = [bench.time_copy(kind, size, pinned=pinned) for size in sizes]
            slope = (seconds[-1] - seconds[0]) / (sizes[-1] - sizes[0])
            bandwidth = 1.0 / slope if slope > 0 else sizes[-1] / seconds[-1]
            intercepts.append(seconds[0] - sizes[0] / bandwidth)
            name = f"{direction}_{'pinned' if pinned else 'pageable'}_bytes_per_s"
            results[name] = bandwidth
            results[f"{name}_points"] = {"bytes": list(sizes), "seconds": seconds}
    if bench.device.type != "cuda":
        for direction in ("h2d", "d2h"):
            results[f"{direction}_pinned_bytes_per_s"] = results[f"{direction}_pageable_bytes_per_s"]
    results["latency_s"] = max(0.0, statistics.median(intercepts))
    return results


def measure_device(bench: _Bench, settings: CalibrationSettings) -> dict[str, float]:
    """Measure the device's matmul rate in the model's dtype and its memory copy bandwidth."""
    torch = bench.torch
    dtype = bench.engine.dtype
    size = 1024 if bench.device.type == "cuda" else 256
    a = torch.randn(size, size, device=bench.device).to(dtype)
    b = torch.randn(size, size, device=bench.device).to(dtype)
    out = torch.empty(size, size, device=bench.device, dtype=dtype)
    matmul_s = bench.timer.median_s(_bench_op("gpu_experts"), lambda: torch.matmul(a, b, out=out))
    elements = max(settings.link_sizes_bytes) // 4
    source = torch.randn(elements, device=bench.device)
    target = torch.empty_like(source)
    copy_s = bench.timer.median_s(_bench_op("combine"), lambda: target.copy_(source))
    host_source = torch.randn(elements)
    host_target = torch.empty_like(host_source)
    host_copy_s = bench.timer.median_s(_bench_op("cpu_experts"), lambda: host_target.copy_(host_source))
    # A copy reads and writes every byte.
    return {"matmul_flops": 2.0 * size ** 3 / matmul_s, "matmul_size": size,
            "memory_bytes_per_s": 2.0 * elements * 4 / copy_s,
            "host_memory_bytes_per_s": 2.0 * elements * 4 / host_copy_s}


# ----------------------------------------------------------------------------------------
# The engine in place: generating text


def fit_correction(measured_s: Sequence[float], predicted_s: Sequence[float], *, offset: bool = False,
                   trim: float = 0.05) -> tuple[float, float]:
    """Fit measured = scale x predicted (+ offset) over ops; return (scale, offset_s).

    Without ``offset`` the scale is sum(measured) / sum(predicted), which makes the scaled
    predictions add up to the measured time, as pass times need. With it, least squares,
    falling back to the scale alone when the offset or the scale comes out negative.
    Either way the ops whose ratio lies in the lowest and highest ``trim`` fraction are left
    out first, so that a preempted op does not move the fit.
    """
    measured = np.asarray(measured_s, dtype=float)
    predicted = np.asarray(predicted_s, dtype=float)
    if len(measured) == 0:
        raise ValueError("no ops to fit a correction to")
    keep = np.ones(len(measured), dtype=bool)
    if len(measured) >= 20:
        ratios = measured / predicted
        low, high = np.quantile(ratios, [trim, 1.0 - trim])
        keep = (ratios >= low) & (ratios <= high)
    measured, predicted = measured[keep], predicted[keep]
    scale = float(measured.sum() / predicted.sum())
    if offset and len(measured) >= 3 and np.ptp(predicted) > 0:
        design = np.stack([predicted, np.ones_like(predicted)], axis=1)
        fitted_scale, fitted_offset = np.linalg.lstsq(design, measured, rcond=None)[0]
        if fitted_scale > 0 and fitted_offset >= 0:
            return float(fitted_scale), float(fitted_offset)
    return scale, 0.0


class EngineRuns:
    """The engine runs of step 2 (``CALIBRATION_POLICIES``) and the corrections fitted to them.

    ``run(policy)`` generates the calibration prompts once under a policy. Calling it
    ``repeats`` times per policy with the policies taking turns lets a change in the
    machine's load reach all of them, and validation interleaves these runs with its own
    for the same reason. ``fit(profile)`` then builds each policy's measured timeline as
    the composite that validation uses (``tide.validate.composite_timeline``) and fits,
    per op kind, the correction (``fit_correction``) that maps what ``profile``, the work
    tables, predicts for those ops to what they measured.
    """

    def __init__(self, runner, gen_tokens: int, prompts: Sequence[Any] | None = None) -> None:
        from executor.session import Prompt

        self.runner = runner
        self.spec = runner.spec
        self.gen_tokens = gen_tokens
        self.prompts = list(prompts) if prompts is not None else [
            Prompt(f"calibration-{i}", text) for i, text in enumerate(CALIBRATION_PROMPTS)]
        self.timelines: dict[str, list] = {}
        self.ops: dict[str, dict[str, Op]] = {}
        self.plans: dict[str, Any] = {}
        self.elapsed_s = 0.0  # wall time spent in runs
        # Slots, interval and memory budget of the runs (``tide.runs.Runner.run`` options). A
        # validation that interleaves its runs sets its own, so that both run the same.
        self.run_settings: dict[str, Any] = {}

    def run(self, policy: str) -> None:
        from tide.lowering import lower_trace

        began = time.perf_counter()
        # Repeats run the first run's plan, so that a static plan's profiling run is not repeated.
        record = self.runner.run(policy, self.prompts, self.gen_tokens, plan=self.plans.get(policy),
                                 **self.run_settings)
        self.timelines.setdefault(policy, []).append(record.timeline)
        if policy not in self.plans:
            self.plans[policy] = record.plan
            self.ops[policy] = {f"{schedule.forward.index}:{op.id}": op
                                for schedule in lower_trace(record.plan, self.spec, record.trace)
                                for op in schedule.ops}
        self.elapsed_s += time.perf_counter() - began

    def fit(self, profile: HardwareProfile) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
        """Return the correction per op kind and a summary of the ops it was fitted to."""
        from tide.costs import CostModel
        from tide.validate import composite_timeline

        if not self.timelines:
            raise RuntimeError("no engine runs to fit corrections to")
        cost_model = CostModel(profile, dtype_bytes=self.spec.dtype_bytes)
        measured: dict[str, list[float]] = {}
        predicted: dict[str, list[float]] = {}
        for policy, runs in self.timelines.items():
            for span in composite_timeline(runs).spans:
                op = self.ops[policy].get(span.key)
                if op is None:
                    raise RuntimeError(f"policy {policy}: the engine ran op {span.key} that lowering the recorded "
                                       "trace does not produce")
                measured.setdefault(op.kind, []).append(span.duration_s)
                predicted.setdefault(op.kind, []).append(cost_model.duration_s(op))
        corrections = {kind: fit_correction(measured[kind], predicted[kind], offset=kind in OFFSET_KINDS)
                       for kind in measured}
        summary = {"repeats": {policy: len(runs) for policy, runs in self.timelines.items()},
                   "ops": {kind: len(values) for kind, values in measured.items()},
                   "measured_s": {kind: float(sum(values)) for kind, values in measured.items()}}
        return corrections, summary


# ----------------------------------------------------------------------------------------
# Assembly


def build_profile(name: str, *, device: str, work: Mapping[str, Any], link: Mapping[str, Any],
                  device_figures: Mapping[str, float], corrections: Mapping[str, tuple[float, float]],
                  spec, provenance: Provenance) -> HardwareProfile:
    """Build a calibrated profile: the work tables with each kind's correction in place.

    A correction (scale, offset) maps a work duration w to scale x w + offset. Without
    corrections this is the profile of the work alone, against which they are fitted. An
    expert op costs its lane's overhead plus, per expert, its table value minus that
    overhead, so correcting the overhead like the table corrects the whole op.
    """
    fixed = work["expert_fixed_s"]
    empty = work["empty_op_s"]

    def corrected(kind: str, seconds: float) -> float:
        scale, offset_s = corrections.get(kind, (1.0, 0.0))
        return scale * seconds + offset_s

    overhead = {
        "gpu": corrected("gpu_experts", fixed.get("gpu_experts", empty["gpu"])),
        "cpu": corrected("cpu_experts", fixed.get("cpu_experts", empty["cpu"])),
        "h2d": empty["h2d"],
        "d2h": empty["d2h"],
    }
    tables: dict[str, CalibrationTable] = {}
    for kind, (xs, seconds) in work["tables"].items():
        tables[kind] = CalibrationTable(TABLE_X_NAMES[kind],
                                        *monotone_points(xs, [corrected(kind, s) for s in seconds]))
    overhead, latency = _fit_overheads(overhead, tables, float(link["latency_s"]))

    bandwidths = {name: float(link[name]) for name in ("h2d_pinned_bytes_per_s", "d2h_pinned_bytes_per_s",
                                                        "h2d_pageable_bytes_per_s", "d2h_pageable_bytes_per_s")}
    import torch

    if device == "cuda":
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu_name, gpu_memory = properties.name, float(properties.total_memory)
        link_name = "host link (measured copies)"
    else:
        gpu_name, gpu_memory = f"CPU device ({cpu_model_name()})", float(host_memory_bytes())
        link_name = "host memory copy (CPU device)"
    expert_flops = _cpu_expert_flops(work, spec)
    profile = HardwareProfile(
        name=name,
        gpu=GpuSpec(name=gpu_name, memory_bytes=gpu_memory, bf16_dense_flops=float(device_figures["matmul_flops"]),
                    bf16_accumulate="fp32", hbm_bytes_per_s=float(device_figures["memory_bytes_per_s"])),
        # Measured bandwidths are what copies reach, so the link's peak is taken as the fastest of them.
        link=HostLink(name=link_name, latency_s=latency, datasheet_bytes_per_s=max(bandwidths.values()),
                      **bandwidths),
        cpu=CpuSpec(name=cpu_model_name(), cores=os.cpu_count() or 1, expert_flops=expert_flops,
                    memory_bytes_per_s=float(device_figures.get("host_memory_bytes_per_s",
                                                                device_figures["memory_bytes_per_s"])),
                    memory_bytes=float(host_memory_bytes())),
        provenance=provenance,
        efficiency={"gemm_flops": 1.0, "hbm": 1.0, "cpu_flops": 1.0, "cpu_memory": 1.0},
        op_overhead_s=overhead,
        tables=tables,
        shared_cores=device == "cpu",
    )
    return profile


def _fit_overheads(overhead: Mapping[str, float], tables: Mapping[str, CalibrationTable],
                   latency_s: float) -> tuple[dict[str, float], float]:
    """Lower lane overheads and the link latency until every table's first point covers them.

    A profile requires it, because an op of a table's smallest size cannot cost less than
    an empty op.
    """
    fitted = {lane: max(0.0, value) for lane, value in overhead.items()}
    for lane in LANES:
        firsts = [t.seconds[0] for kind, t in tables.items() if OP_LANES[kind] == lane]
        if firsts and fitted[lane] > min(firsts):
            logger.info("lane %s: op overhead %.3g s lowered to %.3g s, the smallest op measured on it",
                        lane, fitted[lane], min(firsts))
            fitted[lane] = min(firsts)
    copy_room = [t.seconds[0] - fitted[OP_LANES[kind]] for kind, t in tables.items() if kind in COPY_KINDS]
    if copy_room:
        latency_s = max(0.0, min(latency_s, min(copy_room)))
    return fitted, latency_s


def _cpu_expert_flops(work: Mapping[str, Any], spec) -> float:
    """Return the sustained FLOP/s of CPU expert work at the largest measured token count."""
    xs, seconds = work["tables"]["cpu_experts"]
    busy_s = max(seconds[-1] - work["expert_fixed_s"].get("cpu_experts", 0.0), 1e-9)
    return xs[-1] * spec.expert_flops_per_token / busy_s


def _library_versions() -> dict[str, str]:
    import torch

    versions = {"python": platform.python_version(), "tide": tide.__version__, "torch": torch.__version__,
                "numpy": np.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


# ----------------------------------------------------------------------------------------
# The whole calibration


class CalibrationSession:
    """One calibration, in two stages that a validation can interleave with its own runs.

    Creating the session loads the model and measures the work tables, the link and the
    device (step 1). ``engine_runs.run(policy)`` adds an engine run of step 2, and
    ``finish()`` fits the corrections and returns the calibrated profile.
    """

    def __init__(self, *, model: str | None = None, device: str | None = None, threads: int | None = None,
                 quick: bool = False, name: str | None = None, progress: bool = False,
                 settings: CalibrationSettings | None = None, loaded=None, runner=None) -> None:
        from executor.generate import BlockDiffusionConfig
        from tide.cli.common import progress as progress_bar
        from tide.runs import SessionRunner, load_checkpoint

        import torch

        self.began = time.perf_counter()
        self.device = resolve_device(device)
        self.threads = default_threads(self.device) if threads is None else threads
        set_threads(self.threads)
        self.quick = quick
        self.settings = settings or (QUICK if quick else FULL)
        # A model built in memory comes as ``loaded`` (a tide.runs.LoadedModel) with its runner.
        self.loaded = loaded if loaded is not None else load_checkpoint(model)
        self.model_name = self.loaded.name
        self.spec = self.loaded.spec
        self.model = self.loaded.model
        self.tokenizer = self.loaded.tokenizer
        self.runner = runner if runner is not None else SessionRunner(self.loaded, self.device)
        block_length = BlockDiffusionConfig().block_length

        labels = ("embed", "router", "combine", "head", "dense_mlp", "shared_expert", "attention", "gpu_experts",
                  "cpu_experts", "act_d2h", "act_h2d", "expert_copy", "link", "device")
        with progress_bar(len(labels), "calibrating", unit="step", disable=not progress) as bar:
            def step(label: str) -> None:
                bar.set_postfix_str(label)
                bar.update(1)
                logger.info("calibration: %s", label)

            bench = _Bench(self.model, self.spec, self.device, self.settings, block_length)
            try:
                self.work = measure_work(bench, self.spec, self.settings, step)
                step("link")
                self.link = measure_link(bench, self.settings)
                step("device")
                self.device_figures = measure_device(bench, self.settings)
            finally:
                bench.close()
        self.microbenchmark_s = time.perf_counter() - self.began

        device_names = [f"CPU: {cpu_model_name()}"]
        if self.device == "cuda":
            device_names.insert(0, f"GPU: {torch.cuda.get_device_name()}")
        spec = self.spec
        self.provenance = Provenance(
            kind="calibrated",
            source=(f"tide calibrate{' --quick' if quick else ''} on the {self.device} device for model "
                    f"{spec.name} (config hash {spec.config_hash}), {self.threads} intra-op thread(s); tables "
                    "hold for that model's shapes only"),
            calibrated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            host=platform.node(), device_names=tuple(device_names), library_versions=_library_versions(),
            threads=self.threads)
        self.name = name or f"calibrated-{self.device}-{spec.name}"
        self.engine_runs = EngineRuns(self.runner, self.settings.engine_gen_tokens)

    def work_profile(self) -> HardwareProfile:
        """Return the profile of the work tables alone, before the corrections of step 2."""
        return build_profile(self.name, device=self.device, work=self.work, link=self.link,
                             device_figures=self.device_figures, corrections={}, spec=self.spec,
                             provenance=self.provenance)

    def run_engine(self, *, progress: bool = False) -> None:
        """Run step 2 alone: each of ``CALIBRATION_POLICIES`` ``engine_repeats`` times, taking turns."""
        from tide.cli.common import progress as progress_bar

        total = self.settings.engine_repeats * len(CALIBRATION_POLICIES)
        with progress_bar(total, "engine runs", unit="run", disable=not progress) as bar:
            for _ in range(self.settings.engine_repeats):
                for policy in CALIBRATION_POLICIES:
                    bar.set_postfix_str(policy)
                    self.engine_runs.run(policy)
                    bar.update(1)

    def finish(self) -> Calibration:
        """Fit the corrections to the engine runs so far and return the calibrated profile."""
        corrections, engine_summary = self.engine_runs.fit(self.work_profile())
        profile = build_profile(self.name, device=self.device, work=self.work, link=self.link,
                                device_figures=self.device_figures, corrections=corrections, spec=self.spec,
                                provenance=self.provenance)
        # Measuring time only: a validation may have run its own work between the engine runs.
        elapsed_s = self.microbenchmark_s + self.engine_runs.elapsed_s
        logger.info("calibrated %s in %.1f s (%.1f s of microbenchmarks)", self.name, elapsed_s,
                    self.microbenchmark_s)
        link = self.link
        measurements = {
            "model": self.spec.name,
            "device": self.device,
            "threads": self.threads,
            "quick": self.quick,
            "shared_cores": profile.shared_cores,
            "elapsed_s": elapsed_s,
            "microbenchmark_s": self.microbenchmark_s,
            "work": self.work["raw"],
            "expert_fixed_s": self.work["expert_fixed_s"],
            "empty_op_s": self.work["empty_op_s"],
            "engine_corrections": {kind: {"scale": scale, "offset_s": offset_s}
                                   for kind, (scale, offset_s) in corrections.items()},
            "engine_runs": engine_summary,
            "op_overhead_s": dict(profile.op_overhead_s),
            "link": {key: value for key, value in link.items() if not key.endswith("_points")},
            "link_points": {key: value for key, value in link.items() if key.endswith("_points")},
            "device_figures": dict(self.device_figures),
        }
        return Calibration(profile=profile, measurements=measurements)


def calibrate(*, model: str | None = None, device: str | None = None, threads: int | None = None,
              quick: bool = False, name: str | None = None, progress: bool = False,
              settings: CalibrationSettings | None = None) -> Calibration:
    """Measure the executor on this machine for one model and return a calibrated profile.

    ``model`` is a checkpoint folder or None for the embedded ``tiny`` model; the tables
    hold for that model's shapes. ``threads`` sets PyTorch's intra-op threads for the
    measurements (default: ``default_threads``); a validation must run with the same.
    ``settings`` replaces the ``QUICK`` or ``FULL`` settings.
    """
    session = CalibrationSession(model=model, device=device, threads=threads, quick=quick, name=name,
                                 progress=progress, settings=settings)
    session.run_engine(progress=progress)
    return session.finish()
