"""vllm-dllm: diffusion language models (LLaDA) served by vLLM.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every
process it starts, before building any config or model.
"""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_dllm.attention_backends.bidirectional import BACKEND_NAME
    from vllm_dllm.config import DllmConfig
    from vllm_dllm.configs.llada import LLaDAConfig
    from vllm_dllm.engine import admission

    _CONFIG_REGISTRY["llada"] = LLaDAConfig
    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    ModelRegistry.register_model(
        "LLaDAModelLM", "vllm_dllm.model_executor.models.llada:LLaDAModelLM")
    MODELS_CONFIG_MAP["LLaDAModelLM"] = DllmConfig
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME,
                         "vllm_dllm.attention_backends.bidirectional.BidirectionalAttentionBackend")
    admission.install()
