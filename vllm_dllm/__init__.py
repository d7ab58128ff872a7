"""vllm-dllm: diffusion language models (LLaDA, Dream) served by vLLM.

`register()` is the `vllm.general_plugins` entry point; vLLM calls it in every
process it starts, before building any config or model.
"""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from transformers import AutoConfig, AutoTokenizer
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from vllm_dllm.attention_backends.bidirectional import BACKEND_NAME
    from vllm_dllm.config import DllmConfig
    from vllm_dllm.engine import admission
    from vllm_dllm.model_executor.registry import ARCHITECTURES, resolve

    for arch in ARCHITECTURES:
        config_cls = resolve(arch.config_cls)
        _CONFIG_REGISTRY[arch.model_type] = config_cls
        AutoConfig.register(arch.model_type, config_cls, exist_ok=True)
        if arch.tokenizer_cls is not None:
            AutoTokenizer.register(config_cls, tokenizer_class=resolve(arch.tokenizer_cls),
                                   exist_ok=True)
        ModelRegistry.register_model(arch.architecture, arch.model_cls)
        MODELS_CONFIG_MAP[arch.architecture] = DllmConfig
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME,
                         "vllm_dllm.attention_backends.bidirectional.BidirectionalAttentionBackend")
    admission.install()
