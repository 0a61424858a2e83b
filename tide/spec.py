"""Model specs: the shape of an ``llada2_moe`` model, read from a Hugging Face config.json.

A spec gives the parameter counts, the bytes of one routed expert, and the FLOPs per token
of each part of a decoder layer, which the cost model, the planner and the memory budget
use. Shipped specs live in ``tide/data/specs/NAME.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tide.errors import InputError
from tide.io import read_json

SPEC_DIR = Path(__file__).parent / "data" / "specs"
SUPPORTED_MODEL_TYPES = ("llada2_moe",)
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

_REQUIRED_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one LLaDA2-family model."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    first_k_dense_replace: int
    intermediate_size: int  # dense MLP width of the first layers
    moe_intermediate_size: int  # width of one routed or shared expert
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    score_function: str
    rope_theta: float
    partial_rotary_factor: float
    rms_norm_eps: float
    use_qk_norm: bool
    tie_word_embeddings: bool
    dtype: str
    mask_token_id: int
    eos_token_id: int
    config_hash: str
    config: Mapping[str, Any]

    # --- layers ---------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder layer indices whose MLP is routed experts plus the shared expert."""
        return tuple(range(self.first_k_dense_replace, self.num_layers))

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    # --- parameters -----------------------------------------------------------------

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head (one matrix when tied)."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size

    @property
    def attention_params(self) -> int:
        """Parameters of one layer's attention block, its norms included."""
        q_kv_width = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        qkv = self.hidden_size * q_kv_width
        output = self.num_attention_heads * self.head_dim * self.hidden_size
        qk_norm = 2 * self.head_dim if self.use_qk_norm else 0
        layer_norms = 2 * self.hidden_size
        return qkv + output + qk_norm + layer_norms

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return self.num_shared_experts * self.expert_params

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size + self.num_experts  # gate weight and expert bias

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def non_expert_params(self) -> int:
        """Every parameter but the routed experts: what must stay on the GPU."""
        return (
            self.embedding_params
            + self.num_layers * self.attention_params
            + self.first_k_dense_replace * self.dense_mlp_params
            + self.num_moe_layers * (self.shared_expert_params + self.router_params)
            + self.hidden_size  # final norm
        )

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.routed_expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: every non-expert parameter plus top-k experts per MoE layer."""
        return self.non_expert_params + self.num_moe_layers * self.top_k * self.expert_params

    def expert_bytes(self, dtype: str | None = None) -> int:
        return self.expert_params * DTYPE_BYTES[_check_dtype(dtype or self.dtype)]

    def non_expert_bytes(self, dtype: str | None = None) -> int:
        return self.non_expert_params * DTYPE_BYTES[_check_dtype(dtype or self.dtype)]

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """KV cache bytes for one token over all layers."""
        per_layer = 2 * self.num_key_value_heads * self.head_dim
        return self.num_layers * per_layer * DTYPE_BYTES[_check_dtype(dtype or self.dtype)]

    # --- FLOPs per token (a multiply-add counts as two) ------------------------------

    def attention_flops_per_token(self, context_tokens: int) -> float:
        """Projections plus scores and weighted values against ``context_tokens`` keys."""
        q_kv_width = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        projections = 2 * self.hidden_size * q_kv_width + 2 * self.num_attention_heads * self.head_dim * self.hidden_size
        scores_and_values = 4 * self.num_attention_heads * self.head_dim * context_tokens
        return float(projections + scores_and_values)

    @property
    def dense_mlp_flops_per_token(self) -> float:
        return float(2 * self.dense_mlp_params)

    @property
    def shared_expert_flops_per_token(self) -> float:
        return float(2 * self.shared_expert_params)

    @property
    def expert_flops_per_token(self) -> float:
        """FLOPs of one routed expert for one token."""
        return float(2 * self.expert_params)

    @property
    def router_flops_per_token(self) -> float:
        return float(2 * self.num_experts * self.hidden_size)

    @property
    def head_flops_per_token(self) -> float:
        return float(2 * self.vocab_size * self.hidden_size)

    def summary(self, dtype: str | None = None) -> dict[str, Any]:
        """Return the derived figures as a JSON-ready dict."""
        dtype = dtype or self.dtype
        return {
            "name": self.name,
            "model_type": self.model_type,
            "config_hash": self.config_hash,
            "dtype": dtype,
            "num_layers": self.num_layers,
            "moe_layers": [self.moe_layers[0], self.moe_layers[-1]] if self.moe_layers else [],
            "num_moe_layers": self.num_moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "embedding_params": self.embedding_params,
            "non_expert_params": self.non_expert_params,
            "routed_expert_params": self.routed_expert_params,
            "expert_params": self.expert_params,
            "expert_bytes": self.expert_bytes(dtype),
            "non_expert_bytes": self.non_expert_bytes(dtype),
            "all_experts_bytes": self.routed_expert_params * DTYPE_BYTES[dtype],
            "kv_bytes_per_token": self.kv_bytes_per_token(dtype),
            "flops_per_token": {
                "attention_at_context_1024": self.attention_flops_per_token(1024),
                "dense_mlp": self.dense_mlp_flops_per_token,
                "shared_expert": self.shared_expert_flops_per_token,
                "routed_expert": self.expert_flops_per_token,
                "router": self.router_flops_per_token,
                "head": self.head_flops_per_token,
            },
        }


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPE_BYTES:
        raise InputError("unknown dtype", field="dtype", value=dtype, accepted=", ".join(sorted(DTYPE_BYTES)))
    return dtype


def config_hash(config: Mapping[str, Any]) -> str:
    """Return a short hash of a config's content, independent of key order."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def list_specs() -> list[str]:
    return sorted(path.stem for path in SPEC_DIR.glob("*.json"))


