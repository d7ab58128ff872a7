"""The dLLM architectures this plugin serves: the one list registration and admission read.

Each entry names its classes as "module:Class" so that reading the list imports
neither vLLM nor the model code; `vllm_dllm.register` imports them when vLLM
starts a process.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DllmArchitecture:
    architecture: str  # `architectures[0]` of the checkpoint's config.json
    model_type: str  # its `model_type`
    model_cls: str
    config_cls: str
    # A tokenizer class the checkpoint names (tokenizer_config.json) but only
    # ships as remote code; None when transformers has it.
    tokenizer_cls: str | None = None
    # The model class's `dllm_logits_offset`, for the front end, which never
    # imports the model (a test keeps the two equal).
    logits_offset: int = 0
    # Which decoding parameters apply (`params.SAMPLERS`): LLaDA's remasking or
    # Dream's `alg` samplers.
    sampler: str = "llada"
    # The context the model is documented for, used as max_model_len when the user
    # sets none and the config's max_position_embeddings is larger: every running
    # request keeps a max_model_len-wide token row.
    default_max_model_len: int | None = None
    # Block diffusion (SDAR, LLaDA2): block-causal attention over blocks of the
    # config class's `dllm_block_length`, cut from position 0.
    block_causal: bool = False
    # Decoding defaults of the architecture's own `generate`, below the folder's
    # (generation_config.json `dllm`) and the server's: released folders carry none.
    defaults: dict[str, Any] = field(default_factory=dict)


ARCHITECTURES: tuple[DllmArchitecture, ...] = (
    DllmArchitecture(
        "LLaDAModelLM", "llada",
        model_cls="vllm_dllm.model_executor.models.llada:LLaDAModelLM",
        config_cls="vllm_dllm.configs.llada:LLaDAConfig"),
    DllmArchitecture(
        "DreamModel", "Dream",
        model_cls="vllm_dllm.model_executor.models.dream:DreamModel",
        config_cls="vllm_dllm.configs.dream:DreamConfig",
        tokenizer_cls="vllm_dllm.configs.dream:DreamTokenizer",
        logits_offset=1, sampler="dream", default_max_model_len=2048),
    DllmArchitecture(
        "SDARForCausalLM", "sdar",
        model_cls="vllm_dllm.model_executor.models.sdar:SDARForCausalLM",
        config_cls="vllm_dllm.configs.sdar:SDARConfig", block_causal=True,
        # SDAR's generate.py: `low_confidence_dynamic` at 0.85.
        defaults={"policy": "threshold", "threshold": 0.85}),
    DllmArchitecture(
        "LLaDA2MoeModelLM", "llada2_moe",
        model_cls="vllm_dllm.model_executor.models.llada2:LLaDA2MoeModelLM",
        config_cls="vllm_dllm.configs.llada2:LLaDA2MoeConfig", block_causal=True,
        # LLaDA2's generate: its threshold rule at 0.95.
        defaults={"policy": "threshold", "threshold": 0.95}),
)

BY_ARCHITECTURE: dict[str, DllmArchitecture] = {a.architecture: a for a in ARCHITECTURES}
DLLM_ARCHITECTURES: frozenset[str] = frozenset(BY_ARCHITECTURE)


def resolve(ref: str) -> type:
    """The class a "module:Class" reference names."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
