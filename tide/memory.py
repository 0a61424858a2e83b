"""The GPU memory budget: how many expert slots fit after everything else is counted."""

from __future__ import annotations

from dataclasses import dataclass

from tide.errors import InputError
from tide.units import format_bytes


@dataclass(frozen=True)
class MemoryBudget:
    """The parts of a GPU memory budget, in bytes, and the slots per MoE layer that remain."""

    gpu_memory_bytes: int
    non_expert_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    expert_bytes: int
    slots_per_layer: int

    @property
    def expert_pool_bytes(self) -> int:
        return self.gpu_memory_bytes - self.non_expert_bytes - self.kv_cache_bytes - self.activation_bytes \
            - self.reserve_bytes


def plan_memory(spec, gpu_memory_bytes: int, *, max_context_tokens: int = 4096, batch_tokens: int = 512,
                reserve_fraction: float = 0.05, dtype: str | None = None,
                device_memory_bytes: int | None = None) -> MemoryBudget:
    """Count non-expert weights, the KV cache for ``max_context_tokens``, activations for
    ``batch_tokens`` tokens and a reserve, then fit as many equal slots per MoE layer as remain.

    Raises InputError when the budget exceeds the device or cannot hold the non-expert parts.
    """
    if device_memory_bytes is not None and gpu_memory_bytes > device_memory_bytes:
        raise InputError(f"GPU memory budget {format_bytes(gpu_memory_bytes)} is larger than the device's "
                         f"{format_bytes(device_memory_bytes)}", field="gpu_memory", value=gpu_memory_bytes,
                         accepted=f"at most {device_memory_bytes} bytes")
    non_expert = spec.non_expert_bytes(dtype)
    kv_cache = max_context_tokens * spec.kv_bytes_per_token(dtype)
    # Hidden states, the widest MLP activations and the logits of one pass, with headroom for temporaries.
    dtype_bytes = spec.non_expert_bytes(dtype) // max(spec.non_expert_params, 1)
    widest = max(spec.intermediate_size, spec.moe_intermediate_size * spec.top_k, spec.vocab_size)
    activations = 4 * batch_tokens * (spec.hidden_size + widest) * dtype_bytes
    reserve = int(reserve_fraction * gpu_memory_bytes)
    fixed = non_expert + kv_cache + activations + reserve
    if gpu_memory_bytes < fixed:
        raise InputError(
            f"GPU memory budget {format_bytes(gpu_memory_bytes)} cannot hold the non-expert weights "
            f"({format_bytes(non_expert)}), KV cache ({format_bytes(kv_cache)}), activations "
            f"({format_bytes(activations)}) and reserve ({format_bytes(reserve)}) of model '{spec.name}'",
            field="gpu_memory", value=gpu_memory_bytes, accepted=f"at least {fixed} bytes")
    expert = spec.expert_bytes(dtype)
    slots = (gpu_memory_bytes - fixed) // (expert * max(spec.num_moe_layers, 1))
    return MemoryBudget(gpu_memory_bytes, non_expert, kv_cache, activations, reserve, expert,
                        int(min(slots, spec.num_experts)))
