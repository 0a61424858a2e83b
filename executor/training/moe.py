"""A differentiable forward pass for the MoE blocks of ``executor.model`` during training.

The model's own MoE forward runs each expert from a packed copy of the expert weights
(the layout the offload engine copies from), which autograd does not connect to the
expert parameters. Training instead calls each expert module directly. The function is
the same: the same gate, the same experts and ``combine_expert_outputs`` in top-k order,
so the trained weights mean the same thing to every inference path.

Shape letters: T tokens, K experts per token, H hidden, E experts.
"""

from __future__ import annotations

import types

import torch

from executor.model import LLaDA2MoeForCausalLM, LLaDA2MoeSparseMoeBlock, combine_expert_outputs, sort_assignments


class ExpertLoadCounter:
    """Number of (token, expert) assignments each expert of each MoE block received since the last reset."""

    def __init__(self, blocks: list[LLaDA2MoeSparseMoeBlock]) -> None:
        self.blocks = blocks
        self.counts = [torch.zeros(block.num_experts, dtype=torch.int64) for block in blocks]

    def add(self, block_index: int, ids: torch.Tensor) -> None:
        self.counts[block_index] += torch.bincount(ids.reshape(-1), minlength=self.counts[block_index].numel())

    def reset(self) -> None:
        for counts in self.counts:
            counts.zero_()


def _training_forward(block: LLaDA2MoeSparseMoeBlock, hidden: torch.Tensor, *, counter: ExpertLoadCounter,
                      block_index: int) -> torch.Tensor:
    x = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    ids, weights = block.gate(x)  # [T, K] each
    counter.add(block_index, ids.detach())
    order, offsets = sort_assignments(ids, block.num_experts)

    # One gather puts the token rows in expert-sorted order, each expert runs on its slice,
    # and one scatter puts the outputs back in (token, top-k position) order. Gathering per
    # expert would make backward zero-fill a [T, H] gradient once per expert.
    sorted_inputs = x[order // block.top_k]  # [T*K, H]
    counts = [offsets[e + 1] - offsets[e] for e in range(block.num_experts)]
    # split (not slicing) so backward concatenates the slices' gradients instead of zero-filling per slice.
    pieces = [block.experts[e](rows) for e, rows in enumerate(sorted_inputs.split(counts)) if counts[e]]
    outputs = x.new_empty(x.shape[0] * block.top_k, x.shape[1])
    outputs[order] = torch.cat(pieces)

    shared = block.shared_experts(x) if block.shared_experts is not None else None
    combined = combine_expert_outputs(outputs.view(x.shape[0], block.top_k, -1), weights, shared)
    return combined.view_as(hidden)


def enable_training_forward(model: LLaDA2MoeForCausalLM) -> ExpertLoadCounter:
    """Make every MoE block of ``model`` use the differentiable forward; return its load counter.

    Only these block instances change, not the class, so other models in the process keep
    the packed inference path.
    """
    blocks = model.moe_blocks()
    counter = ExpertLoadCounter(blocks)
    for index, block in enumerate(blocks):
        def forward(self, hidden, _index=index):
            return _training_forward(self, hidden, counter=counter, block_index=_index)
        block.forward = types.MethodType(forward, block)
    return counter


@torch.no_grad()
def update_expert_bias(counter: ExpertLoadCounter, rate: float) -> float:
    """Nudge each block's ``expert_bias`` toward equal load and reset the counter; return the mean imbalance.

    This is auxiliary-loss-free load balancing (as in DeepSeek-V3): an expert that received
    more than the mean load gets its selection bias lowered by ``rate``, one below the mean
    gets it raised. The bias only changes which experts are chosen, never the routing
    weights, so no gradient flows through it. The returned imbalance is max load / mean
    load, averaged over blocks (1.0 is perfectly balanced).
    """
    imbalances = []
    for block, counts in zip(counter.blocks, counter.counts):
        load = counts.double()
        mean = load.mean()
        if mean == 0:
            continue
        block.gate.expert_bias += rate * torch.sign(mean - load).to(block.gate.expert_bias.dtype)
        imbalances.append(float(load.max() / mean))
    counter.reset()
    return sum(imbalances) / len(imbalances) if imbalances else float("nan")
