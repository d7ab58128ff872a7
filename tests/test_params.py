import pytest

from vllm_dllm.params import DEFAULTS, ParamError, resolve, server_defaults


def _resolve(extra=None, defaults=None, max_tokens=None, prompt_len=10, max_model_len=512):
    return resolve(extra, defaults or server_defaults(None), max_tokens=max_tokens,
                   prompt_len=prompt_len, max_model_len=max_model_len)


def test_defaults_one_step_per_token():
    p = _resolve()
    assert (p.gen_length, p.block_length, p.steps, p.remasking) == (
        DEFAULTS["gen_length"], DEFAULTS["block_length"], DEFAULTS["gen_length"],
        "low_confidence")


def test_max_tokens_shrinks_canvas_to_whole_blocks():
    assert _resolve(max_tokens=40).gen_length == 64
    assert _resolve(max_tokens=5).gen_length == 32
    assert _resolve(max_tokens=1000).gen_length == 128
    assert _resolve({"gen_length": 256}, max_tokens=8).gen_length == 256


def test_server_defaults_override():
    d = server_defaults({"gen_length": 64, "steps": 16})
    p = _resolve(defaults=d)
    assert (p.gen_length, p.steps) == (64, 16)
    with pytest.raises(ParamError) as e:
        server_defaults({"gen_len": 1})
    assert e.value.parameter == "gen_len"


def test_model_defaults_sit_between_plugin_and_server():
    d = server_defaults({"block_length": 8}, {"gen_length": 32, "block_length": 32})
    assert (d["gen_length"], d["block_length"], d["policy"]) == (32, 8, "fixed")
    p = _resolve({"block_length": 16}, defaults=d)
    assert (p.gen_length, p.block_length) == (32, 16)
    with pytest.raises(ParamError) as e:
        server_defaults(None, {"canvas": 32})
    assert e.value.parameter == "canvas"


@pytest.mark.parametrize("extra, parameter", [
    ({"gen_length": 30, "block_length": 8}, "gen_length"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "steps"),
    ({"remasking": "lowest"}, "remasking"),
    ({"gen_length": 0}, "gen_length"),
    ({"gen_length": True}, "gen_length"),
    ({"block_length": -4}, "block_length"),
    ({"steps": 2.5}, "steps"),
    ({"gen_length": 512}, "gen_length"),
    ({"bogus": 1}, "bogus"),
    ({"refresh_period": -1, "cache": "dual"}, "refresh_period"),
    ({"refresh_period": 4}, "refresh_period"),
    ({"policy": "sequential"}, "policy"),
])
def test_bad_values_name_the_parameter(extra, parameter):
    with pytest.raises(ParamError) as e:
        _resolve(extra)
    assert e.value.parameter == parameter
    assert parameter in str(e.value)


def test_a_server_refresh_period_does_not_refuse_uncached_requests():
    defaults = server_defaults({"refresh_period": 64})
    assert _resolve({"cache": "none"}, defaults).cache == "none"
    assert _resolve({"cache": "dual"}, defaults).refresh_period == 64


def test_readme_lists_exactly_the_declared_parameters():
    """README's parameter table is the declarations' own (`params.readme_table`): every
    parameter, its default and its doc, nothing else."""
    from pathlib import Path

    from vllm_dllm.params import readme_table

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| parameter | default | meaning |")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert lines[start:end] == readme_table()
    names = [line.split("`")[1] for line in lines[start + 2:end]]
    assert names == list(DEFAULTS)
