"""Lowering: a plan plus the routing of one forward pass becomes a schedule of ops.

Both engines call these functions. The simulator lowers a whole recorded forward pass with
``lower_forward``; the executor lowers online, one piece at a time, as the model runs:
``lower_prologue``, then ``lower_layer`` for each decoder layer once its router has
produced the routing, then ``lower_epilogue``. For the same plan and routing both get the
same ops with the same ids.

Op ids: ``embed``, ``head``, and ``L{layer:02d}.{name}`` inside decoder layer ``layer``,
where name is ``attention``, ``dense_mlp``, ``router``, ``shared_expert``,
``gpu_experts``, ``copy.e{expert}``, ``gpu_expert.e{expert}``, ``act_d2h``,
``cpu_experts``, ``act_h2d`` or ``combine``.

Order of one MoE layer's ops (the list is a topological order, and every lane runs its
ops in list order): attention, router, then the CPU path's ``act_d2h`` and
``cpu_experts`` so CPU work starts as early as possible, the shared expert, the resident
experts' ``gpu_experts``, then for each copied expert its copy followed by its
``gpu_expert``, then ``act_h2d`` and ``combine``.
"""

from __future__ import annotations

import numpy as np

from tide.ir import OP_LANES, ForwardInfo, Op, Plan, Schedule
from tide.policies import Placement, PolicyState, get_policy


_new_tuple = tuple.__new__


def _op(op_id: str, kind: str, deps: tuple[str, ...], layer: int = -1, tokens: int = 0, context: int = 0,
        flops: float = 0.0, bytes: float = 0.0, experts: tuple[tuple[int, int], ...] = (), slot: int = -1,
        evicts: int = -1) -> Op:
    # tuple.__new__ with the fields in order skips the named tuple's generated __new__,
    # which matters because a replay builds hundreds of thousands of ops.
    return _new_tuple(Op, (op_id, kind, OP_LANES[kind], deps, layer, tokens, context, flops, bytes, experts,
                           slot, evicts))


def tokens_per_expert(routing: np.ndarray, num_experts: int) -> np.ndarray:
    """Count the tokens routed to each expert; ``routing`` is [T, K] expert ids."""
    return np.bincount(routing.ravel().astype(np.int64, copy=False), minlength=num_experts)


class _LayerIds:
    """The op ids of one decoder layer, made once per run instead of once per pass."""

    __slots__ = ("prefix", "attention", "router", "dense_mlp", "shared_expert", "gpu_experts", "act_d2h",
                 "cpu_experts", "act_h2d", "combine", "last", "copy", "run")

    def __init__(self, layer: int, moe: bool) -> None:
        self.prefix = prefix = f"L{layer:02d}."
        for name in ("attention", "router", "dense_mlp", "shared_expert", "gpu_experts", "act_d2h", "cpu_experts",
                     "act_h2d", "combine"):
            setattr(self, name, prefix + name)
        self.last = self.combine if moe else self.dense_mlp  # the op that ends the layer
        self.copy: dict[int, str] = {}  # expert -> id of its copy
        self.run: dict[int, str] = {}  # expert -> id of its gpu_expert op

    def copy_id(self, expert: int) -> str:
        op_id = self.copy.get(expert)
        if op_id is None:
            op_id = self.copy[expert] = f"{self.prefix}copy.e{expert}"
        return op_id

    def run_id(self, expert: int) -> str:
        op_id = self.run.get(expert)
        if op_id is None:
            op_id = self.run[expert] = f"{self.prefix}gpu_expert.e{expert}"
        return op_id


