"""Loading a checkpoint in the published LLaDA2 layout, checked against a float64 reference forward.

The checkpoint is written here tensor by tensor under the published names (not from our
module's state dict), sharded with an index file, in float32 and in bfloat16. The
reference below is written from the architecture's description, independently of
``executor.model``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import executor.model  # noqa: F401  (registers llada2_moe with the Auto classes)
from executor.model import LLaDA2MoeForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM

CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 3,
    "num_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "rope_theta": 600000.0,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-6,
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 256,
    "eos_token_id": 95,
    "mask_token_id": 96,
}


def published_tensors(config: dict, generator: torch.Generator, bias_std: float) -> dict[str, torch.Tensor]:
    """Random weights under the published tensor names, in float32."""
    hidden, heads, kv_heads, head_dim = (config["hidden_size"], config["num_attention_heads"],
                                         config["num_key_value_heads"], config["head_dim"])
    inter, expert_inter = config["intermediate_size"], config["moe_intermediate_size"]
    vocab, experts = config["vocab_size"], config["num_experts"]

    def normal(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    def norm(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.1)

    tensors = {"model.word_embeddings.weight": normal(vocab, hidden, std=0.5)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = norm(hidden)
        tensors[prefix + "post_attention_layernorm.weight"] = norm(hidden)
        tensors[prefix + "attention.query_key_value.weight"] = normal((heads + 2 * kv_heads) * head_dim, hidden)
        tensors[prefix + "attention.query_layernorm.weight"] = norm(head_dim)
        tensors[prefix + "attention.key_layernorm.weight"] = norm(head_dim)
        tensors[prefix + "attention.dense.weight"] = normal(hidden, heads * head_dim)
        if layer < config["first_k_dense_replace"]:
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                ("down_proj", (hidden, inter))):
                tensors[prefix + f"mlp.{name}.weight"] = normal(*shape)
            continue
        tensors[prefix + "mlp.gate.weight"] = normal(experts, hidden, std=0.3)
        tensors[prefix + "mlp.gate.expert_bias"] = normal(experts, std=bias_std)
        for e in range(experts):
            tensors[prefix + f"mlp.experts.{e}.gate_proj.weight"] = normal(expert_inter, hidden)
            tensors[prefix + f"mlp.experts.{e}.up_proj.weight"] = normal(expert_inter, hidden)
            tensors[prefix + f"mlp.experts.{e}.down_proj.weight"] = normal(hidden, expert_inter)
        shared = expert_inter * config["num_shared_experts"]
        tensors[prefix + "mlp.shared_experts.gate_proj.weight"] = normal(shared, hidden)
        tensors[prefix + "mlp.shared_experts.up_proj.weight"] = normal(shared, hidden)
        tensors[prefix + "mlp.shared_experts.down_proj.weight"] = normal(hidden, shared)
    tensors["model.norm.weight"] = norm(hidden)
    tensors["lm_head.weight"] = normal(vocab, hidden, std=0.3)
    return tensors


def write_sharded_checkpoint(folder, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Write two safetensors shards plus model.safetensors.index.json, as published checkpoints are."""
    names = sorted(tensors)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for number, shard_names in enumerate(halves, start=1):
        file_name = f"model-{number:05d}-of-{len(halves):05d}.safetensors"
        shard = {name: tensors[name].to(dtype).contiguous() for name in shard_names}
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}))


# ----------------------------------------------------------------------------------------
# The float64 reference


