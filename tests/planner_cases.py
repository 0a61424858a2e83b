"""Small specs, random traces and a round-number hardware profile for the planner and oracle tests."""

from __future__ import annotations

import numpy as np

from tide.hardware import CalibrationTable, HardwareProfile, load_profile
from tide.ir import ForwardInfo
from tide.spec import spec_from_config
from tide.trace import GenerationSettings, Trace, TraceMetadata

TINY_CONFIG = {
    "model_type": "llada2_moe",
    "hidden_size": 16,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
    "num_experts": 4,
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

# Expert weights of the tiny spec: 3 x 16 x 8 bf16 values.
TINY_EXPERT_BYTES = 768


def tiny_spec(**overrides):
    """A spec with 1 dense and 2 MoE layers, 4 experts, top-2 (override any config field)."""
    return spec_from_config({**TINY_CONFIG, **overrides}, name="tiny-planner")


def random_trace(spec, *, num_blocks: int = 3, steps: int = 4, tokens: int = 3, prompt_tokens: int = 4,
                 persistence: float = 0.6, seed: int = 0) -> Trace:
    """Draw a trace: a prefill, then blocks of up to ``steps`` denoising steps and a cache write each.

    Each MoE layer prefers its experts with random Dirichlet weights, and a token keeps
    each of its experts from one step to the next with probability ``persistence``.
    Blocks alternate between ``steps`` and ``steps - 1`` steps so τ patterns differ.
    """
    rng = np.random.default_rng(seed)
    num_layers, num_experts, top_k = spec.num_moe_layers, spec.num_experts, spec.top_k
    weights = rng.dirichlet(np.full(num_experts, 0.6), size=num_layers)

    def draw(previous: np.ndarray | None, count: int) -> np.ndarray:
        routing = np.zeros((count, num_layers, top_k), dtype=np.int16)
        for token in range(count):
            for layer in range(num_layers):
                keep = [] if previous is None else [int(e) for e in previous[token, layer]
                                                     if rng.random() < persistence]
                rest = [e for e in range(num_experts) if e not in keep]
                p = weights[layer, rest] / weights[layer, rest].sum()
                extra = rng.choice(rest, size=top_k - len(keep), replace=False, p=p).tolist()
                routing[token, layer] = keep + extra
        return routing

    forwards = [ForwardInfo(index=0, kind="prefill", num_tokens=prompt_tokens, context_tokens=prompt_tokens)]
    routings = [draw(None, prompt_tokens)]
    context = prompt_tokens
    for block in range(num_blocks):
        routing = draw(None, tokens)
        for step in range(steps - block % 2):
            if step:
                routing = draw(routing, tokens)
            forwards.append(ForwardInfo(index=len(forwards), kind="denoise", block=block, step=step,
                                        num_tokens=tokens, context_tokens=context + tokens, committed_tokens=1))
            routings.append(routing)
        routing = draw(routing, tokens)
        forwards.append(ForwardInfo(index=len(forwards), kind="cache_write", block=block, num_tokens=tokens,
                                    context_tokens=context + tokens))
        routings.append(routing)
        context += tokens
    metadata = TraceMetadata(spec_name=spec.name, spec_hash=spec.config_hash, num_moe_layers=num_layers,
                             num_experts=num_experts, top_k=top_k, source="test",
                             generation=GenerationSettings(block_length=tokens, steps=steps))
    return Trace(metadata, tuple(forwards), np.concatenate(routings))


def round_profile() -> HardwareProfile:
    """A profile whose expert ops cost round numbers from calibration tables.

    Per expert with t tokens (t >= 1): GPU 10 + (t - 1) us beyond a 10 us op overhead,
    CPU 30 + 10 (t - 1) us beyond a 20 us op overhead, and one expert copy 100 us. Tables
    sum per expert, so the planner's per-expert prices are exact on this profile.
    """
    data = load_profile("h100-pcie").to_json()
    data["name"] = "round-numbers"
    data["op_overhead_s"] = {"gpu": 1e-5, "h2d": 0.0, "d2h": 0.0, "cpu": 2e-5}
    tables = {
        "gpu_experts": CalibrationTable("tokens_per_expert", (1.0, 8.0), (2e-5, 2.7e-5)),
        "gpu_expert": CalibrationTable("tokens_per_expert", (1.0, 8.0), (2e-5, 2.7e-5)),
        "cpu_experts": CalibrationTable("tokens_per_expert", (1.0, 8.0), (5e-5, 1.2e-4)),
        "expert_copy": CalibrationTable("bytes", (TINY_EXPERT_BYTES, 2.0 * TINY_EXPERT_BYTES), (1e-4, 2e-4)),
    }
    data["tables"] = {kind: table.to_json() for kind, table in tables.items()}
    return HardwareProfile.from_json(data, source="round-numbers")
