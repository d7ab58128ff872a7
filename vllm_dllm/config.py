"""Engine configuration for dLLM architectures, applied when vLLM builds its config."""

import os
from typing import Any

from vllm.config import VllmConfig
from vllm.config.compilation import CompilationMode, CUDAGraphMode
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_dllm.model_executor.registry import BY_ARCHITECTURE
from vllm_dllm.params import ParamError, server_defaults

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger: its handler and level


def dllm_defaults(vllm_config: VllmConfig) -> dict[str, Any]:
    """The request defaults this server applies (see `params.server_defaults`)."""
    model_config = vllm_config.model_config
    generation = model_config.try_get_generation_config() or {}
    arch = BY_ARCHITECTURE[model_config.architecture]
    from_model = {**arch.defaults, **(generation.get("dllm") or {})}
    sampler = arch.sampler
    if sampler == "dream":
        # Dream's own generation_config.json names its sampler at the top level
        # (its `steps` belong to its single-block canvas and are not taken).
        for name in ("alg", "alg_temp", "eps"):
            if generation.get(name) is not None:
                from_model.setdefault(name, generation[name])
    return server_defaults((vllm_config.additional_config or {}).get("dllm"), from_model,
                           sampler)


class DllmConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config: VllmConfig) -> None:
        try:
            dllm_defaults(vllm_config)
        except ParamError as e:
            raise ValueError(f"dLLM defaults ({e.parameter}): {e}") from e

        pipeline_stages = vllm_config.parallel_config.pipeline_parallel_size
        if pipeline_stages > 1:
            # The next iteration's input ids on the first stage are the commits made
            # from the last stage's logits; nothing carries them back yet.
            raise ValueError(
                "dLLM models do not support pipeline parallelism (pipeline_parallel_size="
                f"{pipeline_stages}); use --tensor-parallel-size across GPUs and nodes instead")

        if vllm_config.parallel_config.enable_expert_parallel:
            # vLLM 0.32's CPU experts kernel kills the worker (SIGSEGV) in the first forward
            # of LLaDA2 under expert parallelism; no GPU has run it here.
            raise ValueError(
                "dLLM models do not support expert parallelism (--enable-expert-parallel) "
                "yet; --tensor-parallel-size shards every expert across the GPUs instead")

        scheduler = vllm_config.scheduler_config
        scheduler.scheduler_cls = "vllm_dllm.engine.scheduler.DllmScheduler"
        # Denoising iterations depend on the previous one's commits.
        scheduler.async_scheduling = False
        scheduler.enable_chunked_prefill = False
        model_config = vllm_config.model_config
        context = BY_ARCHITECTURE[model_config.architecture].default_max_model_len
        if (context is not None and model_config.max_model_len > context
                and getattr(model_config, "original_max_model_len", None) in (None, -1)):
            # Dream's config allows 131072 positions; unasked, a 131072-wide token row
            # per running request (and a batch budget that wide) serves no one.
            logger.info("max_model_len %d -> %d (the model's documented context; set "
                        "--max-model-len for more)", model_config.max_model_len, context)
            model_config.max_model_len = context
        # One vanilla iteration recomputes a whole sequence.
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens,
                                               model_config.max_model_len)
        vllm_config.parallel_config.worker_cls = "vllm_dllm.engine.worker.DllmWorker"
        # The dLLM runner builds on the V1 model runner (the one CPUs use); GPUs
        # would otherwise pick V2. Set before workers start, which inherit it.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if not BY_ARCHITECTURE[model_config.architecture].block_causal:
            # Bidirectional attention: a prompt's K/V depend on the canvas after it.
            # Block-causal models keep vLLM's prefix cache for their whole prompt
            # blocks (`DllmScheduler._cached_prefix`).
            vllm_config.cache_config.enable_prefix_caching = False
        # Query sets change shape every iteration; graphs would not be reused.
        if not model_config.enforce_eager:
            logger.info("dLLM runs eagerly (no CUDA graphs, no torch.compile): every "
                        "iteration's query rows have a new shape")
        model_config.enforce_eager = True
        vllm_config.compilation_config.mode = CompilationMode.NONE
        vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