def spec_from_config(config: Mapping[str, Any], *, name: str, source: str = "config.json") -> ModelSpec:
    """Build a spec from a parsed config.json, rejecting missing or inconsistent fields."""
    if not isinstance(config, Mapping):
        raise InputError("a config must be a JSON object", source=source, value=type(config).__name__)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError("unsupported model type", source=source, field="model_type", value=model_type,
                         accepted=", ".join(SUPPORTED_MODEL_TYPES))

    def integer(key: str, default: int | None = None, minimum: int = 1) -> int:
        value = config.get(key, default)
        if value is None:
            raise InputError("missing", source=source, field=key, accepted=f"an integer >= {minimum}")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError("invalid", source=source, field=key, value=value, accepted=f"an integer >= {minimum}")
        return value

    def number(key: str, default: float) -> float:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError("invalid", source=source, field=key, value=value, accepted="a number")
        return float(value)

    values = {key: integer(key) for key in _REQUIRED_INT_FIELDS}
    hidden = values["hidden_size"]
    heads = values["num_attention_heads"]
    if hidden % heads != 0 and "head_dim" not in config:
        raise InputError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}", source=source,
                         field="hidden_size", value=hidden, accepted="a multiple of num_attention_heads")
    head_dim = integer("head_dim", hidden // heads if hidden % heads == 0 else None)
    if heads % values["num_key_value_heads"] != 0:
        raise InputError(f"num_attention_heads {heads} is not divisible by num_key_value_heads "
                         f"{values['num_key_value_heads']}", source=source, field="num_key_value_heads",
                         value=values["num_key_value_heads"], accepted="a divisor of num_attention_heads")
    num_experts = values["num_experts"]
    top_k = values["num_experts_per_tok"]
    if top_k > num_experts:
        raise InputError(f"num_experts_per_tok {top_k} is larger than num_experts {num_experts}", source=source,
                         field="num_experts_per_tok", value=top_k, accepted=f"1 to {num_experts}")
    n_group = integer("n_group", 1)
    topk_group = integer("topk_group", 1)
    if num_experts % n_group != 0:
        raise InputError(f"num_experts {num_experts} is not divisible by n_group {n_group}", source=source,
                         field="n_group", value=n_group, accepted="a divisor of num_experts")
    if topk_group > n_group:
        raise InputError(f"topk_group {topk_group} is larger than n_group {n_group}", source=source,
                         field="topk_group", value=topk_group, accepted=f"1 to {n_group}")
    if top_k > topk_group * (num_experts // n_group):
        raise InputError(f"num_experts_per_tok {top_k} exceeds the {topk_group * (num_experts // n_group)} experts "
                         "that the selected groups hold", source=source, field="num_experts_per_tok", value=top_k)
    layers = values["num_hidden_layers"]
    first_dense = integer("first_k_dense_replace", 0, minimum=0)
    if first_dense > layers:
        raise InputError(f"first_k_dense_replace {first_dense} exceeds num_hidden_layers {layers}", source=source,
                         field="first_k_dense_replace", value=first_dense, accepted=f"0 to {layers}")
    partial_rotary = number("partial_rotary_factor", 1.0)
    if not 0.0 < partial_rotary <= 1.0:
        raise InputError("invalid", source=source, field="partial_rotary_factor", value=partial_rotary,
                         accepted="a number in (0, 1]")
    score_function = config.get("score_function", "sigmoid")
    if score_function not in ("sigmoid", "softmax"):
        raise InputError("unsupported", source=source, field="score_function", value=score_function,
                         accepted="sigmoid, softmax")
    dtype = str(config.get("torch_dtype", config.get("dtype", "bfloat16")))
    if dtype not in DTYPE_BYTES:
        raise InputError("unsupported", source=source, field="torch_dtype", value=dtype,
                         accepted=", ".join(sorted(DTYPE_BYTES)))
    vocab = values["vocab_size"]
    mask_id = integer("mask_token_id", 156895, minimum=0)
    eos_id = integer("eos_token_id", 156892, minimum=0)
    for key, token_id in (("mask_token_id", mask_id), ("eos_token_id", eos_id)):
        if token_id >= vocab:
            raise InputError(f"{key} {token_id} is outside the vocabulary of {vocab}", source=source, field=key,
                             value=token_id, accepted=f"0 to {vocab - 1}")
    return ModelSpec(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        first_k_dense_replace=first_dense,
        intermediate_size=values["intermediate_size"],
        moe_intermediate_size=values["moe_intermediate_size"],
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        num_shared_experts=integer("num_shared_experts", 0, minimum=0),
        num_attention_heads=heads,
        num_key_value_heads=values["num_key_value_heads"],
        head_dim=head_dim,
        vocab_size=vocab,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=number("routed_scaling_factor", 1.0),
        score_function=score_function,
        rope_theta=number("rope_theta", 10000.0),
        partial_rotary_factor=partial_rotary,
        rms_norm_eps=number("rms_norm_eps", 1e-6),
        use_qk_norm=bool(config.get("use_qk_norm", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        dtype=dtype,
        mask_token_id=mask_id,
        eos_token_id=eos_id,
        config_hash=config_hash(config),
        config=dict(config),
    )


def load_spec(name_or_path: str | Path) -> ModelSpec:
    """Load a shipped spec by name, or a config.json (or a checkpoint folder holding one) by path."""
    text = str(name_or_path)
    shipped = SPEC_DIR / f"{text}.json"
    if shipped.is_file() and "/" not in text:
        return spec_from_config(read_json(shipped, what="config"), name=text, source=str(shipped))
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise InputError("checkpoint folder has no config.json", source=text)
        name = Path(text).resolve().name
    elif path.is_file():
        name = path.resolve().parent.name if path.name == "config.json" else path.stem
    else:
        raise InputError("model spec not found", value=text,
                         accepted=f"a shipped name ({', '.join(list_specs())}), a config.json path or a checkpoint folder")
    return spec_from_config(read_json(path, what="config"), name=name, source=str(path))
