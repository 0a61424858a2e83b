"""The ``llada2_moe`` architecture (LLaDA2.0-mini and -flash) on transformers' ``PreTrainedModel``.

Parameter names follow the published checkpoints, so ``from_pretrained`` loads them by
name:

* ``model.word_embeddings``;
* per layer ``attention.query_key_value`` (fused, no bias), ``attention.query_layernorm``
  and ``attention.key_layernorm`` (qk-norm), ``attention.dense``, ``input_layernorm`` and
  ``post_attention_layernorm``;
* dense layers ``mlp.{gate,up,down}_proj``;
* MoE layers ``mlp.gate.weight``, ``mlp.gate.expert_bias``,
  ``mlp.experts.{e}.{gate,up,down}_proj`` and ``mlp.shared_experts.{gate,up,down}_proj``;
* ``model.norm`` and ``lm_head``.

Routed experts are one module each, so the offload engine can place experts one at a
time. ``LLaDA2MoeSparseMoeBlock.pack_experts`` moves a layer's expert weights into one
[E, 3*I*H] tensor (gate, up, down of each expert back to back) and turns the expert
parameters into views of it; the engine keeps that tensor in pinned host memory and
copies single rows into accelerator slots.

The forward pass here is the plain all-resident path: every expert of a layer runs where
the layer's weights are. The offload engine (``executor.engine``) calls the same pieces
(``attention_block``, the gate, ``expert_mlp``, ``combine_expert_outputs``) op by op.

Shape letters: B batch, T tokens fed, S keys attended to, H hidden, N query heads, G
key-value heads, D head dim, E experts, K experts per token, I expert width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from executor.model.configuration_llada2 import LLaDA2MoeConfig

try:
    # transformers 5: these skip tensors that loading already filled.
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, then scale in the model dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ----------------------------------------------------------------------------------------
# Rotary embedding on the leading rotary_dim dimensions of each head


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return cos and sin, each [B, 1, T, rotary_dim], for ``position_ids`` [B, T]."""
    exponents = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dimensions of ``x`` [B, heads, T, D] (half-split pairs)."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    partner = torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1)
    return torch.cat([rotated * cos + partner * sin, passed], dim=-1)


# ----------------------------------------------------------------------------------------
# KV cache of finished blocks


class KVCache:
    """Keys and values of every decoder layer, preallocated for ``max_tokens`` positions.

    A forward pass writes its keys and values at ``[length, length + T)`` and attends to
    ``[0, length + T)``. Only a pass that calls ``advance`` (the prefill and cache-write
    passes) keeps them: a denoising step's entries are overwritten by the next pass.
    """

    def __init__(self, config: LLaDA2MoeConfig, max_tokens: int, *, dtype: torch.dtype,
                 device: torch.device | str, batch_size: int = 1) -> None:
        shape = (batch_size, config.num_key_value_heads, max_tokens, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_tokens = max_tokens
        self.length = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one pass's keys and values [B, G, T, D]; return all keys and values up to them."""
        end = self.length + keys.shape[2]
        if end > self.max_tokens:
            raise ValueError(f"KV cache has room for {self.max_tokens} positions, but the pass needs {end}")
        self.keys[layer][:, :, self.length:end] = keys
        self.values[layer][:, :, self.length:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Keep the last pass's ``num_tokens`` entries."""
        if self.length + num_tokens > self.max_tokens:
            raise ValueError(f"KV cache has room for {self.max_tokens} positions, so it cannot keep "
                             f"{self.length + num_tokens}")
        self.length += num_tokens


# ----------------------------------------------------------------------------------------
# Layers


class LLaDA2MoeAttention(nn.Module):
    """Fused QKV projection, qk-norm, partial rotary embedding, grouped-query attention."""

    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, width, bias=False)
        if config.use_qk_norm:
            self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
            self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.query_layernorm = self.key_layernorm = None
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        batch, num_tokens, _ = hidden.shape
        qkv = self.query_key_value(hidden).view(batch, num_tokens, self.num_heads + 2 * self.num_kv_heads,
                                                self.head_dim)
        query, key, value = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.query_layernorm is not None:
            query = self.query_layernorm(query)
            key = self.key_layernorm(key)
        query = apply_rotary(query.transpose(1, 2), cos, sin)  # [B, N, T, D]
        key = apply_rotary(key.transpose(1, 2), cos, sin)  # [B, G, T, D]
        value = value.transpose(1, 2)
        if kv_cache is not None:
            key, value = kv_cache.update(self.layer_idx, key, value)  # [B, G, S, D]
        repeats = self.num_heads // self.num_kv_heads
        if repeats > 1:
            key = key.repeat_interleave(repeats, dim=1)
            value = value.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             scale=self.head_dim ** -0.5)
        return self.dense(out.transpose(1, 2).reshape(batch, num_tokens, self.num_heads * self.head_dim))