class Lowering:
    """Lowers forward passes of one run: the plan, the spec and the policy state together.

    The state changes as passes are lowered, so lower the passes of a run in order.
    """

    def __init__(self, plan: Plan, spec, state: PolicyState | None = None) -> None:
        self.plan = plan
        self.spec = spec
        self.policy = get_policy(plan.policy)
        self.state = state if state is not None else self.policy.initial_state(plan, spec.num_experts)
        self.dtype_bytes = spec.dtype_bytes
        self._moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}
        self._expert_bytes = float(spec.expert_bytes())
        self._expert_flops = spec.expert_flops_per_token
        spec_bytes = spec.dtype_bytes
        self._attention_weight_bytes = float(spec.attention_params * spec_bytes)
        self._kv_bytes_per_context = float(2 * spec.num_key_value_heads * spec.head_dim * spec_bytes)
        self._activation_bytes = float(spec.hidden_size * spec_bytes)
        self._router_flops = spec.router_flops_per_token
        self._router_bytes = spec.router_params * self.dtype_bytes
        self._shared = bool(spec.num_shared_experts)
        self._shared_flops = spec.shared_expert_flops_per_token
        self._shared_bytes = spec.shared_expert_params * self.dtype_bytes
        self._hidden_size = spec.hidden_size
        self._top_k = spec.top_k
        self._ids = [_LayerIds(layer, layer in self._moe_index) for layer in range(spec.num_layers)]
        # _previous[layer] is the op that ends the layer before (``embed`` for layer 0).
        self._previous = ["embed"] + [ids.last for ids in self._ids]
        self._attention_sizes: tuple[int, int, float, float] | None = None  # (tokens, context, flops, bytes)

    # --- pieces -------------------------------------------------------------------

    def lower_prologue(self, forward: ForwardInfo) -> list[Op]:
        tokens = forward.num_tokens
        return [_op("embed", "embed", (), tokens=tokens, bytes=tokens * self._activation_bytes)]

    def previous_op(self, layer: int) -> str:
        """Return the id of the op that ends the layer before ``layer`` (``embed`` for layer 0)."""
        return self._previous[layer]

    def lower_attention(self, forward: ForwardInfo, layer: int) -> Op:
        tokens, context = forward.num_tokens, forward.context_tokens
        sizes = self._attention_sizes
        if sizes is None or sizes[0] != tokens or sizes[1] != context:
            # The same for every layer of a pass, so worked out once per pass.
            sizes = self._attention_sizes = (
                tokens, context, tokens * self.spec.attention_flops_per_token(context),
                self._attention_weight_bytes + context * self._kv_bytes_per_context
                + 2 * tokens * self._activation_bytes)
        ids = self._ids[layer]
        return _new_tuple(Op, (ids.attention, "attention", "gpu", (self._previous[layer],), layer, tokens, context,
                               sizes[2], sizes[3], (), -1, -1))

    def lower_dense_layer(self, forward: ForwardInfo, layer: int) -> list[Op]:
        tokens = forward.num_tokens
        attention = self.lower_attention(forward, layer)
        mlp = _op(self._ids[layer].dense_mlp, "dense_mlp", (attention.id,), layer, tokens=tokens,
                  flops=tokens * self.spec.dense_mlp_flops_per_token,
                  bytes=self.spec.dense_mlp_params * self.dtype_bytes + 2 * tokens * self._activation_bytes)
        return [attention, mlp]

    def lower_layer(self, forward: ForwardInfo, layer: int, routing: np.ndarray | None = None) -> list[Op]:
        """Lower one decoder layer; ``routing`` is its [T, K] expert ids (MoE layers only).

        For an MoE layer this asks the policy for a placement, which updates the state.
        """
        if layer not in self._moe_index:
            return self.lower_dense_layer(forward, layer)
        moe_index = self._moe_index[layer]
        tokens = tokens_per_expert(routing, self.spec.num_experts)
        placement = self.policy.place(self.plan, self.state, forward, moe_index, tokens)
        return self.lower_moe_layer(forward, layer, placement)

    def lower_moe_layer(self, forward: ForwardInfo, layer: int, placement: Placement,
                        cpu_rows: int | None = None) -> list[Op]:
        """Build one MoE layer's ops from a placement.

        ``act_d2h`` declares ``cpu_rows`` rows when given. Without it, the declared count is
        min(tokens, CPU assignments), an upper bound on the distinct tokens the executor
        copies. The planner prices from token counts alone, so it relies on that bound.
        """
        # Ops are built as tuples in Op's field order (id, kind, lane, deps, layer, tokens,
        # context, flops, bytes, experts, slot, evicts), because this runs for every MoE layer of every pass.
        ids = self._ids[layer]
        num_tokens = forward.num_tokens
        activation = self._activation_bytes
        expert_bytes = self._expert_bytes
        expert_flops = self._expert_flops
        overlap = self.plan.overlap
        new = _new_tuple

        attention = self.lower_attention(forward, layer)
        router_id = ids.router
        ops: list[Op] = [attention, new(Op, (
            router_id, "router", "gpu", (attention[0],), layer, num_tokens, 0, num_tokens * self._router_flops,
            self._router_bytes + num_tokens * activation, (), -1, -1))]
        gpu_tail = router_id  # last GPU expert op so far, for the sequential (no overlap) variants

        # The CPU path first, so that CPU work starts while the GPU works.
        cpu_ops: list[Op] = []
        if placement.cpu:
            cpu_assignments = 0
            for _, count in placement.cpu:
                cpu_assignments += count
            # Every token with a CPU assignment crosses once; outputs come back per assignment.
            rows = cpu_rows if cpu_rows is not None else min(num_tokens, cpu_assignments)
            d2h = new(Op, (ids.act_d2h, "act_d2h", "d2h", (router_id,), layer, rows, 0, 0.0, rows * activation,
                           (), -1, -1))
            cpu = new(Op, (ids.cpu_experts, "cpu_experts", "cpu", (ids.act_d2h,), layer, cpu_assignments, 0,
                           cpu_assignments * expert_flops,
                           len(placement.cpu) * expert_bytes + 2 * cpu_assignments * activation,
                           tuple(placement.cpu), -1, -1))
            cpu_ops = [d2h, cpu]
            if overlap.cpu_with_gpu:
                ops += cpu_ops

        shared_id = None
        if self._shared:
            shared_id = ids.shared_expert
            ops.append(new(Op, (shared_id, "shared_expert", "gpu", (router_id,), layer, num_tokens, 0,
                                num_tokens * self._shared_flops,
                                self._shared_bytes + 2 * num_tokens * activation, (), -1, -1)))
            gpu_tail = shared_id

        # Copies must finish before the copied expert runs; a copy into a slot whose expert
        # was used in this pass waits for that reader.
        copies_with_compute = overlap.copies_with_compute
        reader_of: dict[int, str] = {}
        if placement.hits:
            hits_id = ids.gpu_experts
            assignments = 0
            for expert, count in placement.hits:
                assignments += count
                reader_of[expert] = hits_id
            ops.append(new(Op, (hits_id, "gpu_experts", "gpu", (router_id,) if copies_with_compute else (gpu_tail,),
                                layer, assignments, 0, assignments * expert_flops,
                                len(placement.hits) * expert_bytes + 2 * assignments * activation,
                                tuple(placement.hits), -1, -1)))
            gpu_tail = hits_id

        copy_ids = []
        if placement.copies:
            fetched_tokens = dict(placement.fetched)
            copy_id, run_id = ids.copy_id, ids.run_id
            for expert, slot, evicted in placement.copies:
                deps = (router_id,)
                reader = reader_of.get(evicted)
                if reader is not None:
                    deps = (router_id, reader)
                if not copies_with_compute and gpu_tail not in deps:
                    deps += (gpu_tail,)
                count = fetched_tokens.get(expert)
                copy = copy_id(expert)
                ops.append(new(Op, (copy, "expert_copy", "h2d", deps, layer, 0, 0, 0.0, expert_bytes,
                                    ((expert, count or 0),), slot, evicted)))
                copy_ids.append(copy)
                if count is not None:
                    run = run_id(expert)
                    ops.append(new(Op, (run, "gpu_expert", "gpu",
                                        (copy,) if copies_with_compute or gpu_tail == copy else (copy, gpu_tail),
                                        layer, count, 0, count * expert_flops, expert_bytes + 2 * count * activation,
                                        ((expert, count),), -1, -1)))
                    reader_of[expert] = run
                    gpu_tail = run

        combine_deps = [shared_id if shared_id is not None else router_id]
        if placement.hits:
            combine_deps.append(ids.gpu_experts)
        combine_deps += [reader_of[e] for e, _ in placement.fetched if e in reader_of]
        if cpu_ops:
            if not overlap.cpu_with_gpu:
                # The sequential reference: CPU work waits for all GPU expert work and copies.
                d2h, cpu = cpu_ops
                d2h = _op(d2h.id, d2h.kind, tuple(dict.fromkeys((router_id, gpu_tail, *copy_ids))), layer,
                          tokens=d2h.tokens, bytes=d2h.bytes)
                ops += [d2h, cpu]
            cpu = cpu_ops[1]
            ops.append(new(Op, (ids.act_h2d, "act_h2d", "h2d", (cpu[0],), layer, cpu.tokens, 0, 0.0,
                                cpu.tokens * activation, (), -1, -1)))
            combine_deps.append(ids.act_h2d)
        assignments = num_tokens * self._top_k
        ops.append(new(Op, (ids.combine, "combine", "gpu",
                            tuple(dict.fromkeys(combine_deps)) if len(combine_deps) > 1 else tuple(combine_deps),
                            layer, num_tokens, 0, 2.0 * assignments * self._hidden_size,
                            (assignments + 2 * num_tokens) * activation, (), -1, -1)))
        return ops

    def lower_epilogue(self, forward: ForwardInfo) -> list[Op]:
        tokens = forward.num_tokens
        last = self.previous_op(self.spec.num_layers)
        weight_bytes = self.spec.vocab_size * self.spec.hidden_size * self.dtype_bytes
        return [_op("head", "head", (last,), tokens=tokens, flops=tokens * self.spec.head_flops_per_token,
                    bytes=weight_bytes + tokens * self._activation_bytes)]

    # --- whole passes ---------------------------------------------------------------

    def lower_forward(self, forward: ForwardInfo, routing: np.ndarray) -> Schedule:
        """Lower one recorded forward pass; ``routing`` is its [T, L, K] expert ids."""
        ops = self.lower_prologue(forward)
        for layer in range(self.spec.num_layers):
            moe_index = self._moe_index.get(layer)
            ops += self.lower_layer(forward, layer, routing[:, moe_index, :] if moe_index is not None else None)
        ops += self.lower_epilogue(forward)
        return Schedule(forward, tuple(ops))


def lower_forward(plan: Plan, spec, state: PolicyState, forward: ForwardInfo, routing: np.ndarray) -> Schedule:
    """Lower one forward pass with an explicit policy state (which it updates)."""
    return Lowering(plan, spec, state).lower_forward(forward, routing)


def lower_trace(plan: Plan, spec, trace):
    """Yield the schedule of every forward pass of a trace, in order, from a fresh policy state."""
    lowering = Lowering(plan, spec)
    for forward, routing in trace:
        yield lowering.lower_forward(forward, routing)


def schedule_stats(schedule: Schedule) -> dict[str, float]:
    """Count hits, misses and bytes copied in one schedule."""
    hits = misses = h2d = d2h = copies = 0.0
    for op in schedule.ops:
        if op.kind == "gpu_experts":
            hits += op.tokens
        elif op.kind in ("gpu_expert", "cpu_experts"):
            misses += op.tokens
        if op.kind == "expert_copy":
            copies += 1
        if op.lane == "h2d":
            h2d += op.bytes
        elif op.lane == "d2h":
            d2h += op.bytes
    return {"hits": hits, "misses": misses, "expert_copies": copies, "h2d_bytes": h2d, "d2h_bytes": d2h}
