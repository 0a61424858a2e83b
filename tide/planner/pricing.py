"""Op durations for the planner, read from ``tide.costs.CostModel`` on ops that ``tide.lowering`` builds.

The planner prices thousands of (slot budget, τ) candidates, so it cannot lower and price
every candidate's schedule. Instead it queries the cost model once per distinct size for the
few durations a MoE layer's time is made of, and keeps them in lookup arrays:

* an expert op (``gpu_experts``, ``cpu_experts``) costs a fixed part plus a marginal part
  per expert that depends on the expert's tokens. The marginal part of t tokens is the
  duration of an op with two experts of t tokens minus that of an op with one. The split
  is exact for calibration tables, which sum per expert, and for the roofline while every
  expert of an op is on the same side of the ridge point;
* ``gpu_expert``, ``expert_copy``, ``act_d2h`` and ``act_h2d`` are priced exactly, each
  op on its own;
* the ops a policy cannot change (embedding, attention, router, shared expert, dense MLP,
  combine, head) are priced per forward pass.

Every probe op comes from ``Lowering.lower_moe_layer`` (or the other ``Lowering`` methods)
with a hand-made placement, so the planner and the simulator price the same ops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from tide.costs import CostModel
from tide.ir import ForwardInfo, Op
from tide.lowering import Lowering
from tide.policies import Placement, make_plan

logger = logging.getLogger(__name__)


class _Lookup:
    """Durations of one op kind by integer size, probed on first use and cached."""

    def __init__(self, probe: Callable[[int], float]) -> None:
        self._probe = probe
        self._values = np.full(1, np.nan)

    def __call__(self, sizes: np.ndarray | int) -> np.ndarray:
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.size == 0:
            return np.zeros(sizes.shape)
        largest = int(sizes.max())
        if largest >= len(self._values):
            grown = np.full(max(largest + 1, 2 * len(self._values)), np.nan)
            grown[:len(self._values)] = self._values
            self._values = grown
        distinct = np.unique(sizes)
        for size in distinct[np.isnan(self._values[distinct])].tolist():
            self._values[size] = self._probe(size)
        return self._values[sizes]


@dataclass(frozen=True)
class PassCosts:
    """Durations that do not depend on the plan, one entry per forward pass of a trace.

    ``outside_moe_s`` is the embedding, the dense layers and the head. A MoE layer
    spends ``head_s`` (attention and router) before its routing is known, then
    ``shared_s`` on the shared expert, and ``combine_s`` at its end.
    """

    outside_moe_s: np.ndarray  # [F]
    head_s: np.ndarray  # [F]
    shared_s: np.ndarray  # [F]
    combine_s: np.ndarray  # [F]
    num_tokens: np.ndarray  # [F] int


class Pricing:
    """Durations of the ops of one model on one hardware profile, for the planner."""

    def __init__(self, spec, profile=None, *, cost_model: CostModel | None = None) -> None:
        if cost_model is None:
            if profile is None:
                raise ValueError("Pricing needs a profile or a cost model")
            cost_model = CostModel(profile, dtype_bytes=spec.dtype_bytes)
        self.spec = spec
        self.cost_model = cost_model
        # Any plan will do: lower_moe_layer reads only the plan's overlap settings.
        self._lowering = Lowering(make_plan("cpu-experts", spec), spec)
        self._layer = spec.moe_layers[0] if spec.moe_layers else 0
        self.gpu_marginal_s = _Lookup(lambda t: self._pair_difference("hits", "gpu_experts", t))
        self.cpu_marginal_s = _Lookup(lambda t: self._pair_difference("cpu", "cpu_experts", t))
        self.gpu_expert_s = _Lookup(self._probe_gpu_expert)
        self.act_d2h_s = _Lookup(lambda rows: self._probe_cpu_path("act_d2h", rows))
        self.act_h2d_s = _Lookup(lambda tokens: self._probe_cpu_path("act_h2d", tokens))
        self.gpu_experts_fixed_s = self._duration("gpu_experts", Placement(hits=[(0, 1)]), 1) \
            - float(self.gpu_marginal_s(1))
        self.cpu_experts_fixed_s = self._duration("cpu_experts", Placement(cpu=[(0, 1)]), 1) \
            - float(self.cpu_marginal_s(1))
        self.expert_copy_s = self._duration("expert_copy", Placement(copies=[(0, 0, -1)]), 1)

    # --- probes ---------------------------------------------------------------------

    def _layer_ops(self, placement: Placement, num_tokens: int) -> list[Op]:
        forward = ForwardInfo(index=0, kind="denoise", block=0, step=0, num_tokens=max(num_tokens, 1),
                              context_tokens=max(num_tokens, 1))
        return self._lowering.lower_moe_layer(forward, self._layer, placement)

    def _duration(self, kind: str, placement: Placement, num_tokens: int) -> float:
        total = 0.0
        found = False
        for op in self._layer_ops(placement, num_tokens):
            if op.kind == kind:
                total += self.cost_model.duration_s(op)
                found = True
        if not found:
            raise AssertionError(f"lowering emitted no {kind} op for placement {placement}")
        return total

    def _pair_difference(self, field: str, kind: str, tokens: int) -> float:
        one_expert_s = self._duration(kind, Placement(**{field: [(0, tokens)]}), tokens)
        two_experts_s = self._duration(kind, Placement(**{field: [(0, tokens), (1, tokens)]}), tokens)
        return two_experts_s - one_expert_s

    def _probe_gpu_expert(self, tokens: int) -> float:
        return self._duration("gpu_expert", Placement(copies=[(0, 0, -1)], fetched=[(0, tokens)]), tokens)

    def _probe_cpu_path(self, kind: str, size: int) -> float:
        # act_d2h moves min(tokens fed, CPU assignments) rows and act_h2d one row per CPU
        # assignment, so one expert with ``size`` tokens in a pass of ``size`` tokens gives
        # both ops the requested size.
        return self._duration(kind, Placement(cpu=[(0, size)]), size)

    # --- per pass -----------------------------------------------------------------

    def pass_costs(self, forwards) -> PassCosts:
        """Price the ops of every forward pass that no placement changes."""
        lowering = self._lowering
        duration = self.cost_model.duration_s
        count = len(forwards)
        outside = np.zeros(count)
        head = np.zeros(count)
        shared = np.zeros(count)
        combine = np.zeros(count)
        tokens = np.zeros(count, dtype=np.int64)
        moe_layers = set(self.spec.moe_layers)
        for i, forward in enumerate(forwards):
            tokens[i] = forward.num_tokens
            ops = lowering.lower_prologue(forward) + lowering.lower_epilogue(forward)
            for layer in range(self.spec.num_layers):
                if layer not in moe_layers:
                    ops += lowering.lower_dense_layer(forward, layer)
            outside[i] = sum(duration(op) for op in ops)
            if not moe_layers:
                continue
            for op in lowering.lower_moe_layer(forward, self._layer, Placement()):
                if op.kind in ("attention", "router"):
                    head[i] += duration(op)
                elif op.kind == "shared_expert":
                    shared[i] += duration(op)
                elif op.kind == "combine":
                    combine[i] += duration(op)
        return PassCosts(outside, head, shared, combine, tokens)
