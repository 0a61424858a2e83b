"""Our own ``llada2_moe`` model code, registered with transformers' Auto classes.

Importing this package makes ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``
load ``llada2_moe`` checkpoints with these classes, without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from executor.model.configuration_llada2 import LLaDA2MoeConfig
from executor.model.modeling_llada2 import (
    KVCache,
    LLaDA2MoeForCausalLM,
    LLaDA2MoeModel,
    LLaDA2MoeModelLM,
    LLaDA2MoePreTrainedModel,
    LLaDA2MoeSparseMoeBlock,
    combine_expert_outputs,
    expert_mlp,
    sort_assignments,
)

AutoConfig.register(LLaDA2MoeConfig.model_type, LLaDA2MoeConfig, exist_ok=True)
AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModel, exist_ok=True)
AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeForCausalLM, exist_ok=True)

__all__ = [
    "KVCache",
    "LLaDA2MoeConfig",
    "LLaDA2MoeForCausalLM",
    "LLaDA2MoeModel",
    "LLaDA2MoeModelLM",
    "LLaDA2MoePreTrainedModel",
    "LLaDA2MoeSparseMoeBlock",
    "combine_expert_outputs",
    "expert_mlp",
    "sort_assignments",
]
