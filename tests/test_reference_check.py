"""The harness's reference check maps a configuration onto the reference decoder."""

import pytest

from benchmarks.reference_check import reference_settings


def resolved(**changes):
    base = {"gen_length": 32, "block_length": 8, "steps": 32, "remasking": "low_confidence",
            "cache": "dual", "policy": "fixed", "threshold": 0.9, "r2": False,
            "logits_eos_inf": False, "confidence_eos_eot_inf": False}
    return {**base, **changes}


def test_fixed_schedule_keeps_its_shape_and_cache():
    assert reference_settings(resolved()) == {
        "gen_length": 32, "block_length": 8, "steps": 32, "remasking": "low_confidence",
        "cache": "dual"}


@pytest.mark.parametrize("change, named", [
    ({"policy": "threshold"}, "policy"),
    ({"r2": True}, "r2"),
    ({"logits_eos_inf": True}, "logits_eos_inf"),
    ({"confidence_eos_eot_inf": True}, "confidence_eos_eot_inf"),
])
def test_what_the_reference_lacks_is_refused_by_name(change, named):
    with pytest.raises(ValueError, match=named):
        reference_settings(resolved(**change))
