"""The SimPy model: the lanes of one GPU and its host, running the ops of schedules.

Model:

* Four lanes, ``gpu`` (compute), ``h2d`` and ``d2h`` (the copy engines) and ``cpu`` (the
  thread pool that runs expert MLPs). Each lane is one SimPy process that runs its ops
  one at a time in schedule order, each once the ops it depends on have finished, like a
  CUDA stream. Ops on different lanes overlap exactly when their dependencies allow it.
* Forward passes run one after another, because sampling needs the logits: a pass ends
  when all its ops have ended, and no op of the next pass starts before that.
* Slots: the engine tracks which expert is in each slot of each MoE layer. A copy into a
  slot starts only after the last op that read the evicted expert has finished. An op
  that reads an expert starts only after the copy that brought it in has landed. Both
  hold whether or not the schedule lists those dependencies.
* Time is SimPy time in integer nanoseconds. Each op's duration is the cost model's
  ``duration_s(op)`` rounded to a whole nanosecond, so every start and end is an exact
  integer and the same inputs give the same times on every machine.

A lane is a process rather than a ``simpy.Resource``, because its queue order is fixed by
the schedule. A resource's request and release would add two events per op and change no
time.

A lane does not yield a SimPy event for every op. Once an op's dependencies have known
end times, its start (the later of the lane's clock and those ends) and its end are
known too, so the lane times it and goes on to its next op. The lane yields to SimPy
only when the next op depends on an op that another lane has not timed yet. It then
lets SimPy time catch up with its own clock and waits for the event that the other lane
fires when it times that op. Every op gets the time it would get with an event per op,
because nothing else decides a start. ``sim.textbook`` contains the model with an event
per op (a process per op, a ``simpy.Resource`` per lane). ``tests/test_sim_textbook.py``
and ``benchmarks/simulator.py`` check that both give every op the same times.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass
from operator import itemgetter
from typing import Iterable, Mapping, Protocol, Sequence

import simpy

from tide.ir import LANES, OP_LANES, ForwardInfo, Op, Schedule

logger = logging.getLogger(__name__)

NS_PER_S = 1_000_000_000
LANE_INDEX = {lane: i for i, lane in enumerate(LANES)}


class DurationModel(Protocol):
    """Anything that gives an op's duration: ``tide.costs.CostModel`` or a test stub."""

    def duration_s(self, op: Op) -> float: ...


def duration_ns(seconds: float, op: Op) -> int:
    """Round a duration to whole nanoseconds, rejecting values that are not finite or negative."""
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"op {op.id!r} ({op.kind}): duration {seconds!r} s is not a finite number >= 0")
    return int(round(seconds * NS_PER_S))


# ---------------------------------------------------------------------------------------
# Compiling schedules into flat arrays


@dataclass
class Program:
    """Schedules flattened into per-op lists, indexed by a global op number.

    ``deps[i]`` are the ops that op i waits for inside its own pass: the schedule's
    dependencies plus the slot dependencies. ``slot_deps[i]`` are all slot dependencies,
    including those on earlier passes, which the engine checks after the run.
    """

    forwards: list[ForwardInfo]
    ops: list[Op]
    lane: list[int]
    duration_ns: list[int]
    deps: list[tuple[int, ...]]
    slot_deps: list[tuple[int, ...]]
    pass_start: list[int]  # first global op number of each pass, plus the total at the end
    lane_ops: list[list[list[int]]]  # [pass][lane] -> op numbers in schedule order
    hits: int = 0
    misses: int = 0
    expert_copies: int = 0
    h2d_bytes: float = 0.0
    d2h_bytes: float = 0.0


class _LayerSlots:
    """Slot contents of one MoE layer, with the copy that loaded each expert and its last reader."""

    __slots__ = ("slots", "resident", "last_reader", "loaded_in_pass")

    def __init__(self, experts: Sequence[int] = ()) -> None:
        self.slots: dict[int, int] = dict(enumerate(experts))  # slot -> expert (-1 for empty)
        self.resident: set[int] = {e for e in experts if e >= 0}
        self.last_reader: dict[int, int] = {}  # expert -> op number
        self.loaded_in_pass: dict[int, int] = {}  # expert -> op number of its copy, this pass only