class LLaDA2MoeMLP(nn.Module):
    """SwiGLU MLP: the dense MLP, one routed expert, or the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router with group-limited top-k.

    ``expert_bias`` shifts the scores only for choosing experts. The routing weights are
    the unbiased scores of the chosen experts, normalised to sum 1 and then multiplied by
    ``routed_scaling_factor``. Groups are ranked by the sum of their two best biased
    scores, and experts are chosen only from the ``topk_group`` best groups.
    """

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``x`` [T, H]; return expert ids [T, K] (int64, best first) and weights [T, K] (float32)."""
        num_tokens = x.shape[0]
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))  # [T, E]
        choice = scores + self.expert_bias.float()
        group_size = self.num_experts // self.n_group
        grouped = choice.view(num_tokens, self.n_group, group_size)
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)  # [T, n_group]
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        expert_mask = group_mask.repeat_interleave(group_size, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routed_scaling_factor


def expert_mlp(x: torch.Tensor, packed: torch.Tensor, intermediate_size: int) -> torch.Tensor:
    """Run one routed expert on ``x`` [n, H] with its packed weights [3*I*H] (gate, up, down)."""
    hidden_size = x.shape[-1]
    gate_up = packed[:2 * intermediate_size * hidden_size].view(2 * intermediate_size, hidden_size)
    down = packed[2 * intermediate_size * hidden_size:].view(hidden_size, intermediate_size)
    gate, up = F.linear(x, gate_up).split(intermediate_size, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def sort_assignments(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Group the (token, top-k position) assignments of ``ids`` [T, K] by expert.

    Returns the flat positions ``t * K + k`` sorted by expert (a stable sort, so the same
    ids give the same order on every device) and the offset of each expert's run, E + 1
    values on the host.
    """
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    return order, offsets


def combine_expert_outputs(outputs: torch.Tensor, weights: torch.Tensor,
                           shared: torch.Tensor | None) -> torch.Tensor:
    """Sum routed expert outputs [T, K, H] with their weights [T, K] in top-k order, plus ``shared`` [T, H].

    The sum runs in float32 in a fixed order, so the result does not depend on which
    lane or thread produced each expert's output.
    """
    total = outputs[:, 0].float() * weights[:, 0:1]
    for k in range(1, outputs.shape[1]):
        total = total + outputs[:, k].float() * weights[:, k:k + 1]
    if shared is not None:
        total = total + shared.float()
    return total.to(outputs.dtype)


