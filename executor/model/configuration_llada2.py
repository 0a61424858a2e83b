"""The configuration of ``llada2_moe`` models (LLaDA2.0-mini, LLaDA2.0-flash and their shape).

The field names and meanings are those of the published config.json files, so a
published config loads unchanged. Token ids default to the published LLaDA2 vocabulary.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    """Shape and routing settings of an ``llada2_moe`` model.

    Decoder layers ``0 .. first_k_dense_replace - 1`` have a dense MLP of width
    ``intermediate_size``; the others are MoE layers with ``num_experts`` routed experts
    and ``num_shared_experts`` shared experts of width ``moe_intermediate_size``.
    """

    model_type = "llada2_moe"

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        moe_intermediate_size: int = 512,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 32768,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 600000.0,
        partial_rotary_factor: float = 0.5,
        use_qk_norm: bool = True,
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        num_experts: int = 256,
        num_experts_per_tok: int = 8,
        num_shared_experts: int = 1,
        n_group: int = 8,
        topk_group: int = 4,
        routed_scaling_factor: float = 2.5,
        score_function: str = "sigmoid",
        first_k_dense_replace: int = 1,
        tie_word_embeddings: bool = False,
        mask_token_id: int = 156895,
        eos_token_id: int = 156892,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.use_qk_norm = use_qk_norm
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.first_k_dense_replace = first_k_dense_replace
        self.mask_token_id = mask_token_id
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self._check()

    def _check(self) -> None:
        if self.hidden_act != "silu":
            raise NotImplementedError(f"llada2_moe with hidden_act={self.hidden_act!r}: only 'silu' is implemented")
        if self.score_function != "sigmoid":
            raise NotImplementedError(
                f"llada2_moe with score_function={self.score_function!r}: only 'sigmoid' routing is implemented")
        if self.use_qkv_bias or self.use_bias:
            raise NotImplementedError("llada2_moe with projection biases (use_qkv_bias or use_bias): "
                                      "the published checkpoints have none and this implementation has none")
        if self.tie_word_embeddings:
            raise NotImplementedError("llada2_moe with tied embeddings: the published checkpoints are untied")
        if self.num_experts % self.n_group != 0:
            raise ValueError(f"num_experts {self.num_experts} is not divisible by n_group {self.n_group}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each query and key head that rotary embedding rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.first_k_dense_replace, self.num_hidden_layers))