def reference_logits(config: dict, tensors: dict[str, torch.Tensor], ids: list[int], block_length: int
                     ) -> torch.Tensor:
    """Logits of one sequence with block-causal attention, in float64, token by token where it helps."""
    w = {name: t.double() for name, t in tensors.items()}
    hidden_size, heads, kv_heads, head_dim = (config["hidden_size"], config["num_attention_heads"],
                                              config["num_key_value_heads"], config["head_dim"])
    eps = config["rms_norm_eps"]
    rotary = int(head_dim * config["partial_rotary_factor"])
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    n_group, topk_group = config["n_group"], config["topk_group"]
    num_tokens = len(ids)

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def swiglu(x, prefix):
        gate = x @ w[prefix + "gate_proj.weight"].T
        return (gate * torch.sigmoid(gate) * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T

    def rope(x, position):
        # x: [heads, D]; pairs (i, i + rotary/2) of the first ``rotary`` dims rotate by position * freq_i.
        out = x.clone()
        for i in range(rotary // 2):
            angle = position / config["rope_theta"] ** (2 * i / rotary)
            a, b = x[:, i], x[:, i + rotary // 2]
            out[:, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, i + rotary // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    h = w["model.word_embeddings.weight"][ids]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = rms(h, w[p + "input_layernorm.weight"])
        qkv = x @ w[p + "attention.query_key_value.weight"].T
        q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
        v = qkv[:, (heads + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
        q = rms(q, w[p + "attention.query_layernorm.weight"])
        k = rms(k, w[p + "attention.key_layernorm.weight"])
        q = torch.stack([rope(q[t], t) for t in range(num_tokens)])
        k = torch.stack([rope(k[t], t) for t in range(num_tokens)])
        attended = torch.zeros(num_tokens, heads, head_dim, dtype=torch.float64)
        for t in range(num_tokens):
            visible = [s for s in range(num_tokens) if s // block_length <= t // block_length]
            for head in range(heads):
                group = head // (heads // kv_heads)
                scores = torch.stack([q[t, head] @ k[s, group] for s in visible]) / math.sqrt(head_dim)
                probs = torch.softmax(scores, dim=0)
                attended[t, head] = sum(probs[i] * v[s, group] for i, s in enumerate(visible))
        h = h + attended.reshape(num_tokens, -1) @ w[p + "attention.dense.weight"].T

        x = rms(h, w[p + "post_attention_layernorm.weight"])
        if layer < config["first_k_dense_replace"]:
            h = h + swiglu(x, p + "mlp.")
            continue
        out = swiglu(x, p + "mlp.shared_experts.")
        scores = torch.sigmoid(x @ w[p + "mlp.gate.weight"].T)
        for t in range(num_tokens):
            biased = scores[t] + w[p + "mlp.gate.expert_bias"]
            size = experts // n_group
            group_score = [sorted(biased[g * size:(g + 1) * size].tolist(), reverse=True)[:2] for g in range(n_group)]
            groups = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
            allowed = [e for e in range(experts) if e // size in groups]
            chosen = sorted(allowed, key=lambda e: -float(biased[e]))[:top_k]
            weights = scores[t, chosen] / scores[t, chosen].sum() * config["routed_scaling_factor"]
            for weight, e in zip(weights, chosen):
                out[t] = out[t] + weight * swiglu(x[t:t + 1], p + f"mlp.experts.{e}.")[0]
        h = h + out
    return rms(h, w["model.norm.weight"]) @ w["lm_head.weight"].T


# ----------------------------------------------------------------------------------------
# Tests


def block_mask(num_tokens: int, block_length: int) -> torch.Tensor:
    blocks = torch.arange(num_tokens) // block_length
    return blocks[None, :] <= blocks[:, None]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.08)])
def test_published_layout_matches_reference(tmp_path, dtype, tolerance):
    generator = torch.Generator().manual_seed(7)
    # In bfloat16 the router's inputs carry rounding noise, so the expert bias is spread wide
    # enough that the noise does not change which experts are chosen. In float32 the
    # routing depends on the tokens.
    tensors = published_tensors(CONFIG, generator, bias_std=0.05 if dtype == torch.float32 else 1.0)
    write_sharded_checkpoint(tmp_path, CONFIG, tensors, dtype)

    assert AutoConfig.from_pretrained(str(tmp_path)).model_type == "llada2_moe"
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto", output_loading_info=True)
    assert isinstance(model, LLaDA2MoeForCausalLM)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert model.get_input_embeddings().weight.dtype == dtype
    assert model.model.layers[1].mlp.experts[5].down_proj.weight.dtype == dtype

    ids = torch.randint(0, CONFIG["vocab_size"] - 2, (11,), generator=generator).tolist()
    block_length = 4
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), attention_mask=block_mask(len(ids), block_length)).logits[0]
    stored = {name: t.to(dtype) for name, t in tensors.items()}
    expected = reference_logits(CONFIG, stored, ids, block_length)
    scale = expected.abs().max().item()
    assert scale > 1.0  # the check means something only if the logits are not all near zero
    error = (logits.double() - expected).abs().max().item()
    assert error <= tolerance * scale, f"max |logit error| {error:.3g} vs scale {scale:.3g}"


def test_router_weights_stay_float32_in_bfloat16(tmp_path):
    generator = torch.Generator().manual_seed(3)
    tensors = published_tensors(CONFIG, generator, bias_std=0.05)
    write_sharded_checkpoint(tmp_path, CONFIG, tensors, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    gate = model.model.layers[2].mlp.gate
    assert gate.weight.dtype == torch.float32
    stored = tensors["model.layers.2.mlp.gate.expert_bias"].to(torch.bfloat16).float()
    assert torch.equal(gate.expert_bias, stored)


def test_missing_tensor_reported(tmp_path):
    generator = torch.Generator().manual_seed(5)
    tensors = published_tensors(CONFIG, generator, bias_std=0.05)
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    write_sharded_checkpoint(tmp_path, CONFIG, tensors, torch.float32)
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in info["missing_keys"]


def test_packed_experts_are_views():
    from executor.model import LLaDA2MoeConfig

    model = LLaDA2MoeForCausalLM(LLaDA2MoeConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"}))
    block = model.moe_blocks()[0]
    before = block.experts[6].up_proj.weight.detach().clone()
    packed = block.pack_experts()
    assert packed.shape == (CONFIG["num_experts"], 3 * CONFIG["moe_intermediate_size"] * CONFIG["hidden_size"])
    assert torch.equal(block.experts[6].up_proj.weight, before)
    assert block.experts[6].up_proj.weight.data_ptr() == packed[6, 24 * 64:].data_ptr()


def test_unsupported_config_raises():
    from executor.model import LLaDA2MoeConfig

    with pytest.raises(NotImplementedError, match="softmax"):
        LLaDA2MoeConfig(score_function="softmax")
