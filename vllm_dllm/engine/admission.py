"""Request admission for dLLMs: resolve and check decoding parameters.

Runs in the front end, where vLLM turns a `VLLMValidationError` into HTTP 400
naming the parameter, so a bad request never reaches the engine.
"""

import functools
import random
from typing import Any

from vllm.config import ModelConfig, VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.input_processor import InputProcessor

from vllm_dllm.config import dllm_defaults
from vllm_dllm.model_executor.registry import BY_ARCHITECTURE, DLLM_ARCHITECTURES
from vllm_dllm.params import DllmParams, ParamError, resolve

# Sampling options that diffusion decoding does not implement, with their
# neutral values and why; anything else is refused rather than silently ignored.
_PENALTY = "defined on the tokens generated so far, left to right; a canvas commits out of order"
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "min_p": (0.0, "no dLLM sampler here has it (LLaDA's, Dream's, SDAR's, LLaDA2's)"),
    "presence_penalty": (0.0, _PENALTY),
    "frequency_penalty": (0.0, _PENALTY),
    "repetition_penalty": (1.0, _PENALTY),
    "prompt_logprobs": (None, "a bidirectional model gives the prompt no left-to-right "
                              "likelihood"),
    "prompt_logprob_token_ids": (None, "a bidirectional model gives the prompt no "
                                       "left-to-right likelihood"),
    "logprob_token_ids": (None, "use logprobs (top logprobs of the committing iteration)"),
}


def is_dllm(vllm_config: VllmConfig) -> bool:
    return vllm_config.model_config.architecture in DLLM_ARCHITECTURES


def _check_supported(params: SamplingParams, truncates: bool) -> None:
    """`truncates`: the model's sampler has top_p and top_k (Dream's, SDAR's, LLaDA2's);
    LLaDA's is a tempered softmax (Gumbel-max in its code) with no truncation."""
    if not truncates:
        for name, on in (("top_p", params.top_p < 1), ("top_k", params.top_k not in (0, -1))):
            if on:
                value = getattr(params, name)
                raise VLLMValidationError(
                    f"{name} is not supported by this model's diffusion decoding: LLaDA's "
                    f"sampler is a tempered softmax with no truncation (got {value!r})",
                    parameter=name, value=value)
    for name, (neutral, reason) in _UNSUPPORTED.items():
        value = getattr(params, name)
        if (value is neutral or (isinstance(value, (int, float)) and value == neutral)
                or (isinstance(value, (list, dict)) and not value)):
            continue
        raise VLLMValidationError(
            f"{name} is not supported by diffusion decoding: {reason} (got {value!r})",
            parameter=name, value=value)


def admit(request: EngineCoreRequest, vllm_config: VllmConfig, defaults: dict[str, Any],
          max_tokens_given: int | None) -> None:
    """Resolve a request's dLLM parameters in place, or raise a validation error."""
    params = request.sampling_params
    model_config = vllm_config.model_config
    arch = BY_ARCHITECTURE[model_config.architecture]
    _check_supported(params, arch.sampler == "dream" or arch.block_causal)
    try:
        resolved = resolve(
            params.extra_args,
            defaults,
            max_tokens=max_tokens_given,
            prompt_len=len(request.prompt_token_ids),
            max_model_len=model_config.max_model_len,
            sampler=arch.sampler,
            causal_block=model_config.hf_config.dllm_block_length if arch.block_causal else None,
        )
    except ParamError as e:
        raise VLLMValidationError(str(e), parameter=e.parameter) from e
    params.extra_args = {**(params.extra_args or {}), **resolved.to_wire()}
    params.max_tokens = min(params.max_tokens or resolved.gen_length, resolved.gen_length)
    if params.seed is None:
        # Drawn once here and carried by the request, so that every tensor-parallel
        # rank (each decodes the same logits itself) samples with the same noise.
        params.seed = random.getrandbits(62)
    eot = getattr(model_config.hf_config, "eot_token_id", None)
    if eot is not None and not params.ignore_eos:
        # The end of an answer: vLLM already stops at EOS; LLaDA's Instruct
        # model ends a turn with <|eot_id|> and pads with EOS after it.
        params.stop_token_ids = sorted({*(params.stop_token_ids or []), eot})
        params._all_stop_token_ids.add(eot)
    _check_token_filters(params, resolved, model_config)


def _check_token_filters(params: SamplingParams, resolved: DllmParams,
                         model_config: ModelConfig) -> None:
    """What vLLM's own checks (token ids in the vocabulary) leave to a dLLM: the canvas
    must hold `min_tokens`, and no masked position may be left without a token. The
    filters can take out the mask, every token of a bad word, the end tokens (under
    `min_tokens`) and EOS (under `logits_eos_inf`): `allowed_token_ids` (else the
    vocabulary) must keep a token outside those."""
    if params.bad_words and params.bad_words_token_ids is None:
        raise VLLMValidationError("bad_words needs the model's tokenizer (the server was "
                                  "started with --skip-tokenizer-init)", parameter="bad_words")
    if params.min_tokens > resolved.gen_length:
        raise VLLMValidationError(
            f"min_tokens ({params.min_tokens}) exceeds the canvas (gen_length "
            f"{resolved.gen_length})", parameter="min_tokens", value=params.min_tokens)
    hf_config = model_config.hf_config
    removable = {hf_config.mask_token_id,
                 *(t for word in params.bad_words_token_ids or [] for t in word)}
    if params.min_tokens:
        removable |= params.all_stop_token_ids
    if resolved.logits_eos_inf:
        removable.add(hf_config.eos_token_id)
    allowed = params.allowed_token_ids or range(model_config.get_vocab_size())
    if all(t in removable for t in allowed):
        raise VLLMValidationError(
            "the filters leave no token to predict: allowed_token_ids has none outside the "
            "mask, the bad words' tokens and, with min_tokens, the end tokens",
            parameter="allowed_token_ids", value=params.allowed_token_ids)


def install() -> None:
    """Wrap `InputProcessor.process_inputs` so dLLM requests are admitted there."""
    original = InputProcessor.process_inputs
    if getattr(original, "_dllm_admission", False):
        return

    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if request.sampling_params is not None and is_dllm(self.vllm_config):
            if not hasattr(self, "_dllm_defaults"):
                self._dllm_defaults = dllm_defaults(self.vllm_config)
            admit(request, self.vllm_config, self._dllm_defaults, params.max_tokens)
        return request

    process_inputs._dllm_admission = True
    InputProcessor.process_inputs = process_inputs
