"""The simulator: a SimPy model of GPU, copy engines and CPU that replays traces under any plan.

Public API:

* ``simulate(spec, profile, plan, trace)`` lowers a trace under a plan with the shared
  lowering and runs the schedules on the model, with durations from the profile's cost
  model;
* ``simulate_schedules(schedules, cost_model)`` runs hand-built schedules with any object
  that has ``duration_s(op)``;
* ``SimResult`` holds what both return.
"""

from sim.replay import simulate, simulate_schedules
from sim.result import SimResult

__all__ = ["SimResult", "simulate", "simulate_schedules"]
