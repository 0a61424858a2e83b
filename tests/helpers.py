"""Small hand-built specs and traces shared by the tests."""

from __future__ import annotations

import numpy as np

from tide.ir import ForwardInfo
from tide.policies import make_plan
from tide.spec import spec_from_config
from tide.trace import GenerationSettings, Trace, TraceMetadata

SMALL_CONFIG = {
    "model_type": "llada2_moe",
    "hidden_size": 16,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_experts": 6,
    "num_experts_per_tok": 2,
    "num_shared_experts": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 64,
    "n_group": 1,
    "topk_group": 1,
    "mask_token_id": 63,
    "eos_token_id": 62,
    "torch_dtype": "bfloat16",
}


def small_spec(**overrides):
    """A spec with 1 dense and 2 MoE layers, 6 experts, top-2."""
    return spec_from_config({**SMALL_CONFIG, **overrides}, name="small")


def make_trace(spec, routings: list[np.ndarray], kinds: list[str] | None = None, blocks=None, steps=None) -> Trace:
    """Build a trace from per-pass [T, L, K] routings; passes default to prefill then denoise steps of block 0."""
    kinds = kinds or ["prefill"] + ["denoise"] * (len(routings) - 1)
    forwards = []
    context = 0
    for i, routing in enumerate(routings):
        kind = kinds[i]
        prefill = kind == "prefill"
        if blocks:
            block = blocks[i]
        else:
            block = -1 if prefill else 0
        if steps:
            step = steps[i]
        else:
            step = -1 if prefill else i - 1
        tokens = routing.shape[0]
        if prefill:
            context = tokens
        elif kind == "cache_write":
            context += tokens
        forwards.append(ForwardInfo(index=i, kind=kind, block=block, step=step, num_tokens=tokens,
                                    context_tokens=max(context, tokens) + (tokens if kind == "denoise" else 0),
                                    committed_tokens=1 if kind == "denoise" else 0))
    metadata = TraceMetadata(spec_name=spec.name, spec_hash=spec.config_hash, num_moe_layers=spec.num_moe_layers,
                             num_experts=spec.num_experts, top_k=spec.top_k, prompt_ids=("p0",),
                             generation=GenerationSettings(block_length=4, steps=4), source="test")
    experts = np.concatenate(routings).astype(np.int16)
    return Trace(metadata, tuple(forwards), experts)


def plans_for(spec, trace):
    """Return a plan for every policy, with 6 slots where the policy takes a budget.

    The oracle's placements are each pass's top experts, as a planner might pick them.
    """
    placements = {}
    for forward, routing in trace:
        top = []
        for layer in range(spec.num_moe_layers):
            counts = np.bincount(routing[:, layer, :].ravel(), minlength=spec.num_experts)
            top.append(tuple(int(e) for e in np.argsort(-counts, kind="stable")[:6]))
        placements[forward.index] = tuple(top)
    return {
        "all-gpu": make_plan("all-gpu", spec),
        "tide": make_plan("tide", spec, slot_budget=6, interval=2),
        "every-step": make_plan("every-step", spec, slot_budget=6),
        "static": make_plan("static", spec, slot_budget=6, profiling_trace=trace),
        "lru-fetch": make_plan("lru-fetch", spec, slot_budget=6),
        "cpu-experts": make_plan("cpu-experts", spec),
        "oracle": make_plan("oracle", spec, slot_budget=6, placements=placements),
    }
