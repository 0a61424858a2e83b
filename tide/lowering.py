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


def _op(op_id: str, kind: str, deps: tuple[str, ...], layer: int = -1, tokens: int = 0, context: int = 0,
        flops: float = 0.0, bytes: float = 0.0, experts: tuple[tuple[int, int], ...] = (), slot: int = -1,
        evicts: int = -1) -> Op:
    # Named parameters and a positional call rather than **kwargs, because a replay builds
    # hundreds of thousands of ops and this takes about a quarter less time per op.
    return Op(op_id, kind, OP_LANES[kind], deps, layer, tokens, context, flops, bytes, experts, slot, evicts)


def tokens_per_expert(routing: np.ndarray, num_experts: int) -> np.ndarray:
    """Count the tokens routed to each expert; ``routing`` is [T, K] expert ids."""
    return np.bincount(routing.ravel().astype(np.int64, copy=False), minlength=num_experts)


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

    # --- pieces -------------------------------------------------------------------

    def lower_prologue(self, forward: ForwardInfo) -> list[Op]:
        tokens = forward.num_tokens
        return [_op("embed", "embed", (), tokens=tokens, bytes=tokens * self._activation_bytes)]

    def previous_op(self, layer: int) -> str:
        """Return the id of the op that ends the layer before ``layer`` (``embed`` for layer 0)."""
        if layer == 0:
            return "embed"
        before = layer - 1
        return f"L{before:02d}.combine" if before in self._moe_index else f"L{before:02d}.dense_mlp"

    def lower_attention(self, forward: ForwardInfo, layer: int) -> Op:
        tokens, context = forward.num_tokens, forward.context_tokens
        return _op(f"L{layer:02d}.attention", "attention", (self.previous_op(layer),), layer, tokens=tokens,
                   context=context, flops=tokens * self.spec.attention_flops_per_token(context),
                   bytes=self._attention_weight_bytes + context * self._kv_bytes_per_context
                   + 2 * tokens * self._activation_bytes)

    def lower_dense_layer(self, forward: ForwardInfo, layer: int) -> list[Op]:
        tokens = forward.num_tokens
        attention = self.lower_attention(forward, layer)
        mlp = _op(f"L{layer:02d}.dense_mlp", "dense_mlp", (attention.id,), layer, tokens=tokens,
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
        prefix = f"L{layer:02d}."
        num_tokens = forward.num_tokens
        activation = self._activation_bytes
        overlap = self.plan.overlap
        ops: list[Op] = []

        attention = self.lower_attention(forward, layer)
        router = _op(prefix + "router", "router", (attention.id,), layer, tokens=num_tokens,
                     flops=num_tokens * self.spec.router_flops_per_token,
                     bytes=self.spec.router_params * self.dtype_bytes + num_tokens * activation)
        ops += [attention, router]
        gpu_tail = router.id  # last GPU expert op so far, for the sequential (no overlap) variants

        # The CPU path first, so that CPU work starts while the GPU works.
        cpu_ops: list[Op] = []
        if placement.cpu:
            cpu_assignments = sum(n for _, n in placement.cpu)
            # Every token with a CPU assignment crosses once; outputs come back per assignment.
            rows = cpu_rows if cpu_rows is not None else min(num_tokens, cpu_assignments)
            d2h = _op(prefix + "act_d2h", "act_d2h", (router.id,), layer, tokens=rows, bytes=rows * activation)
            cpu = _op(prefix + "cpu_experts", "cpu_experts", (d2h.id,), layer, tokens=cpu_assignments,
                      flops=cpu_assignments * self._expert_flops,
                      bytes=len(placement.cpu) * self._expert_bytes + 2 * cpu_assignments * activation,
                      experts=tuple(placement.cpu))
            cpu_ops = [d2h, cpu]
            if overlap.cpu_with_gpu:
                ops += cpu_ops

        shared = None
        if self.spec.num_shared_experts:
            shared = _op(prefix + "shared_expert", "shared_expert", (router.id,), layer, tokens=num_tokens,
                         flops=num_tokens * self.spec.shared_expert_flops_per_token,
                         bytes=self.spec.shared_expert_params * self.dtype_bytes + 2 * num_tokens * activation)
            ops.append(shared)
            gpu_tail = shared.id

        # Copies must finish before the copied expert runs; a copy into a slot whose expert
        # was used in this pass waits for that reader.
        reader_of: dict[int, str] = {}
        if placement.hits:
            assignments = sum(n for _, n in placement.hits)
            deps = (router.id,) if overlap.copies_with_compute else (gpu_tail,)
            hits = _op(prefix + "gpu_experts", "gpu_experts", deps, layer, tokens=assignments,
                       flops=assignments * self._expert_flops,
                       bytes=len(placement.hits) * self._expert_bytes + 2 * assignments * activation,
                       experts=tuple(placement.hits))
            ops.append(hits)
            gpu_tail = hits.id
            for expert, _ in placement.hits:
                reader_of[expert] = hits.id

        fetched_tokens = dict(placement.fetched)
        copy_ids = []
        for expert, slot, evicted in placement.copies:
            deps = [router.id]
            if evicted in reader_of:
                deps.append(reader_of[evicted])
            if not overlap.copies_with_compute and gpu_tail not in deps:
                deps.append(gpu_tail)
            copy = _op(f"{prefix}copy.e{expert}", "expert_copy", tuple(deps), layer, bytes=self._expert_bytes,
                       slot=slot, evicts=evicted, experts=((expert, fetched_tokens.get(expert, 0)),))
            ops.append(copy)
            copy_ids.append(copy.id)
            if expert in fetched_tokens:
                count = fetched_tokens[expert]
                run_deps = (copy.id,) if overlap.copies_with_compute else (copy.id, gpu_tail)
                run = _op(f"{prefix}gpu_expert.e{expert}", "gpu_expert", tuple(dict.fromkeys(run_deps)), layer,
                          tokens=count, flops=count * self._expert_flops,
                          bytes=self._expert_bytes + 2 * count * activation, experts=((expert, count),))
                ops.append(run)
                reader_of[expert] = run.id
                gpu_tail = run.id

        combine_deps = [shared.id] if shared is not None else [router.id]
        if placement.hits:
            combine_deps.append(prefix + "gpu_experts")
        combine_deps += [reader_of[e] for e, _ in placement.fetched if e in reader_of]
        if cpu_ops:
            if not overlap.cpu_with_gpu:
                # The sequential reference: CPU work waits for all GPU expert work and copies.
                d2h, cpu = cpu_ops
                d2h = _op(d2h.id, d2h.kind, tuple(dict.fromkeys((router.id, gpu_tail, *copy_ids))), layer,
                          tokens=d2h.tokens, bytes=d2h.bytes)
                ops += [d2h, cpu]
            cpu = cpu_ops[1]
            h2d = _op(prefix + "act_h2d", "act_h2d", (cpu.id,), layer, tokens=cpu.tokens,
                      bytes=cpu.tokens * activation)
            ops.append(h2d)
            combine_deps.append(h2d.id)
        assignments = num_tokens * self.spec.top_k
        ops.append(_op(prefix + "combine", "combine", tuple(dict.fromkeys(combine_deps)), layer,
                       tokens=num_tokens, flops=2.0 * assignments * self.spec.hidden_size,
                       bytes=(assignments + 2 * num_tokens) * activation))
        return ops

    def lower_epilogue(self, forward: ForwardInfo) -> list[Op]:
        tokens = forward.num_tokens
        last = self.previous_op(self.spec.num_layers)
        return [_op("head", "head", (last,), tokens=tokens, flops=tokens * self.spec.head_flops_per_token,
                    bytes=self.spec.vocab_size * self.spec.hidden_size * self.dtype_bytes + tokens * self._activation_bytes)]

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
