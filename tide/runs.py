"""Executor runs for calibration and validation: one generation under one policy, with its records.

Calibration (step 2) and validation both need the same thing from the executor: generate
for some prompts under a policy and return the plan, the trace of the routing and the
measured timeline. A runner does that. ``SessionRunner`` runs a checkpoint the way
``tide generate`` does (``executor.session.run_generation``). A model built in memory,
such as the random LLaDA2.0-mini-shaped model of ``scripts/gpu_validate.py``, comes with
its own runner, which has the same ``run`` method.

The executor is imported when a runner is made, so ``tide`` stays importable without it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def garbage_collector_paused() -> Iterator[None]:
    """Collect garbage, then keep Python's cyclic garbage collector off until the block ends.

    A collection in the middle of a measured pass would add a pause that no schedule
    contains. Identical runs allocate alike, so it would hit the same pass in every
    repeat, and taking the fastest repeat would not remove it. The timeit module turns
    the collector off while timing for the same reason.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class RunRecord:
    """Records of one executor run: its plan, the trace of its routing and its timeline."""

    plan: Any  # tide.ir.Plan
    trace: Any  # tide.trace.Trace
    timeline: Any  # tide.ir.Timeline, source "measured"
    tokens_per_s: float  # generated tokens over the run's wall time, host work between passes included


class Runner(Protocol):
    """Runs the executor on a loaded model."""

    spec: Any  # tide.spec.ModelSpec of the model
    device: str

    def run(self, policy: str, prompts: Sequence[Any], gen_tokens: int, *, plan=None, slots: int | None = None,
            interval: int = 2, gpu_memory_bytes: int | None = None) -> RunRecord:
        """Generate for ``prompts`` (``executor.session.Prompt``) under ``policy``, or under ``plan`` when given."""
        ...


@dataclass
class LoadedModel:
    """A checkpoint loaded for the executor: its spec, the module, the tokenizer and the name it was given."""

    name: str | None  # a checkpoint folder, or None for the embedded tiny model
    spec: Any
    model: Any
    tokenizer: Any


def load_checkpoint(name: str | None) -> LoadedModel:
    """Load a checkpoint folder, or the embedded tiny model for None, as ``tide generate`` does."""
    from executor.session import load_model, load_model_spec, resolve_model_dir
    from executor.tokenizer import load_tokenizer

    folder = resolve_model_dir(name)
    return LoadedModel(name=name, spec=load_model_spec(folder), model=load_model(folder),
                       tokenizer=load_tokenizer(folder))


class SessionRunner:
    """Runs a loaded checkpoint through ``executor.session.run_generation``, like ``tide generate``."""

    def __init__(self, loaded: LoadedModel, device: str) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.device = device
        self._folder = tempfile.TemporaryDirectory(prefix="tide-runs-")
        self._plans = 0

    def run(self, policy: str, prompts: Sequence[Any], gen_tokens: int, *, plan=None, slots: int | None = None,
            interval: int = 2, gpu_memory_bytes: int | None = None) -> RunRecord:
        from executor.generate import BlockDiffusionConfig
        from executor.session import RunOptions, run_generation
        from tide.ir import save_plan

        plan_path = None
        if plan is not None:
            self._plans += 1
            plan_path = os.path.join(self._folder.name, f"plan-{self._plans}.json")
            save_plan(plan, plan_path)
        options = RunOptions(model=self.loaded.name, policy=policy, interval=interval, slots=slots,
                             gpu_memory_bytes=gpu_memory_bytes, device=self.device, plan_path=plan_path)
        with garbage_collector_paused():
            result = run_generation(options, list(prompts), BlockDiffusionConfig(gen_tokens=gen_tokens),
                                    model=self.loaded.model, tokenizer=self.loaded.tokenizer,
                                    timeline_out=os.path.join(self._folder.name, "timeline.json"))
        return RunRecord(plan=result.plan, trace=result.trace, timeline=result.timeline,
                         tokens_per_s=result.summary["tokens_per_s"])

    def close(self) -> None:
        self._folder.cleanup()