class SlotTracker:
    """The expert in each slot of each MoE layer, the copy that loaded it and its last reader.

    ``initial_slots`` maps a decoder layer to its slots' experts (-1 for an empty slot) at
    the start of the run. With it, the tracker also rejects a read of an expert that is in
    no slot and a copy into a slot the layer does not have. Without it, a slot's content
    is learned from the first copy into it, and experts never copied are taken as resident.
    """

    def __init__(self, initial_slots: Mapping[int, Sequence[int]] | None = None) -> None:
        self.known = initial_slots is not None
        self.layers: dict[int, _LayerSlots] = {
            layer: _LayerSlots(experts) for layer, experts in (initial_slots or {}).items()}

    def _layer(self, layer: int) -> _LayerSlots:
        slots = self.layers.get(layer)
        if slots is None:
            slots = self.layers[layer] = _LayerSlots()
        return slots

    def next_pass(self) -> None:
        """Forget this pass's copies: ops of later passes start after they have all landed."""
        for layer in self.layers.values():
            if layer.loaded_in_pass:
                layer.loaded_in_pass.clear()

    def copy(self, op: Op, number: int) -> tuple[int, ...]:
        """Record a copy and return the ops it must wait for: the evicted expert's last reader."""
        slot, evicted = op.slot, op.evicts
        if len(op.experts) != 1:
            raise ValueError(f"copy {op.id!r} must name exactly one expert, not {list(op.experts)!r}")
        expert = op.experts[0][0]
        layer = self._layer(op.layer)
        if self.known and not 0 <= slot < len(layer.slots):
            raise ValueError(f"copy {op.id!r}: layer {op.layer} has {len(layer.slots)} slots, no slot {slot}")
        occupant = layer.slots.get(slot, evicted)
        if occupant != evicted:
            raise ValueError(f"copy {op.id!r}: slot {slot} of layer {op.layer} contains expert {occupant}, "
                             f"but the copy evicts {evicted}")
        if expert in layer.resident:
            raise ValueError(f"copy {op.id!r}: expert {expert} of layer {op.layer} is already in a slot")
        waits: tuple[int, ...] = ()
        if evicted >= 0:
            layer.resident.discard(evicted)
            layer.loaded_in_pass.pop(evicted, None)
            reader = layer.last_reader.pop(evicted, None)
            if reader is not None:
                waits = (reader,)
        layer.slots[slot] = expert
        layer.resident.add(expert)
        layer.loaded_in_pass[expert] = number
        return waits

    def read(self, op: Op, number: int) -> tuple[int, ...]:
        """Record a read of the op's experts and return the copies of this pass it must wait for."""
        layer = self.layers.get(op.layer) or self._layer(op.layer)
        if len(op.experts) == 1:
            # One expert, as in every gpu_expert op: the common case, kept short.
            expert = op.experts[0][0]
            if self.known and expert not in layer.resident:
                self._raise_absent(op, [expert], layer)
            layer.last_reader[expert] = number
            copy = layer.loaded_in_pass.get(expert)
            return (copy,) if copy is not None else ()

        experts = list(map(_first, op.experts))
        if self.known and not layer.resident.issuperset(experts):
            self._raise_absent(op, experts, layer)
        waits: tuple[int, ...] = ()
        loaded = layer.loaded_in_pass
        if loaded:
            waits = tuple(sorted(loaded[e] for e in loaded.keys() & experts))
        layer.last_reader.update(dict.fromkeys(experts, number))
        return waits

    @staticmethod
    def _raise_absent(op: Op, experts: list[int], layer: _LayerSlots) -> None:
        missing = next(e for e in experts if e not in layer.resident)
        raise ValueError(f"op {op.id!r} reads expert {missing} of layer {op.layer}, which is in no slot")


_first = itemgetter(0)

# Roles of op kinds in compile_schedules: a copy into a slot, a read of resident experts
# (hits), a read of experts copied in this pass (misses) and CPU expert work (misses).
_OTHER, _COPY, _HIT_READ, _FETCHED_READ, _CPU_WORK = range(5)
# kind -> (lane number, role, lane name)
_KIND_ROLES = {
    kind: (LANE_INDEX[lane], {"expert_copy": _COPY, "gpu_experts": _HIT_READ, "gpu_expert": _FETCHED_READ,
                              "cpu_experts": _CPU_WORK}.get(kind, _OTHER), lane)
    for kind, lane in OP_LANES.items()
}
_H2D, _D2H = LANE_INDEX["h2d"], LANE_INDEX["d2h"]
_NO_DEPS: tuple[int, ...] = ()


