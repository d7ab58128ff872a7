"""bfloat16, the real models' dtype, without vLLM's engine: the decoding core driven by a
bf16 reference model (`CoreDriver`, the runner's windows over the reference model's K/V)
gives the bf16 reference decoder's tokens, one batch per cache mode and refresh schedule,
greedy and seeded sampling. vLLM's CPU worker is not part of this (README, "GPUs").
"""

import pytest
import torch

from dllm_reference.core_driver import CoreDriver
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA
from tests.helpers import model_ids, random_prompt
from vllm_dllm.params import DllmParams

# (cache, refresh_period, policy): one case per cache mode and refresh schedule.
CASES = [("none", 0, "fixed"), ("prefix", 0, "fixed"), ("dual", 0, "threshold"),
         ("dual", 3, "fixed")]


@pytest.fixture(scope="module")
def bf16_reference(tiny_model):
    return ReferenceLLaDA.from_pretrained(tiny_model, torch.bfloat16)


@pytest.mark.parametrize("cache, refresh_period, policy", CASES)
def test_bf16_core_matches_bf16_reference(bf16_reference, tiny_model, cache, refresh_period,
                                          policy):
    mask_id = model_ids(tiny_model)["mask"]
    assert bf16_reference.weights[next(iter(bf16_reference.weights))].dtype == torch.bfloat16
    params = DllmParams(32, 8, 16, cache=cache, refresh_period=refresh_period, policy=policy,
                        threshold=0.05)
    requests = [(str(i), random_prompt(70 + i, 4 + 9 * i), params, temperature, 20 + i)
                for i, temperature in enumerate([0.0, 0.7, 0.0])]
    got = CoreDriver(bf16_reference, mask_id, "cpu", max_rows=3).run({0: requests})
    for key, prompt, _, temperature, seed in requests:
        want = generate(bf16_reference, prompt, mask_id=mask_id, gen_length=32, block_length=8,
                        steps=16, cache=cache, refresh_period=refresh_period, policy=policy,
                        threshold=0.05, temperature=temperature, seed=seed)["tokens"]
        assert got[key] == want
