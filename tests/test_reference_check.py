"""The harness's reference check maps a configuration onto the reference decoder."""

import pytest

from benchmarks.reference_check import decode_with_reference, reference_settings
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA
from tests.helpers import random_prompt

pytestmark = pytest.mark.slow


def resolved(**changes):
    base = {"gen_length": 32, "block_length": 8, "steps": 32, "remasking": "low_confidence",
            "cache": "dual", "policy": "fixed", "threshold": 0.9, "factor": 1.0,
            "frechet_delta": 0.25, "r2": False, "logits_eos_inf": False,
            "confidence_eos_eot_inf": False}
    return {**base, **changes}


SHAPE = {"gen_length": 32, "block_length": 8, "steps": 32, "remasking": "low_confidence",
         "cache": "dual"}


def test_fixed_schedule_keeps_its_shape_and_cache():
    assert reference_settings(resolved()) == {**SHAPE, "policy": "fixed"}


@pytest.mark.parametrize("policy, parameter, value", [
    ("threshold", "threshold", 0.7), ("factor", "factor", 2.5), ("frechet", "frechet_delta", 0.1),
])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_parallel_policies_carry_their_parameter(policy, parameter, value, cache):
    settings = reference_settings(resolved(policy=policy, cache=cache, **{parameter: value}))
    assert settings == {**SHAPE, "cache": cache, "policy": policy, parameter: value}


@pytest.mark.parametrize("change, named", [
    ({"r2": True}, "r2"),
    ({"logits_eos_inf": True}, "logits_eos_inf"),
    ({"confidence_eos_eot_inf": True}, "confidence_eos_eot_inf"),
    ({"policy": "threshold", "r2": True}, "r2"),
])
def test_what_the_reference_lacks_is_refused_by_name(change, named):
    with pytest.raises(ValueError, match=named):
        reference_settings(resolved(**change))


def test_settings_decode_with_the_reference(tiny_model):
    """The policy's parameter reaches generate() (factor 4 decodes unlike the default 1)."""
    settings = reference_settings(resolved(policy="factor", factor=4.0, cache="prefix"))
    prompts = [random_prompt(1, 5), random_prompt(2, 12)]
    model = ReferenceLLaDA.from_pretrained(tiny_model)
    want = [generate(model, p, mask_id=model.config["mask_token_id"], temperature=0.0,
                     gen_length=32, block_length=8, cache="prefix", policy="factor",
                     factor=4.0)["tokens"] for p in prompts]
    assert decode_with_reference(tiny_model, prompts, settings) == want