def compile_schedules(schedules: Iterable[Schedule], durations: DurationModel, *,
                      initial_slots: Mapping[int, Sequence[int]] | None = None,
                      duration_function=None) -> Program:
    """Flatten schedules into a Program, with durations and slot dependencies.

    ``duration_function(op) -> int ns`` replaces ``durations`` when given (the replay
    passes a cached one). Raises ValueError for an op on the wrong lane, a duplicate op id,
    a dependency on an op that is not earlier in its schedule, or a copy or read that
    contradicts the slots' contents.
    """
    if duration_function is None:
        def duration_function(op: Op) -> int:
            return duration_ns(durations.duration_s(op), op)

    tracker = SlotTracker(initial_slots)
    program = Program(forwards=[], ops=[], lane=[], duration_ns=[], deps=[], slot_deps=[], pass_start=[],
                      lane_ops=[])
    # Local names and bound methods, because this loop runs once per op of the whole run.
    add_op, add_lane, add_duration = program.ops.append, program.lane.append, program.duration_ns.append
    add_deps, add_slot_deps = program.deps.append, program.slot_deps.append
    kind_roles = _KIND_ROLES
    copy, read = tracker.copy, tracker.read
    hits = misses = copies = 0
    h2d_bytes = d2h_bytes = 0.0
    number = 0
    for schedule in schedules:
        first = number
        tracker.next_pass()
        program.forwards.append(schedule.forward)
        program.pass_start.append(first)
        lane_ops: list[list[int]] = [[] for _ in LANES]
        add_to_lane = [numbers.append for numbers in lane_ops]
        number_of: dict[str, int] = {}
        for op in schedule.ops:
            op_id, kind, lane_name, op_deps = op[:4]
            roles = kind_roles.get(kind)
            if roles is None or roles[2] != lane_name:
                raise ValueError(f"forward {schedule.forward.index}, op {op_id!r}: kind {kind!r} runs on lane "
                                 f"{OP_LANES.get(kind)!r}, not {lane_name!r}")
            lane, role, _ = roles
            if op_id in number_of:
                raise ValueError(f"forward {schedule.forward.index}: duplicate op id {op_id!r}")
            try:
                if len(op_deps) == 1:
                    deps = (number_of[op_deps[0]],)
                else:
                    deps = tuple(map(number_of.__getitem__, op_deps))
            except KeyError as error:
                raise ValueError(f"forward {schedule.forward.index}, op {op_id!r} depends on {error.args[0]!r}, "
                                 "which is not an earlier op of its schedule") from None

            slot_deps = _NO_DEPS
            if role:
                if role == _COPY:
                    slot_deps = copy(op, number)
                    copies += 1
                elif role == _HIT_READ:
                    slot_deps = read(op, number)
                    hits += op.tokens
                elif role == _FETCHED_READ:
                    slot_deps = read(op, number)
                    misses += op.tokens
                else:
                    misses += op.tokens
                for d in slot_deps:
                    if d >= first and d not in deps:
                        deps += (d,)
                if lane == _H2D:
                    h2d_bytes += op.bytes
            elif lane == _H2D:
                h2d_bytes += op.bytes
            elif lane == _D2H:
                d2h_bytes += op.bytes

            number_of[op_id] = number
            add_op(op)
            add_lane(lane)
            add_duration(duration_function(op))
            add_deps(deps)
            add_slot_deps(slot_deps)
            add_to_lane[lane](number)
            number += 1
        program.lane_ops.append(lane_ops)
    program.pass_start.append(number)
    program.hits, program.misses, program.expert_copies = hits, misses, copies
    program.h2d_bytes, program.d2h_bytes = h2d_bytes, d2h_bytes
    return program


# ---------------------------------------------------------------------------------------
# Running


@dataclass
class EngineRun:
    """The simulated times of a Program, in integer nanoseconds from the start of the run."""

    program: Program
    start_ns: list[int]
    end_ns: list[int]
    pass_begin_ns: list[int]
    pass_end_ns: list[int]
    shared_cores: bool = False  # every pass's ops ran one at a time in schedule order

    @property
    def total_ns(self) -> int:
        return self.pass_end_ns[-1] if self.pass_end_ns else 0


