"""The harness's `--config NAME=JSON`: a configuration decodes the workload's canvas unless it
names its own shape."""

import pytest

from benchmarks.configs import parse_config


def test_user_configuration_takes_the_workload_shape():
    shape = {"gen_length": 128, "block_length": 32}
    plain = parse_config('seq={"policy": "sequential"}', shape)
    assert (plain.name, plain.extra_args) == ("seq", {**shape, "policy": "sequential"})
    own = parse_config('short={"policy": "fixed", "gen_length": 32, "block_length": 8}', shape)
    assert own.extra_args == {"gen_length": 32, "block_length": 8, "policy": "fixed"}


@pytest.mark.parametrize("spec", ["noequals", '={"policy": "fixed"}', 'x=[1, 2]'])
def test_malformed_configuration_is_refused(spec):
    with pytest.raises(ValueError):
        parse_config(spec)
