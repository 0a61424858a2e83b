"""The offload engine: runs the shared schedule of every forward pass, op by op, on real devices.

For every MoE layer the engine keeps

* a master copy of all routed experts, one [E, 3*I*H] tensor in host memory, pinned when
  the device is CUDA and pinning works (pageable otherwise, with a warning, and
  ``pinned`` False in the run's summary);
* a pool of accelerator slots, one [S, 3*I*H] tensor, and the expert in each slot.

The engine decides nothing. In each forward pass it runs a layer's attention and router
and hands the routing (expert ids on the host) to ``tide.lowering.Lowering.lower_layer``,
which gets a placement from the plan's policy. Then it runs exactly the ops it gets back,
in order, each on its lane (``executor.lanes``): expert copies into the slots the ops name,
resident experts on the accelerator, misses on the CPU thread or from freshly copied
slots. The simulator lowers the same routing with the same function, so both run the same
ops with the same ids.

Every routed expert writes its output into a per-(token, top-k position) buffer, and
``combine`` sums that buffer in top-k order. An expert always sees all of its tokens in
one call, whichever lane runs it, so on the CPU device the output is bitwise the same
under every policy.

Shape letters: T tokens fed, H hidden, K experts per token, E experts, S slots, P packed
expert size (3*I*H).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch

from executor.lanes import CudaLanes, SerialLanes, ThreadLanes, call_in_inference_mode, worker_pool
from executor.model import KVCache, combine_expert_outputs, expert_mlp
from tide.ir import LANES, ForwardInfo, Op, Plan, Schedule, Span
from tide.lowering import Lowering, schedule_stats
from tide.policies import check_plan_matches_spec

logger = logging.getLogger(__name__)


@dataclass
class EngineCounters:
    """Totals over the forward passes an engine ran."""

    num_forwards: int = 0
    hits: int = 0  # (token, expert) assignments served by experts resident when the routing arrived
    misses: int = 0
    expert_copies: int = 0
    h2d_bytes: int = 0  # measured: expert copies plus CPU expert outputs sent back
    d2h_bytes: int = 0  # measured: hidden states of tokens with CPU work
    lowered_h2d_bytes: float = 0.0  # what the schedules' ops declare
    lowered_d2h_bytes: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


@dataclass(slots=True)
class _MoePass:
    """State that one MoE layer's ops share during one forward pass."""

    moe_index: int
    residual: torch.Tensor  # [T, H] hidden state after attention
    x: torch.Tensor  # [T, H] post-attention norm, the experts' input
    weights: torch.Tensor  # [T, K] float32 routing weights
    ids_host: np.ndarray  # [T, K] expert ids
    order: torch.Tensor  # flat (token, top-k position) indices sorted by expert, on the device
    order_tokens: torch.Tensor  # the token of each entry of ``order``, on the device
    offsets: list[int]  # E + 1 values: the start of each expert's run in ``order``
    outputs: torch.Tensor  # [T * K, H] one row per assignment
    layer_ops: list[Op] = field(default_factory=list)  # the layer's lowered ops
    order_host: np.ndarray | None = None  # ``order`` on the host, for the CPU lane
    shared: torch.Tensor | None = None
    cpu_rows: np.ndarray | None = None  # flat assignment indices served on the CPU, grouped by expert
    cpu_ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (expert, start, end) in cpu_rows
    cpu_tokens: np.ndarray | None = None  # sorted tokens with CPU work
    token_slot: np.ndarray | None = None  # token -> row in the host copy of x
    x_host: torch.Tensor | None = None
    y_host: torch.Tensor | None = None
    y_device: torch.Tensor | None = None


@dataclass(slots=True)
class _Pass:
    """State of one forward pass."""

    info: ForwardInfo
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    kv_cache: KVCache | None
    hidden: torch.Tensor | None = None  # [1, T, H]
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    moe: _MoePass | None = None
    routing: list[np.ndarray] = field(default_factory=list)  # per MoE layer, [T, K]
    routing_weights: list[torch.Tensor] = field(default_factory=list)


def _no_executor(op: Op) -> NotImplementedError:
    return NotImplementedError(f"op kind {op.kind!r} ({op.id}) has no executor")