class Engine:
    """Runs a Program on four lane processes in one SimPy environment.

    ``shared_cores`` is for profiles whose ``gpu`` and ``cpu`` lanes run on the same cores
    (a CPU-only machine). There the executor runs every op of a pass one at a time in
    schedule order, so the engine does too: all of a pass's ops go to one process in
    schedule order, and each span keeps its op's lane.
    """

    def __init__(self, program: Program, *, shared_cores: bool = False) -> None:
        self.program = program
        self.shared_cores = shared_cores
        self._lane_ops = program.lane_ops
        if shared_cores:
            self._lane_ops = [
                [list(range(program.pass_start[p], program.pass_start[p + 1]))] + [[] for _ in LANES[1:]]
                for p in range(len(program.forwards))]
        num_ops = len(program.ops)
        num_passes = len(program.forwards)
        self.env = simpy.Environment()
        self.start_ns = [-1] * num_ops
        self.end_ns = [-1] * num_ops
        self.pass_begin_ns = [0] * num_passes
        self.pass_end_ns = [0] * num_passes
        self._waiters: dict[int, simpy.Event] = {}  # op number -> event another lane waits on
        self._arrived = [0] * num_passes
        self._barriers = [self.env.event() for _ in range(num_passes)]

    def run(self) -> EngineRun:
        for lane in range(len(LANES)):
            self.env.process(self._lane(lane))
        self.env.run()
        unfinished = [i for i, end in enumerate(self.end_ns) if end < 0]
        if unfinished:
            # Unreachable for a compiled Program, whose dependencies all point backwards.
            op = self.program.ops[unfinished[0]]
            raise RuntimeError(f"simulation stopped with {len(unfinished)} ops unfinished, the first {op.id!r}")
        self._check_slot_order()
        return EngineRun(self.program, self.start_ns, self.end_ns, self.pass_begin_ns, self.pass_end_ns,
                         self.shared_cores)

    def _lane(self, lane: int):
        """Run one lane's ops pass by pass, then meet the other lanes at the pass's end.

        ``clock`` is when the lane is next free. An op starts at the latest of ``clock``
        and its dependencies' ends, and its end is known from then on. Only a dependency
        whose end is not yet known makes the lane wait: it first lets SimPy time reach its
        clock, then waits for the event that the dependency's lane fires once it has
        timed that op.
        """
        env = self.env
        program = self.program
        deps, duration = program.deps, program.duration_ns
        start, end = self.start_ns, self.end_ns
        waiters = self._waiters
        timeout, new_event = env.timeout, env.event
        num_lanes = len(LANES)
        for forward_number, lane_ops in enumerate(self._lane_ops):
            clock = env.now
            for i in lane_ops[lane]:
                begin = clock
                for d in deps[i]:
                    ready = end[d]
                    if ready < 0:
                        # The other lane has not timed this op yet. Bring SimPy time up to
                        # this lane's clock first, so that a waiting lane is never behind it.
                        if clock > env.now:
                            yield timeout(clock - env.now)
                        if end[d] < 0:
                            event = waiters.get(d)
                            if event is None:
                                event = waiters[d] = new_event()
                            yield event
                        ready = end[d]
                    if ready > begin:
                        begin = ready
                start[i] = begin
                clock = end[i] = begin + duration[i]
                event = waiters.pop(i, None)
                if event is not None:
                    event.succeed()

            # Every lane waits here until the last lane has finished its ops of this pass.
            if clock > env.now:
                yield timeout(clock - env.now)
            self._arrived[forward_number] += 1
            barrier = self._barriers[forward_number]
            if self._arrived[forward_number] == num_lanes:
                self.pass_end_ns[forward_number] = env.now
                if forward_number + 1 < len(self.pass_begin_ns):
                    self.pass_begin_ns[forward_number + 1] = env.now
                barrier.succeed()
            else:
                yield barrier

    def _check_slot_order(self) -> None:
        start, end = self.start_ns, self.end_ns
        for i, waits in enumerate(self.program.slot_deps):
            for d in waits:
                if end[d] > start[i]:
                    raise RuntimeError(f"op {self.program.ops[i].id!r} started at {start[i]} ns, before "
                                       f"{self.program.ops[d].id!r} ended at {end[d]} ns")


def run_program(program: Program, *, shared_cores: bool = False) -> EngineRun:
    return Engine(program, shared_cores=shared_cores).run()


# ---------------------------------------------------------------------------------------
# Critical path


def critical_path(run: EngineRun) -> list[list[int]]:
    """Return, for each pass, the op numbers of its critical path in time order.

    The walk goes back from the op that ends the pass. Each op's predecessor is the op
    whose end set its start, which is the first of its dependencies (schedule order, then
    slot dependencies) that ended at its start, else the op before it on its lane. An op
    that started when its pass began ends the walk, so the path's durations sum to the
    pass's time.
    """
    program = run.program
    start, end = run.start_ns, run.end_ns
    paths = []
    for p in range(len(program.forwards)):
        first, stop = program.pass_start[p], program.pass_start[p + 1]
        if first == stop:
            paths.append([])
            continue
        # The last op to end; ties go to the later op in schedule order.
        current = max(zip(end[first:stop], range(first, stop)))[1]
        lane_ops = program.lane_ops[p]
        path = []
        while current >= 0:
            path.append(current)
            if start[current] == run.pass_begin_ns[p]:
                break
            predecessor = -1
            for d in program.deps[current]:
                if end[d] == start[current]:
                    predecessor = d
                    break
            if predecessor < 0 and run.shared_cores:
                # One process ran the whole pass, so the op before in schedule order is the one.
                if current > first and end[current - 1] == start[current]:
                    predecessor = current - 1
            elif predecessor < 0:
                # The op before this one on its lane; lane lists ascend, so bisect finds it.
                numbers = lane_ops[program.lane[current]]
                position = bisect_left(numbers, current)
                before = numbers[position - 1] if position > 0 else -1
                if before >= 0 and end[before] == start[current]:
                    predecessor = before
            if predecessor < 0:
                raise RuntimeError(f"op {program.ops[current].id!r} started at {start[current]} ns, "
                                   "when no op it waits for ended")
            current = predecessor
        path.reverse()
        paths.append(path)
    return paths
