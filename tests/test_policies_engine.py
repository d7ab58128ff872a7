"""Requests with different decoding policies share one batch and decode as they would alone."""

import pytest

from tests.helpers import random_prompt

pytestmark = pytest.mark.slow

POLICY_ARGS = [
    {"policy": "fixed"},
    {"policy": "threshold", "threshold": 0.5},
    {"policy": "threshold", "threshold": 0.3, "cache": "dual"},
    {"policy": "factor", "factor": 1.5, "cache": "prefix"},
    {"policy": "frechet", "frechet_delta": 0.25},
    {"policy": "threshold", "threshold": 0.6, "r2": True, "r2_spatial_threshold": 0.4,
     "r2_temporal_threshold": 0.3},
    {"policy": "threshold", "threshold": 0.6, "r2": True, "r2_token_cluster": "random",
     "r2_spatial_threshold": 0.3, "r2_temporal_aggregation": "ave"},
    {"policy": "fixed", "logits_eos_inf": True, "confidence_eos_eot_inf": True},
]


def _requests():
    from vllm import SamplingParams

    prompts, params = [], []
    for i, extra in enumerate(POLICY_ARGS):
        prompts.append({"prompt_token_ids": random_prompt(400 + i, 5 + 9 * i)})
        params.append(SamplingParams(
            temperature=0.5 * (i % 2), seed=i, max_tokens=64, ignore_eos=True,
            extra_args={"gen_length": 64, "block_length": 16, "steps": 64, **extra}))
    return prompts, params


def test_mixed_policy_batch_equals_alone(llm):
    prompts, params = _requests()
    batched = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)
             for p, sp in zip(prompts, params)]
    assert batched == alone
    assert all(len(t) == 64 for t in batched)
