"""The schedule IR: plans, schedules of ops, and timelines of spans.

This module is the contract between the planner, the simulator and the executor.

* A **Plan** is the planner's output: which policy runs, how many slots each MoE layer
  has, when a layer refreshes its resident set, how misses are served and what may
  overlap.
* A **Schedule** is what ``tide.lowering.lower_forward`` makes of a plan plus the routing
  of one forward pass: an ordered list of **ops**. Each op runs on one **lane** (``gpu``
  compute, ``h2d`` and ``d2h`` copy engines, ``cpu`` expert threads) once the ops it
  depends on have finished. A lane runs its ops in schedule order, like a CUDA stream,
  and the schedule order is a topological order of the dependencies, so a schedule that
  passes ``Schedule.validate`` cannot deadlock.
* A **Timeline** is a list of **spans** (op id, lane, start, end) produced by either
  engine. Both engines use the same op ids, so the validator matches them one to one.

Times are seconds (floats) everywhere in the IR. Every type is immutable (a frozen
dataclass, or a named tuple for ``Op``) with a JSON form, and JSON documents carry
``SCHEMA_VERSION``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple

from tide.errors import InputError

SCHEMA_VERSION = 1

# Lanes, in the order a timeline shows them.
LANES = ("gpu", "h2d", "d2h", "cpu")

# Op kinds and the lane each runs on.
OP_LANES = {
    "embed": "gpu",  # token embedding lookup
    "attention": "gpu",  # input norm, fused QKV, qk-norm, rotary, attention, output projection
    "dense_mlp": "gpu",  # post-attention norm and the dense MLP of the first layers
    "router": "gpu",  # post-attention norm, gate, group-limited top-k, ids copied to the host
    "shared_expert": "gpu",
    "expert_copy": "h2d",  # one expert's weights from host memory into a GPU slot
    "gpu_experts": "gpu",  # resident experts' work, grouped, with tokens per expert
    "gpu_expert": "gpu",  # one expert copied in this pass, run once its copy has landed
    "act_d2h": "d2h",  # hidden states of the tokens that have CPU work
    "cpu_experts": "cpu",  # non-resident experts' work on the CPU thread pool
    "act_h2d": "h2d",  # CPU expert outputs back to the GPU
    "combine": "gpu",  # weighted sum of expert outputs in top-k order, plus the shared expert
    "head": "gpu",  # final norm, LM head and the sampling read-back
}

FORWARD_KINDS = ("prefill", "denoise", "cache_write")
POLICY_NAMES = ("all-gpu", "tide", "every-step", "static", "lru-fetch", "cpu-experts", "oracle")
MISS_SERVICES = ("cpu", "fetch")
FIRST_BLOCK_RULES = ("every-step", "interval")


# ----------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Overlap:
    """Settings for which lanes may work at the same time. Both off give the sequential reference."""

    copies_with_compute: bool = True  # expert copies on their own stream during GPU work
    cpu_with_gpu: bool = True  # CPU expert work during GPU expert work


@dataclass(frozen=True)
class Plan:
    """A policy and its parameters, for every MoE layer of one model.

    ``slot_budgets[i]``, ``intervals[i]`` and ``miss_service[i]`` belong to the i-th MoE
    layer (0-based over MoE layers, not over all decoder layers).
    """

    policy: str
    slot_budgets: tuple[int, ...]
    intervals: tuple[int, ...]
    miss_service: tuple[str, ...]
    # Explicit refresh steps inside a block; when set they replace the interval rule.
    refresh_steps: tuple[int, ...] | None = None
    # "every-step": the first generated block refreshes every step (the published TIDE
    # rule); "interval": it follows the interval like every other block.
    first_block_rule: str = "every-step"
    overlap: Overlap = field(default_factory=Overlap)
    # `static`: the hot set of each MoE layer, resident from load time on.
    static_sets: tuple[tuple[int, ...], ...] | None = None
    # `oracle`: the resident set of each MoE layer for each forward pass, by forward index.
    placements: Mapping[int, tuple[tuple[int, ...], ...]] | None = None
    spec_name: str = ""
    spec_hash: str = ""
    predicted: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise InputError("unknown policy", field="policy", value=self.policy, accepted=", ".join(POLICY_NAMES))
        num_layers = len(self.slot_budgets)
        for name in ("intervals", "miss_service"):
            if len(getattr(self, name)) != num_layers:
                raise InputError(
                    f"needs one entry per MoE layer ({num_layers})", field=name, value=len(getattr(self, name))
                )
        for i, budget in enumerate(self.slot_budgets):
            if budget < 0:
                raise InputError("must not be negative", field=f"slot_budgets[{i}]", value=budget)
        for i, interval in enumerate(self.intervals):
            if interval < 1:
                raise InputError("must be at least 1", field=f"intervals[{i}]", value=interval)
        for i, service in enumerate(self.miss_service):
            if service not in MISS_SERVICES:
                raise InputError("unknown miss service", field=f"miss_service[{i}]", value=service,
                                 accepted=", ".join(MISS_SERVICES))
        if self.first_block_rule not in FIRST_BLOCK_RULES:
            raise InputError("unknown rule", field="first_block_rule", value=self.first_block_rule,
                             accepted=", ".join(FIRST_BLOCK_RULES))
        if self.static_sets is not None:
            if len(self.static_sets) != num_layers:
                raise InputError(f"needs one hot set per MoE layer ({num_layers})", field="static_sets",
                                 value=len(self.static_sets))
            for i, hot in enumerate(self.static_sets):
                if len(hot) > self.slot_budgets[i]:
                    raise InputError(f"has more experts than the layer's {self.slot_budgets[i]} slots",
                                     field=f"static_sets[{i}]", value=len(hot))
        if self.policy == "static" and self.static_sets is None:
            raise InputError("the static policy needs a hot set per layer", field="static_sets", value=None)
        if self.policy == "oracle" and self.placements is None:
            raise InputError("the oracle policy needs placements per forward pass", field="placements", value=None)

    @property
    def num_moe_layers(self) -> int:
        return len(self.slot_budgets)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schema_version"] = SCHEMA_VERSION
        if self.placements is not None:
            data["placements"] = {str(k): [list(s) for s in v] for k, v in sorted(self.placements.items())}
        data["predicted"] = dict(self.predicted)
        data["provenance"] = dict(self.provenance)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "plan") -> "Plan":
        if not isinstance(data, Mapping):
            raise InputError("a plan must be a JSON object", source=source, value=type(data).__name__)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError("unsupported schema version", source=source, field="schema_version", value=version,
                             accepted=str(SCHEMA_VERSION))
        try:
            overlap = Overlap(**data.get("overlap", {}))
        except TypeError as error:
            raise InputError(str(error), source=source, field="overlap") from None
        placements = data.get("placements")
        if placements is not None:
            placements = {int(k): tuple(tuple(int(e) for e in s) for s in v) for k, v in placements.items()}
        static_sets = data.get("static_sets")
        if static_sets is not None:
            static_sets = tuple(tuple(int(e) for e in s) for s in static_sets)
        required = ("policy", "slot_budgets", "intervals", "miss_service")
        for name in required:
            if name not in data:
                raise InputError("missing", source=source, field=name, accepted="see tide.ir.Plan")
        refresh_steps = data.get("refresh_steps")
        try:
            return cls(
                policy=data["policy"],
                slot_budgets=tuple(int(b) for b in data["slot_budgets"]),
                intervals=tuple(int(t) for t in data["intervals"]),
                miss_service=tuple(data["miss_service"]),
                refresh_steps=tuple(int(s) for s in refresh_steps) if refresh_steps is not None else None,
                first_block_rule=data.get("first_block_rule", "every-step"),
                overlap=overlap,
                static_sets=static_sets,
                placements=placements,
                spec_name=data.get("spec_name", ""),
                spec_hash=data.get("spec_hash", ""),
                predicted=dict(data.get("predicted", {})),
                provenance=dict(data.get("provenance", {})),
            )
        except InputError as error:
            raise InputError(str(error), source=source) from None


def save_plan(plan: Plan, path: str) -> None:
    from tide.io import write_text_atomic

    write_text_atomic(path, json.dumps(plan.to_json(), indent=1) + "\n")


def load_plan(path: str) -> Plan:
    from tide.io import read_json

    return Plan.from_json(read_json(path, what="plan"), source=str(path))


# ----------------------------------------------------------------------------------------
# Schedule


class Op(NamedTuple):
    """One unit of work on one lane.

    ``id`` is unique within its schedule and stable across runs, e.g. ``L03.copy.e17``.
    ``experts`` lists (expert id, tokens) for expert ops. A copy also names its
    ``slot`` and the expert it ``evicts`` (-1 for an empty slot).

    A named tuple rather than a frozen dataclass: a replay makes hundreds of thousands of
    ops and the executor makes some twenty per layer per pass, and a tuple is built about
    four times faster. It is immutable all the same.
    """

    id: str
    kind: str
    lane: str
    deps: tuple[str, ...] = ()
    layer: int = -1  # decoder layer index, -1 for ops outside the layers
    tokens: int = 0  # tokens the op processes (rows of its activations)
    context: int = 0  # tokens attended to, for attention
    flops: float = 0.0
    bytes: float = 0.0  # bytes moved: copied for a copy op, weights and activations read otherwise
    experts: tuple[tuple[int, int], ...] = ()
    slot: int = -1
    evicts: int = -1

    def to_json(self) -> dict[str, Any]:
        data = {"id": self.id, "kind": self.kind, "lane": self.lane, "deps": list(self.deps)}
        for name in ("layer", "tokens", "context", "flops", "bytes", "slot", "evicts"):
            data[name] = getattr(self, name)
        data["experts"] = [list(pair) for pair in self.experts]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Op":
        return cls(
            id=data["id"], kind=data["kind"], lane=data["lane"], deps=tuple(data.get("deps", ())),
            layer=int(data.get("layer", -1)), tokens=int(data.get("tokens", 0)),
            context=int(data.get("context", 0)), flops=float(data.get("flops", 0.0)),
            bytes=float(data.get("bytes", 0.0)), experts=tuple((int(e), int(n)) for e, n in data.get("experts", ())),
            slot=int(data.get("slot", -1)), evicts=int(data.get("evicts", -1)),
        )


@dataclass(frozen=True)
class ForwardInfo:
    """The position of a forward pass in a generation run."""

    index: int  # position in the run, 0-based, over all sequences
    kind: str  # one of FORWARD_KINDS
    sequence: int = 0  # which prompt of the run
    block: int = -1  # generated block index (-1 for prefill)
    step: int = -1  # denoising step inside the block (-1 for prefill and cache writes)
    num_tokens: int = 0  # tokens fed to the model
    context_tokens: int = 0  # tokens attended to (cached prefix plus the tokens fed)
    committed_tokens: int = 0  # tokens this pass turned from mask into output


@dataclass(frozen=True)
class Schedule:
    """The ordered ops of one forward pass."""

    forward: ForwardInfo
    ops: tuple[Op, ...]

    def validate(self) -> None:
        """Raise ValueError unless ids are unique, lanes match kinds and deps point backwards."""
        seen: set[str] = set()
        for op in self.ops:
            if op.id in seen:
                raise ValueError(f"schedule of forward {self.forward.index}: duplicate op id {op.id!r}")
            if OP_LANES.get(op.kind) != op.lane:
                raise ValueError(f"op {op.id!r}: kind {op.kind!r} runs on lane {OP_LANES.get(op.kind)!r}, not {op.lane!r}")
            for dep in op.deps:
                if dep not in seen:
                    raise ValueError(f"op {op.id!r} depends on {dep!r}, which is not an earlier op")
            seen.add(op.id)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "forward": dataclasses.asdict(self.forward),
            "ops": [op.to_json() for op in self.ops],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Schedule":
        return cls(forward=ForwardInfo(**data["forward"]), ops=tuple(Op.from_json(o) for o in data["ops"]))


# ----------------------------------------------------------------------------------------
# Timeline


@dataclass(frozen=True, slots=True)
class Span:
    """An executed or simulated op: ``forward`` and ``op_id`` together identify it."""

    forward: int
    op_id: str
    kind: str
    lane: str
    start_s: float
    end_s: float
    layer: int = -1

    @property
    def key(self) -> str:
        return f"{self.forward}:{self.op_id}"

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Timeline:
    """Spans from one engine, plus the forward passes they belong to."""

    source: str  # "simulated" or "measured"
    spans: tuple[Span, ...]
    forwards: tuple[ForwardInfo, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        if not self.spans:
            return 0.0
        return max(s.end_s for s in self.spans) - min(s.start_s for s in self.spans)

    def forward_times_s(self) -> dict[int, float]:
        """Return the wall time of each forward pass, from its first start to its last end."""
        bounds: dict[int, list[float]] = {}
        for span in self.spans:
            low_high = bounds.setdefault(span.forward, [span.start_s, span.end_s])
            low_high[0] = min(low_high[0], span.start_s)
            low_high[1] = max(low_high[1], span.end_s)
        return {f: high - low for f, (low, high) in sorted(bounds.items())}

    def busy_s(self) -> dict[str, float]:
        busy = {lane: 0.0 for lane in LANES}
        for span in self.spans:
            busy[span.lane] += span.duration_s
        return busy

    def to_chrome_trace(self) -> dict[str, Any]:
        """Return Chrome trace JSON: one process per device, one thread per lane, microseconds."""
        return chrome_trace(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "metadata": dict(self.metadata),
            "forwards": [dataclasses.asdict(f) for f in self.forwards],
            "spans": [[s.forward, s.op_id, s.kind, s.lane, s.start_s, s.end_s, s.layer] for s in self.spans],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "timeline") -> "Timeline":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise InputError("unsupported schema version", source=source, field="schema_version",
                             value=data.get("schema_version"), accepted=str(SCHEMA_VERSION))
        spans = tuple(Span(int(f), str(i), str(k), str(lane), float(a), float(b), int(layer))
                      for f, i, k, lane, a, b, layer in data["spans"])
        forwards = tuple(ForwardInfo(**f) for f in data.get("forwards", ()))
        return cls(source=data["source"], spans=spans, forwards=forwards, metadata=dict(data.get("metadata", {})))


# Chrome trace processes: the accelerator's lanes in one, the host CPU in the other.
_LANE_PROCESS = {"gpu": (1, "accelerator"), "h2d": (1, "accelerator"), "d2h": (1, "accelerator"), "cpu": (2, "host")}
_LANE_THREAD = {lane: i + 1 for i, lane in enumerate(LANES)}


def chrome_trace(timeline: Timeline, *, pid_offset: int = 0, label: str | None = None) -> dict[str, Any]:
    """Convert a timeline to Chrome trace events that Perfetto and chrome://tracing open."""
    events: list[dict[str, Any]] = []
    prefix = f"{label} " if label else f"{timeline.source} "
    for pid, name in sorted(set(_LANE_PROCESS.values())):
        events.append({"ph": "M", "name": "process_name", "pid": pid + pid_offset, "tid": 0,
                       "args": {"name": prefix + name}})
    for lane in LANES:
        pid, _ = _LANE_PROCESS[lane]
        events.append({"ph": "M", "name": "thread_name", "pid": pid + pid_offset, "tid": _LANE_THREAD[lane],
                       "args": {"name": lane}})
    for span in timeline.spans:
        pid, _ = _LANE_PROCESS[span.lane]
        events.append({
            "ph": "X", "name": span.op_id, "cat": span.kind, "pid": pid + pid_offset,
            "tid": _LANE_THREAD[span.lane], "ts": span.start_s * 1e6, "dur": span.duration_s * 1e6,
            "args": {"forward": span.forward, "layer": span.layer},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"source": timeline.source,
                                                                          **dict(timeline.metadata)}}


def save_timeline(timeline: Timeline, path: str) -> None:
    """Write a timeline: Chrome trace JSON for a ``.json`` path ending in ``.trace.json``
    or any other name, with the full span list kept under ``otherData`` for reloading."""
    from tide.io import write_text_atomic

    data = chrome_trace(timeline)
    data["otherData"]["tide_timeline"] = timeline.to_json()
    write_text_atomic(path, json.dumps(data))


def load_timeline(path: str) -> Timeline:
    from tide.io import read_json

    data = read_json(path, what="timeline")
    inner = data.get("otherData", {}).get("tide_timeline") if isinstance(data, dict) else None
    if inner is None:
        raise InputError("not a TIDE timeline (no otherData.tide_timeline)", source=str(path))
    return Timeline.from_json(inner, source=str(path))


def ops_by_id(ops: Iterable[Op]) -> dict[str, Op]:
    return {op.id: op for op in ops}
