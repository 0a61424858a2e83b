"""Lanes: where the offload engine runs each op, and how it waits for the op's dependencies.

Three implementations share one interface:

* ``CudaLanes``: ``gpu`` ops on the current CUDA stream, ``h2d`` and ``d2h`` ops on a
  stream each, ``cpu`` ops on a worker thread. A stream op waits for a stream op with
  ``Stream.wait_event``. It waits for a CPU op by blocking the issuing thread until that op
  is done. A CPU op waits for a stream op with ``Event.synchronize``. Spans come from CUDA
  events for stream ops and from ``time.perf_counter`` for CPU ops.
* ``SerialLanes``: the accelerator is the CPU device, the default there. Every op runs on
  the calling thread as soon as it is issued, so the lanes never overlap. The two lanes
  that compute (``gpu`` and ``cpu``) would share the same cores, and each would slow the
  other by an amount that depends on what runs beside it, which no lane model can
  predict. Spans tile each pass, in the thread's CPU time when it does all the work (see
  the class). Without ``op_spans`` it times runs of ops on the same lane, not each op.
* ``ThreadLanes``: the accelerator is the CPU device. ``gpu`` ops run on the calling
  thread, and ``h2d``, ``d2h`` and ``cpu`` ops on one worker thread per lane, each waiting
  for the futures of its dependencies. Spans come from ``time.perf_counter`` around the op,
  which is synchronous on the CPU.

An op's work is a callable and its arguments, ``run(op, work, *args)``, so that issuing an
op on the calling thread builds no closure. Like a CUDA stream, every lane runs its ops in
the order they are issued. A schedule lists every op after the ops it depends on
(``tide.ir.Schedule.validate`` checks this), so issuing a schedule in order cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from tide.ir import Op

logger = logging.getLogger(__name__)

WORKER_LANES = ("h2d", "d2h", "cpu")


def worker_pool(num_workers: int, name: str, intra_op_threads: int | None = None) -> ThreadPoolExecutor:
    """Return a thread pool whose threads use ``intra_op_threads`` for PyTorch's intra-op work.

    PyTorch's OpenMP thread count is per thread, and a new thread starts with one per core
    whatever the calling thread set. So the pool sets it, by default to the calling thread's.
    """
    threads = intra_op_threads if intra_op_threads is not None else torch.get_num_threads()
    return ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix=name,
                              initializer=torch.set_num_threads, initargs=(max(1, threads),))


def call_in_inference_mode(work: Callable[..., None], *args) -> None:
    # inference_mode is thread-local, and worker threads update tensors made in it.
    with torch.inference_mode():
        work(*args)


class SerialLanes:
    """Lanes for the CPU device that run every op on the calling thread, one at a time, in issue order.

    Issue order is schedule order, a topological order of the dependencies, so every
    dependency has finished when an op starts. An op's span starts when its work starts and
    ends when the next op of the pass starts (the last op's ends with its work). The spans
    therefore tile the pass, and each includes the engine's own work after the op: for a
    router, lowering the layer with its routing. A simulator that runs the same ops one at
    a time then predicts the pass's time from op durations alone.

    With ``cpu_clock`` the spans measure the calling thread's CPU time
    (``time.thread_time``), laid end to end from the pass's ``time.perf_counter`` start.
    Time that the OS gives to other processes is then left out, which keeps a timeline
    measured on a busy machine close to one measured on an idle one. Only pass
    ``cpu_clock`` when this thread does all the work (one intra-op thread, no expert
    thread pool), because other threads' CPU time is not counted.

    With ``op_spans`` False, for a caller that keeps no per-op spans, the clock is read only
    where the lane changes from one op to the next, and at ``finish_forward``. Each record
    then covers a run of consecutive ops on one lane, under the run's first op: per-lane
    busy time stays the same, but the records are not op spans. This matters because
    ``time.thread_time`` is a system call (about 0.4 us on the development machine), and
    with op spans it is read twice per op.
    """

    def __init__(self, *, cpu_clock: bool = False, op_spans: bool = True) -> None:
        self.cpu_clock = cpu_clock
        self.op_spans = op_spans
        self._clock = time.thread_time if cpu_clock else time.perf_counter
        self._done: set[str] = set()
        self._records: list[tuple] = []  # (op, start, end) per op, or (op, start) per lane run
        self._lane = ""  # lane of the current run, without op_spans
        self._begin_wall_s = 0.0
        self._begin_clock_s = 0.0
        # run(op, work, *args): chosen once here rather than tested on every op.
        self.run = self._run_op if op_spans else self._run_in_lane_run

    def begin_forward(self) -> None:
        self._done = set()
        self._records = []
        self._lane = ""
        self._begin_wall_s = time.perf_counter()
        self._begin_clock_s = self._clock()

    def _run_op(self, op: Op, work: Callable[..., None], *args) -> None:
        done = self._done
        for dep in op.deps:
            if dep not in done:
                raise RuntimeError(f"{op.id} was issued before its dependency {dep}")
        clock = self._clock
        start = clock()
        work(*args)
        self._records.append((op, start, clock()))
        done.add(op.id)

    def _run_in_lane_run(self, op: Op, work: Callable[..., None], *args) -> None:
        done = self._done
        for dep in op.deps:
            if dep not in done:
                raise RuntimeError(f"{op.id} was issued before its dependency {dep}")
        done.add(op.id)
        if op.lane != self._lane:
            self._lane = op.lane
            self._records.append((op, self._clock()))
        work(*args)

    def finish_forward(self) -> list[tuple[Op, float, float]]:
        """Return (op, start, end) in perf_counter seconds, each end moved to the next record's start.

        Without ``op_spans``, one record per run of ops on the same lane (see the class).
        """
        if not self.op_spans:
            # Read the clock first, so that the last run ends as close to its work as with op spans.
            end = self._clock()
            records = self._records
            shift = self._begin_wall_s - self._begin_clock_s
            ends = [start for _, start in records[1:]]
            ends.append(end)
            return [(op, start + shift, stop + shift) for (op, start), stop in zip(records, ends)]
        records = self._records
        shift = self._begin_wall_s - self._begin_clock_s
        return [(op, start + shift, (records[i + 1][1] if i + 1 < len(records) else end) + shift)
                for i, (op, start, end) in enumerate(records)]

    def close(self) -> None:
        pass


class ThreadLanes:
    """Lanes for the CPU device: the calling thread plus one worker thread per other lane."""

    def __init__(self) -> None:
        self._workers = {lane: worker_pool(1, f"tide-{lane}") for lane in WORKER_LANES}
        self._done: dict[str, object] = {}
        self._records: list[tuple[Op, object]] = []

    def begin_forward(self) -> None:
        self._done = {}
        self._records = []

    def run(self, op: Op, work: Callable[..., None], *args) -> None:
        # A finished op's handle is its (start, end); a worker lane's is a Future of it.
        done = self._done
        if op.lane == "gpu":
            for dep in op.deps:
                handle = done[dep]
                if isinstance(handle, Future):
                    handle.result()
            start = time.perf_counter()
            work(*args)
            handle = (start, time.perf_counter())
        else:
            handle = self._workers[op.lane].submit(self._run_after, [done[d] for d in op.deps], work, args)
        done[op.id] = handle
        self._records.append((op, handle))

    @staticmethod
    def _run_after(deps: list, work: Callable[..., None], args: tuple) -> tuple[float, float]:
        for dep in deps:
            if isinstance(dep, Future):
                dep.result()
        start = time.perf_counter()
        call_in_inference_mode(work, *args)
        return start, time.perf_counter()

    def finish_forward(self) -> list[tuple[Op, float, float]]:
        """Wait for every op of the pass; return (op, start, end) in perf_counter seconds."""
        return [(op, *(handle.result() if isinstance(handle, Future) else handle))
                for op, handle in self._records]

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True)


class CudaLanes:
    """Lanes on a CUDA device: the compute stream, a copy stream each way, and a CPU worker thread.

    NOTE: the test suite runs without a GPU, so only ``scripts/gpu_check.py`` exercises this class.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._streams = {
            "gpu": torch.cuda.current_stream(device),
            "h2d": torch.cuda.Stream(device),
            "d2h": torch.cuda.Stream(device),
        }
        self._cpu = worker_pool(1, "tide-cpu")
        self._done: dict[str, object] = {}  # op id -> (start event, end event) or Future
        self._records: list[tuple[Op, object]] = []
        self._base_event: torch.cuda.Event | None = None
        self._base_s = 0.0

    def stream(self, lane: str) -> torch.cuda.Stream:
        return self._streams[lane]

    def begin_forward(self) -> None:
        self._done = {}
        self._records = []
        torch.cuda.synchronize(self.device)
        self._base_event = torch.cuda.Event(enable_timing=True)
        self._base_event.record(self._streams["gpu"])
        self._base_s = time.perf_counter()

    def run(self, op: Op, work: Callable[..., None], *args) -> None:
        deps = [self._done[d] for d in op.deps]
        if op.lane == "cpu":
            handle: object = self._cpu.submit(self._run_after, deps, work, args)
        else:
            stream = self._streams[op.lane]
            for dep in deps:
                if isinstance(dep, Future):
                    dep.result()
                else:
                    stream.wait_event(dep[1])
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                work(*args)
                end.record(stream)
            handle = (start, end)
        self._done[op.id] = handle
        self._records.append((op, handle))

    @staticmethod
    def _run_after(deps: list, work: Callable[..., None], args: tuple) -> tuple[float, float]:
        for dep in deps:
            if isinstance(dep, Future):
                dep.result()
            else:
                dep[1].synchronize()
        start = time.perf_counter()
        call_in_inference_mode(work, *args)
        return start, time.perf_counter()

    def finish_forward(self) -> list[tuple[Op, float, float]]:
        torch.cuda.synchronize(self.device)
        records = []
        for op, handle in self._records:
            if isinstance(handle, Future):
                start_s, end_s = handle.result()
            else:
                start_s = self._base_s + self._base_event.elapsed_time(handle[0]) / 1e3
                end_s = self._base_s + self._base_event.elapsed_time(handle[1]) / 1e3
            records.append((op, start_s, end_s))
        return records

    def close(self) -> None:
        self._cpu.shutdown(wait=True)
