"""The textbook SimPy model of a Program, kept as the reference for ``sim.engine``.

Every op is a SimPy process. It waits for the events of its dependencies and of the op
before it on its lane, then occupies its lane's ``simpy.Resource`` for its duration. Each
pass starts once every op of the one before has ended. It costs several events per op,
so it is far slower than ``sim.engine.Engine``. The engine must give every op the same
start and end, which ``tests/test_sim_textbook.py`` and ``benchmarks/simulator.py`` check.
"""

from __future__ import annotations

import simpy

from sim.engine import Program
from tide.ir import LANES


def textbook_times(program: Program, *, shared_cores: bool = False) -> tuple[list[int], list[int]]:
    """Run ``program`` one process per op and return every op's start and end in ns.

    With ``shared_cores`` all lanes share one resource, and an op waits for the op
    before it in schedule order, as in ``Engine(program, shared_cores=True)``.
    """
    env = simpy.Environment()
    resources = [simpy.Resource(env, capacity=1) for _ in (LANES[:1] if shared_cores else LANES)]
    done = [env.event() for _ in program.ops]
    start = [0] * len(program.ops)
    end = [0] * len(program.ops)

    def run_op(i: int, waits: list, resource: simpy.Resource):
        if waits:
            yield env.all_of(waits)
        with resource.request() as request:
            yield request
            start[i] = env.now
            yield env.timeout(program.duration_ns[i])
            end[i] = env.now
        done[i].succeed()

    def passes():
        for p in range(len(program.forwards)):
            numbers = range(program.pass_start[p], program.pass_start[p + 1])
            previous_on_lane: dict[int, int] = {}
            for i in numbers:
                lane = 0 if shared_cores else program.lane[i]
                waits = [done[d] for d in program.deps[i]]
                before = previous_on_lane.get(lane)
                if before is not None:
                    waits.append(done[before])
                previous_on_lane[lane] = i
                env.process(run_op(i, waits, resources[lane]))
            if len(numbers):
                yield env.all_of([done[i] for i in numbers])

    env.process(passes())
    env.run()
    return start, end
