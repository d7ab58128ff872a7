"""Runs one denoising iteration per engine step on vLLM's model runner.

Loading, KV cache allocation and binding come from the platform's V1 runner;
`execute_model` is replaced: it rebuilds each scheduled request's sequence
(prompt + canvas), runs the model with bidirectional paged attention, computes
logits only for the masked positions of each request's current block, and lets
the decoding core commit tokens. It returns, per request, the canvas tokens
that became final in this iteration.
"""

from dataclasses import dataclass

import torch

from vllm.forward_context import set_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_dllm.engine.query_batch import QueryBatch, build_query_batch
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.recompute import recompute_range
from vllm_dllm.sampling.state import DenoiseState
from vllm_dllm.sampling.step import Denoiser, SpecialTokens

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as PlatformModelRunner
else:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as PlatformModelRunner


@dataclass
class DllmRequest:
    prompt: torch.Tensor
    state: DenoiseState
    block_ids: list[int]
    # The pages hold none of this request's K/V (new or resumed request).
    needs_refresh: bool = True


class DllmModelRunner(PlatformModelRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dllm_requests: dict[str, DllmRequest] = {}
        hf_config = self.model_config.hf_config
        self.mask_token_id = hf_config.mask_token_id
        self.denoiser = Denoiser(SpecialTokens(
            mask=hf_config.mask_token_id, eos=hf_config.eos_token_id,
            eot=getattr(hf_config, "eot_token_id", None)))

    def _update_requests(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.dllm_requests.pop(req_id, None)
            self.denoiser.forget(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            sp = new.sampling_params
            state = DenoiseState(
                prompt_len=len(new.prompt_token_ids),
                params=DllmParams.from_resolved(sp.extra_args),
                mask_id=self.mask_token_id,
                temperature=sp.temperature,
                seed=sp.seed,
            )
            self.dllm_requests[new.req_id] = DllmRequest(
                torch.tensor(new.prompt_token_ids, dtype=torch.long), state, new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, block_ids in zip(cached.req_ids, cached.new_block_ids):
            if block_ids is not None:
                # A resumed request gets fresh pages; its canvas survived preemption.
                self.dllm_requests[req_id].block_ids = block_ids[0]
                self.dllm_requests[req_id].needs_refresh = True

    def forward_query_batch(self, batch: QueryBatch) -> torch.Tensor:
        """Runs the model over `batch`; returns the hidden states of its last segment's rows."""
        layer_names = self.kv_cache_config.kv_cache_groups[0].layer_names
        metadata = {name: batch.metadata_for_layer(extract_layer_index(name))
                    for name in layer_names}
        with set_forward_context(metadata, self.vllm_config, num_tokens=len(batch.input_ids)):
            return self.model(input_ids=batch.input_ids, positions=batch.positions,
                              layer_rows=batch.layer_rows())

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors=None
                      ) -> ModelRunnerOutput:
        self._update_requests(scheduler_output)
        req_ids = list(scheduler_output.num_scheduled_tokens)
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        requests = [self.dllm_requests[r] for r in req_ids]
        sequences, plans = [], []
        for req in requests:
            sequences.append(torch.cat([req.prompt, req.state.canvas]))
            lo, hi = recompute_range(req.state, req.needs_refresh)
            req.needs_refresh = False
            plans.append([(0, torch.arange(lo, hi))])
        batch = build_query_batch(sequences, plans, [r.block_ids for r in requests],
                                  self.cache_config.block_size, self.device)
        hidden = self.forward_query_batch(batch)
        # Only the masked positions of each current block need logits.
        offset = self.model.dllm_logits_offset
        canvas_positions = [r.state.masked_in_block() for r in requests]
        rows = torch.cat([batch.output_rows(i, r.state.prompt_len + masked - offset)
                          for i, (r, masked) in enumerate(zip(requests, canvas_positions))])
        logits = self.model.compute_logits(hidden[rows.to(self.device)])
        self.denoiser.step(req_ids, [r.state for r in requests], canvas_positions, logits)
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[r.state.take_new_tokens() for r in requests],
        )