def try_pin_memory(enabled: bool) -> tuple[bool, str]:
    """Check whether pinned host memory can be allocated; return (pinned, reason)."""
    if not enabled:
        return False, "not requested"
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError as error:
        return False, f"pinning failed: {error}".splitlines()[0]
    return True, "pinned"


class OffloadEngine:
    """Runs an ``llada2_moe`` model with routed experts offloaded to host memory, under one plan.

    The engine is a generation runner (``executor.generate.ForwardRunner``): ``forward``
    runs one pass, ``end_forward`` closes it once its committed token count is known.
    ``record_trace`` keeps every pass's routing for ``executor.records``; ``record_timeline``
    keeps one span per op. Busy time per lane (``lane_busy_s``) is kept either way; without
    a timeline, serial lanes time runs of ops on one lane instead of each op, which saves
    clock reads. ``serial_lanes`` (CPU device only) runs every op on the calling
    thread in schedule order; None, the default, does so on the CPU device, and False runs
    the copy and CPU lanes on worker threads instead.
    """

    def __init__(self, model, plan: Plan, spec, *, device: torch.device | str = "cpu",
                 pin_memory: bool | None = None, cpu_threads: int = 1, record_trace: bool = True,
                 record_timeline: bool = True, keep_schedules: bool = False,
                 serial_lanes: bool | None = None) -> None:
        check_plan_matches_spec(plan, spec)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(f"offload engine on a {self.device.type} device: only cpu and cuda are built")
        self.plan = plan
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.config = model.config
        self.dtype = model.get_input_embeddings().weight.dtype
        self.top_k = self.config.num_experts_per_tok
        self.num_experts = self.config.num_experts
        self.intermediate_size = self.config.moe_intermediate_size
        self.record_trace = record_trace
        self.record_timeline = record_timeline
        self.keep_schedules = keep_schedules

        # Master copies: pinned only where a CUDA copy engine can use them.
        want_pinned = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.pinned, self.pinning_note = try_pin_memory(want_pinned)
        if want_pinned and not self.pinned:
            logger.warning("host memory cannot be pinned (%s); expert master copies are pageable, so copies to "
                           "the accelerator are slower and synchronous", self.pinning_note)
        self.blocks = model.moe_blocks()
        self.master = [self._pack(block) for block in self.blocks]
        self._move_non_experts()

        # Slots, and the resident sets the policy starts from (load time, not counted as copies).
        self.lowering = Lowering(plan, spec)
        packed_size = self.master[0].shape[1] if self.master else 0
        # Zeroed, not empty: on the CPU device the first write to a fresh page faults it in,
        # which made a slot's first copy about 8 times slower than later ones (1.5 MiB
        # experts on a 2-core development machine).
        self.slots = [torch.zeros(budget, packed_size, dtype=self.dtype, device=self.device)
                      for budget in plan.slot_budgets]
        self.slot_experts: list[list[int]] = []
        self.load_h2d_bytes = 0
        for moe_index, layer_state in enumerate(self.lowering.state.layers):
            for slot, expert in enumerate(layer_state.slots):
                if expert >= 0:
                    self.slots[moe_index][slot].copy_(self.master[moe_index][expert])
                    self.load_h2d_bytes += self.slots[moe_index][slot].nbytes
            self.slot_experts.append(list(layer_state.slots))
        self._slot_of = [{e: s for s, e in enumerate(slots) if e >= 0} for slots in self.slot_experts]
        self._moe_index = {layer: i for i, layer in enumerate(spec.moe_layers)}
        # Each MoE layer runs its attention and router ops before it is lowered. They depend on
        # the layer alone, so they are built once here, and every lowered layer is checked against them.
        self._pre_lowering_ops = {}
        for layer in spec.moe_layers:
            attention = Op(f"L{layer:02d}.attention", "attention", "gpu", (self.lowering.previous_op(layer),), layer)
            router = Op(f"L{layer:02d}.router", "router", "gpu", (attention.id,), layer)
            self._pre_lowering_ops[layer] = (attention, router)
        # The binder of each op kind, looked up in a dictionary rather than found by a chain of tests.
        self._binders = {
            "embed": self._bind_embed,
            "attention": self._bind_attention,
            "dense_mlp": self._bind_dense_mlp,
            "shared_expert": self._bind_shared_expert,
            "gpu_experts": self._bind_slot_experts,
            "gpu_expert": self._bind_slot_experts,
            "expert_copy": self._bind_copy,
            "act_d2h": self._bind_act_d2h,
            "cpu_experts": self._bind_cpu_experts,
            "act_h2d": self._bind_act_h2d,
            "combine": self._bind_combine,
            "head": self._bind_head,
        }

        self.cpu_threads = max(1, cpu_threads)
        if self.device.type == "cuda":
            if serial_lanes:
                raise NotImplementedError("serial lanes on a CUDA device: its lanes are streams that overlap")
            self.lanes = CudaLanes(self.device)
        elif serial_lanes is False:
            self.lanes = ThreadLanes()
        else:
            # On the CPU device the accelerator lane and the CPU lane share the cores, so by
            # default nothing overlaps (see executor.lanes.SerialLanes). When this thread does
            # all the work, spans measure its CPU time, which leaves out other processes.
            # Without a timeline only lane busy times are kept, which need no clock per op.
            single_thread = torch.get_num_threads() == 1 and self.cpu_threads == 1
            self.lanes = SerialLanes(cpu_clock=single_thread, op_spans=record_timeline)
        # Each expert thread gets an equal share of the intra-op threads.
        self._cpu_pool = (worker_pool(self.cpu_threads, "tide-cpu-expert",
                                      max(1, torch.get_num_threads() // self.cpu_threads))
                          if self.cpu_threads > 1 else None)

        self.counters = EngineCounters()
        self.spans: list[Span] = []
        self.schedules: list[Schedule] = []
        self.forwards: list[ForwardInfo] = []
        self.routing: list[np.ndarray] = []  # per forward pass, [T, L, K] int16
        self.routing_weights: list[np.ndarray] = []
        self._busy_s = {lane: 0.0 for lane in LANES}
        self.origin_s = time.perf_counter()
        self._open: _Pass | None = None
        self._open_ops: list[Op] = []
        logger.info("offload engine on %s: %s, slots per MoE layer %s, master copies %s", self.device,
                    plan.policy, list(plan.slot_budgets), "pinned" if self.pinned else "pageable")

    # --- set-up -----------------------------------------------------------------------

    def _pack(self, block) -> torch.Tensor:
        packed = block._packed
        if packed is not None and packed.device.type == "cpu" and packed.is_pinned() == self.pinned \
                and block.experts[0].gate_proj.weight.data_ptr() == packed[0].data_ptr():
            return packed
        return block.pack_experts(device="cpu", pin_memory=self.pinned)

    def _move_non_experts(self) -> None:
        """Move every parameter and buffer but the routed experts to the device."""
        for name, param in self.model.named_parameters():
            if ".mlp.experts." not in name:
                param.data = param.data.to(self.device)
        for module in self.model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)

    def close(self) -> None:
        """Stop the lane threads."""
        self.lanes.close()
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown(wait=True)

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def new_kv_cache(self, max_tokens: int) -> KVCache:
        return KVCache(self.config, max_tokens, dtype=self.dtype, device=self.device)

    # --- one forward pass ---------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, *, info: ForwardInfo, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                write_cache: bool = False) -> torch.Tensor:
        """Run one forward pass of ``input_ids`` [1, T] by its schedule; return the logits [T, V]."""
        if input_ids.shape[0] != 1:
            raise NotImplementedError("offload engine with a batch of several sequences: it runs one at a time")
        if self._open is not None:
            raise RuntimeError(f"forward pass {self._open.info.index} was not closed with end_forward")
        state = _Pass(info, input_ids, position_ids, attention_mask, kv_cache)
        self._open = state
        self._open_ops = []
        self.lanes.begin_forward()
        lowering = self.lowering

        self._run_ops(lowering.lower_prologue(info), state)
        for layer in range(self.spec.num_layers):
            if layer in self._moe_index:
                self._run_moe_layer(layer, state)
            else:
                self._run_ops(lowering.lower_layer(info, layer), state)
        self._run_ops(lowering.lower_epilogue(info), state)

        records = self.lanes.finish_forward()
        if kv_cache is not None and write_cache:
            kv_cache.advance(input_ids.shape[1])
        busy = self._busy_s
        for op, start, end in records:
            busy[op.lane] += end - start
        if self.record_timeline:
            self.spans.extend(Span(info.index, op.id, op.kind, op.lane, start - self.origin_s, end - self.origin_s,
                                   op.layer) for op, start, end in records)
        return state.logits[0]

    def end_forward(self, info: ForwardInfo) -> None:
        """Close the open pass: count its ops and keep its routing under the final ``info``."""
        state = self._open
        if state is None or state.info.index != info.index:
            raise RuntimeError(f"end_forward for pass {info.index}, but the open pass is "
                               f"{None if state is None else state.info.index}")
        schedule = Schedule(info, tuple(self._open_ops))
        stats = schedule_stats(schedule)
        counters = self.counters
        counters.num_forwards += 1
        counters.hits += int(stats["hits"])
        counters.misses += int(stats["misses"])
        counters.expert_copies += int(stats["expert_copies"])
        counters.lowered_h2d_bytes += stats["h2d_bytes"]
        counters.lowered_d2h_bytes += stats["d2h_bytes"]
        self.forwards.append(info)
        if self.keep_schedules:
            self.schedules.append(schedule)
        if self.record_trace:
            self.routing.append(np.stack(state.routing, axis=1).astype(np.int16))
            self.routing_weights.append(torch.stack(state.routing_weights, dim=1).float().cpu().numpy())
        self._open = None
        self._open_ops = []

    def _run_ops(self, ops: list[Op], state: _Pass) -> None:
        self._issue_ops(ops, state)
        self._open_ops.extend(ops)

    def _issue_ops(self, ops: list[Op], state: _Pass) -> None:
        run, binders = self.lanes.run, self._binders
        for op in ops:
            binder = binders.get(op.kind)
            if binder is None:
                raise _no_executor(op)
            run(op, *binder(op, state))

    def _run_moe_layer(self, layer: int, state: _Pass) -> None:
        """Run attention and the router, lower the layer with the routing, then run the rest of its ops."""
        # Attention and the router run before lowering, because lowering needs the routing.
        # The lowered schedule must start with the same two ops, which the check below enforces.
        attention, router = self._pre_lowering_ops[layer]
        run = self.lanes.run
        run(attention, self._attention, layer, state)
        run(router, self._router, layer, state)
        moe = state.moe
        ops = self.lowering.lower_layer(state.info, layer, moe.ids_host)
        for ran, lowered in zip((attention, router), ops):
            if (ran.id, ran.kind, ran.lane, ran.deps) != (lowered.id, lowered.kind, lowered.lane, lowered.deps):
                raise RuntimeError(f"layer {layer}: the engine ran {ran.id} before lowering, but the schedule "
                                   f"has {lowered.id} ({lowered.kind}, deps {lowered.deps}) in its place")
        self._open_ops.extend(ops)
        # act_d2h prepares the CPU path, so that its cost falls on an op that exists only
        # when the layer has CPU work, and not on the router.
        moe.layer_ops = ops
        self._issue_ops(ops[2:], state)

    # --- binding ops to their work ---------------------------------------------------------
    # A binder returns (work, *args) for an op. It runs on the issuing thread in schedule order, so slots resolve
    # in that order, and takes the layer's _MoePass now, because a worker lane may run the op after it changes.

    def _work(self, op: Op, state: _Pass) -> Callable[[], None]:
        """Return the work of ``op`` as one callable (``tide.calibrate`` times ops with it)."""
        binder = self._binders.get(op.kind)
        if binder is None:
            raise _no_executor(op)
        return partial(*binder(op, state))

    def _bind_embed(self, op: Op, state: _Pass) -> tuple:
        return self._embed, state

    def _bind_attention(self, op: Op, state: _Pass) -> tuple:
        return self._attention, op.layer, state

    def _bind_dense_mlp(self, op: Op, state: _Pass) -> tuple:
        return self._dense_mlp, op.layer, state

    def _bind_shared_expert(self, op: Op, state: _Pass) -> tuple:
        return self._shared_expert, op.layer, state.moe

    def _bind_slot_experts(self, op: Op, state: _Pass) -> tuple:
        moe = state.moe
        slot_of = self._slot_of[moe.moe_index]
        try:
            jobs = [(e, slot_of[e]) for e, _ in op.experts]
        except KeyError:
            missing = [e for e, _ in op.experts if e not in slot_of]
            raise RuntimeError(f"{op.id} runs experts {missing} that are in no slot") from None
        return self._slot_experts, jobs, moe

    def _bind_copy(self, op: Op, state: _Pass) -> tuple:
        moe_index = state.moe.moe_index
        expert = op.experts[0][0]
        occupant = self.slot_experts[moe_index][op.slot]
        if occupant != op.evicts:
            raise RuntimeError(f"{op.id}: slot {op.slot} contains expert {occupant}, but the op evicts {op.evicts}; "
                               "the engine's slots and the policy state disagree")
        if occupant >= 0:
            del self._slot_of[moe_index][occupant]
        self.slot_experts[moe_index][op.slot] = expert
        self._slot_of[moe_index][expert] = op.slot
        return self._copy_expert, moe_index, expert, op.slot

    def _bind_act_d2h(self, op: Op, state: _Pass) -> tuple:
        return self._act_d2h, state.moe

    def _bind_cpu_experts(self, op: Op, state: _Pass) -> tuple:
        return self._cpu_experts, state.moe

    def _bind_act_h2d(self, op: Op, state: _Pass) -> tuple:
        return self._act_h2d, state.moe

    def _bind_combine(self, op: Op, state: _Pass) -> tuple:
        return self._combine, state

    def _bind_head(self, op: Op, state: _Pass) -> tuple:
        return self._head, state

    # --- op work ------------------------------------------------------------------------

    def _embed(self, state: _Pass) -> None:
        model = self.model.model
        state.hidden = model.word_embeddings(state.input_ids)
        state.cos, state.sin = model.rotary(state.position_ids, state.hidden.dtype)

    def _attention(self, layer: int, state: _Pass) -> None:
        block = self.model.model.layers[layer]
        state.hidden = block.attention_block(state.hidden, state.cos, state.sin, state.attention_mask,
                                             state.kv_cache)

    def _dense_mlp(self, layer: int, state: _Pass) -> None:
        block = self.model.model.layers[layer]
        state.hidden = state.hidden + block.mlp(block.post_attention_layernorm(state.hidden))

    def _router(self, layer: int, state: _Pass) -> None:
        block = self.model.model.layers[layer]
        residual = state.hidden[0]
        x = block.post_attention_layernorm(residual)
        ids, weights = block.mlp.gate(x)
        ids_host = ids.cpu().numpy()
        offsets = [0, *np.cumsum(np.bincount(ids_host.reshape(-1), minlength=self.num_experts)).tolist()]
        order = torch.argsort(ids.reshape(-1), stable=True)
        state.moe = _MoePass(
            moe_index=self._moe_index[layer], residual=residual, x=x, weights=weights, ids_host=ids_host,
            order=order, order_tokens=order // self.top_k, offsets=offsets,
            outputs=x.new_empty(x.shape[0] * self.top_k, x.shape[1]))
        if self.record_trace:
            state.routing.append(ids_host)
            state.routing_weights.append(weights)

    def _prepare_cpu_work(self, ops: list[Op], moe: _MoePass) -> None:
        """Work out, on the host, which assignments and tokens the layer's CPU op serves."""
        cpu_op = next((op for op in ops if op.kind == "cpu_experts"), None)
        if cpu_op is None:
            return
        # A stable sort, like the device's, so host and device group assignments in the same order.
        moe.order_host = np.argsort(moe.ids_host.reshape(-1), kind="stable")
        pieces, ranges, start = [], [], 0
        for expert, _ in cpu_op.experts:
            rows = moe.order_host[moe.offsets[expert]:moe.offsets[expert + 1]]
            pieces.append(rows)
            ranges.append((expert, start, start + len(rows)))
            start += len(rows)
        moe.cpu_rows = np.concatenate(pieces)
        moe.cpu_ranges = ranges
        moe.cpu_tokens = np.unique(moe.cpu_rows // self.top_k)
        moe.token_slot = np.full(moe.x.shape[0], -1, dtype=np.int64)
        moe.token_slot[moe.cpu_tokens] = np.arange(len(moe.cpu_tokens))

    def _shared_expert(self, layer: int, moe: _MoePass) -> None:
        moe.shared = self.model.model.layers[layer].mlp.shared_experts(moe.x)

    def _slot_experts(self, jobs: list[tuple[int, int]], moe: _MoePass) -> None:
        # index_select and index_copy_ move the same rows as x[rows] and outputs[rows] = y, so the result
        # is bitwise the plain model's, in about 2 us less per expert (measured with 32 tokens, 1 thread).
        slots, x, outputs = self.slots[moe.moe_index], moe.x, moe.outputs
        order, order_tokens, offsets = moe.order, moe.order_tokens, moe.offsets
        for expert, slot in jobs:
            start, end = offsets[expert], offsets[expert + 1]
            y = expert_mlp(x.index_select(0, order_tokens[start:end]), slots[slot], self.intermediate_size)
            outputs.index_copy_(0, order[start:end], y)

    def _copy_expert(self, moe_index: int, expert: int, slot: int) -> None:
        target = self.slots[moe_index][slot]
        target.copy_(self.master[moe_index][expert], non_blocking=self.pinned)
        self.counters.h2d_bytes += target.nbytes

    def _act_d2h(self, moe: _MoePass) -> None:
        # NOTE: one row per distinct token with CPU work. The lowering declares
        # min(tokens, CPU assignments) rows, so measured d2h bytes can be below the schedule's.
        self._prepare_cpu_work(moe.layer_ops, moe)
        tokens = torch.from_numpy(moe.cpu_tokens).to(self.device)
        rows = moe.x.index_select(0, tokens)
        if self.device.type == "cpu":
            moe.x_host = rows  # index_select already made the copy
        else:
            moe.x_host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=self.pinned)
            moe.x_host.copy_(rows, non_blocking=self.pinned)
        self.counters.d2h_bytes += moe.x_host.nbytes

    def _cpu_experts(self, moe: _MoePass) -> None:
        # NOTE: on a CUDA device these outputs come from host kernels and may round differently
        # from the same expert run on the GPU. Bitwise equality across policies holds on the CPU device.
        master = self.master[moe.moe_index]
        moe.y_host = torch.empty(len(moe.cpu_rows), moe.x.shape[1], dtype=self.dtype,
                                 pin_memory=self.pinned and self.device.type == "cuda")

        def run_expert(expert: int, start: int, end: int) -> None:
            local = moe.token_slot[moe.cpu_rows[start:end] // self.top_k]
            x_rows = moe.x_host[torch.from_numpy(local)]
            moe.y_host[start:end] = expert_mlp(x_rows, master[expert], self.intermediate_size)

        if self._cpu_pool is None:
            for expert, start, end in moe.cpu_ranges:
                run_expert(expert, start, end)
        else:
            futures = [self._cpu_pool.submit(call_in_inference_mode, run_expert, *job) for job in moe.cpu_ranges]
            for future in futures:
                future.result()

    def _act_h2d(self, moe: _MoePass) -> None:
        if self.device.type == "cpu":
            # On the CPU device the copy back is the scatter into the assignment buffer
            # itself, so its cost falls on this op, which the schedule sizes by CPU rows.
            rows = torch.from_numpy(moe.cpu_rows)
            moe.outputs.index_copy_(0, rows, moe.y_host)
        else:
            moe.y_device = moe.y_host.to(self.device, non_blocking=self.pinned)
            moe.y_device.record_stream(self.lanes.stream("gpu"))
        self.counters.h2d_bytes += moe.y_host.nbytes

    def _combine(self, state: _Pass) -> None:
        moe = state.moe
        if moe.y_device is not None:
            rows = torch.from_numpy(moe.cpu_rows).to(self.device)
            moe.outputs.index_copy_(0, rows, moe.y_device)
        tokens = moe.x.shape[0]
        combined = combine_expert_outputs(moe.outputs.view(tokens, self.top_k, -1), moe.weights, moe.shared)
        state.hidden = (moe.residual + combined)[None]
        state.moe = None

    def _head(self, state: _Pass) -> None:
        state.logits = self.model.lm_head(self.model.model.norm(state.hidden))

    # --- records ------------------------------------------------------------------------

    def lane_busy_s(self) -> dict[str, float]:
        """Seconds each lane spent running ops, over every pass so far."""
        return dict(self._busy_s)
