"""The platform's worker with the dLLM model runner in place of its own."""

import torch

from vllm.platforms import current_platform

from vllm_dllm.engine.model_runner import DllmModelRunner

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as PlatformWorker


class DllmWorker(PlatformWorker):
    def init_device(self) -> None:
        super().init_device()
        if current_platform.is_cpu():
            self.model_runner = DllmModelRunner(self.vllm_config, torch.device("cpu"))

    def _make_model_runner(self) -> DllmModelRunner:
        return DllmModelRunner(self.vllm_config, self.device)
