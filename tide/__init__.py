"""TIDE: lossless inference of mixture-of-experts diffusion language models with experts offloaded to the CPU.

The shared core: model specs, hardware profiles, traces, the schedule IR, policies and
lowering, the cost model, the planner and the validator. The simulator (``sim``) and the
executor (``executor``) both build on it.
"""

__version__ = "0.1.0"