class LLaDA2MoeSparseMoeBlock(nn.Module):
    """Router, routed experts and shared experts of one MoE layer."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.intermediate_size = config.moe_intermediate_size
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(LLaDA2MoeMLP(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        if config.num_shared_experts:
            self.shared_experts = LLaDA2MoeMLP(config.hidden_size,
                                               config.moe_intermediate_size * config.num_shared_experts)
        else:
            self.shared_experts = None
        self._packed: torch.Tensor | None = None

    def pack_experts(self, *, device: torch.device | str | None = None, pin_memory: bool = False,
                     packed: torch.Tensor | None = None) -> torch.Tensor:
        """Move the routed experts' weights into one [E, 3*I*H] tensor on ``device`` and return it.

        The expert parameters become views of that tensor, so no weight is held twice. With
        ``packed`` given, the weights are already in it and only the views are set.
        """
        first = self.experts[0].gate_proj.weight
        block = self.intermediate_size * first.shape[1]
        if packed is None:
            packed = torch.empty(self.num_experts, 3 * block, dtype=first.dtype, device=device or first.device,
                                 pin_memory=pin_memory)
            for e, expert in enumerate(self.experts):
                packed[e, :block].copy_(expert.gate_proj.weight.reshape(-1))
                packed[e, block:2 * block].copy_(expert.up_proj.weight.reshape(-1))
                packed[e, 2 * block:].copy_(expert.down_proj.weight.reshape(-1))
        pieces = (("gate_proj", 0, block), ("up_proj", block, 2 * block), ("down_proj", 2 * block, 3 * block))
        for e, expert in enumerate(self.experts):
            for name, start, end in pieces:
                linear = getattr(expert, name)
                view = packed[e, start:end].view(linear.weight.shape)
                if linear.weight.is_meta:
                    # ``.data`` cannot take a real tensor in place of a meta one.
                    linear.weight = nn.Parameter(view, requires_grad=linear.weight.requires_grad)
                else:
                    # Keep the Parameter objects, which an optimizer may hold.
                    linear.weight.data = view
        self._packed = packed
        return packed

    def packed_experts(self) -> torch.Tensor:
        """Return the packed expert weights, packing them first if the parameters moved since."""
        packed = self._packed
        first = self.experts[0].gate_proj.weight
        if packed is None or packed.device != first.device or packed.dtype != first.dtype \
                or first.data_ptr() != packed[0].data_ptr():
            packed = self.pack_experts()
        return packed

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        ids, weights = self.gate(x)
        packed = self.packed_experts()
        order, offsets = sort_assignments(ids, self.num_experts)
        outputs = x.new_empty(x.shape[0] * self.top_k, x.shape[1])  # one row per (token, top-k position)
        order_tokens = order // self.top_k
        for e in range(self.num_experts):
            start, end = offsets[e], offsets[e + 1]
            if start == end:
                continue
            # index_select and index_copy_ move the same rows as indexing expressions, with fewer tensor ops.
            y = expert_mlp(x.index_select(0, order_tokens[start:end]), packed[e], self.intermediate_size)
            outputs.index_copy_(0, order[start:end], y)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        combined = combine_expert_outputs(outputs.view(x.shape[0], self.top_k, -1), weights, shared)
        return combined.view_as(hidden)


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config, layer_idx)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.mlp = LLaDA2MoeSparseMoeBlock(config)
        else:
            self.mlp = LLaDA2MoeMLP(config.hidden_size, config.intermediate_size)

    def attention_block(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        attention_mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        """Input norm, attention and the residual add."""
        return hidden + self.attention(self.input_layernorm(hidden), cos, sin, attention_mask, kv_cache)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        hidden = self.attention_block(hidden, cos, sin, attention_mask, kv_cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


# ----------------------------------------------------------------------------------------
# Models


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    # Routing is computed in float32; keeping the router's weights in float32 keeps the
    # stored values exact when a checkpoint is loaded in bfloat16.
    _keep_in_fp32_modules_strict = ["mlp.gate.weight", "mlp.gate.expert_bias"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LLaDA2MoeRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, LLaDA2MoeGate):
            _init.normal_(module.weight, mean=0.0, std=std)
            _init.zeros_(module.expert_bias)


def _check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError("attention_mask must be a boolean [T, S] or [B, 1, T, S] tensor (True: may attend), "
                         f"not {attention_mask.dtype}")


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    """Embedding, decoder layers and final norm."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                write_cache: bool = False, return_dict: bool = True, **kwargs) -> BaseModelOutput:
        """Run the decoder on ``input_ids`` [B, T].

        ``attention_mask`` is a boolean [T, S] or [B, 1, T, S] tensor, True where a query may
        attend to a key, or None for full attention. With ``kv_cache``, the tokens sit at
        positions ``kv_cache.length ..`` and attend to the cached ones too; ``write_cache``
        keeps their keys and values.
        """
        _check_attention_mask(attention_mask)
        batch, num_tokens = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + num_tokens, device=input_ids.device).expand(batch, -1)
        hidden = self.word_embeddings(input_ids)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention_mask, kv_cache)
        hidden = self.norm(hidden)
        if kv_cache is not None and write_cache:
            kv_cache.advance(num_tokens)
        if not return_dict:
            return (hidden,)
        return BaseModelOutput(last_hidden_state=hidden)


class LLaDA2MoeForCausalLM(LLaDA2MoePreTrainedModel):
    """The decoder plus the LM head; ``forward`` returns logits for every fed token."""

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def moe_blocks(self) -> list[LLaDA2MoeSparseMoeBlock]:
        """Return the MoE blocks in layer order, one per MoE layer."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                write_cache: bool = False, return_dict: bool = True, **kwargs) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            kv_cache=kv_cache, write_cache=write_cache).last_hidden_state
        logits = self.lm_head(hidden)
        if not return_dict:
            return (logits,)
        return CausalLMOutput(logits=logits)


class LLaDA2MoeModelLM(LLaDA2MoeForCausalLM):
    """The architecture name that published config.json files list; the same model."""
