"""The token-skipping rules on their own (no engine), and their parameters."""

import pytest
import torch

from dllm_reference import skipping as reference
from vllm_dllm.params import ParamError, resolve, server_defaults
from vllm_dllm.skipping import dyllm, es


def _resolve(extra):
    return resolve(extra, server_defaults(None), max_tokens=None, prompt_len=4, max_model_len=512)


@pytest.mark.parametrize("n_layers", [2, 4, 6, 16, 28, 32])
def test_keep_fractions_by_depth_match_the_reference(n_layers):
    keep, depth = (1.0, 0.5, 0.25), (0.0, 0.125, 0.25)
    assert es.layer_fractions(keep, depth, n_layers) == reference.es_layer_fractions(
        list(keep), list(depth), n_layers)


def test_llada_depth_schedule():
    # ES-dLLM's default schedule (arXiv:2603.10088; keep 1, 0.5, 0.25 from depths 0, 1/8,
    # 1/4): LLaDA (32 layers) keeps all rows through layer 4, half through layer 8.
    fractions = es.layer_fractions((1, 0.5, 0.25), (0, 0.125, 0.25), 32)
    assert fractions[:4] == [1] * 4 and fractions[4:8] == [0.5] * 4 and fractions[8:] == [0.25] * 24
    assert es.keep_counts(fractions, window=32, last_commits=1, block_length=32) == {4: 16, 8: 8}
    # The floor min(last commits + 2, block) keeps rows for what was just committed.
    assert es.keep_counts(fractions, window=32, last_commits=10, block_length=32) == {4: 16, 8: 12}
    assert es.keep_counts(fractions, window=8, last_commits=7, block_length=8) == {}


def test_importance_bonuses_and_padding():
    hidden = torch.zeros(1, 4, 8)
    previous = torch.ones(1, 4, 8)
    valid = torch.tensor([[True, True, True, False]])
    last_conf = torch.tensor([[0.9, 0.2, 0.1, 0.0]])
    leftmost = torch.tensor([[False, False, True, False]])
    fresh = torch.tensor([[False, True, False, False]])
    score = es.importance(hidden, previous, last_conf, leftmost, fresh, valid, torch.tensor([0.5]))
    # change = 1 everywhere: 0.5 * conf + 0.5 + 2 (top two) / +5 leftmost / +3 fresh
    assert score[0, :3].tolist() == pytest.approx([0.45 + 0.5 + 2, 0.1 + 0.5 + 2 + 3,
                                                   0.05 + 0.5 + 5])
    assert score[0, 3] == float("-inf")
    keep = es.keep_mask(score, torch.tensor([2]))
    assert keep.tolist() == [[False, True, True, False]]


def test_salient_rows():
    context = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cached = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    tau = torch.full((3,), 0.9)
    assert dyllm.salient(context, cached, tau).tolist() == [False, True, True]
    assert dyllm.salient(context, cached, torch.ones(3)).tolist() == [True, True, True]
    # Columns split over two "ranks": the all-reduced partial sums decide as whole rows do.
    other = torch.stack([(context[:, 1:] * cached[:, 1:]).sum(-1),
                         (context[:, 1:] ** 2).sum(-1), (cached[:, 1:] ** 2).sum(-1)], -1)
    got = dyllm.salient(context[:, :1], cached[:, :1], tau, lambda sums: sums + other)
    assert got.tolist() == [False, True, True]


@pytest.mark.parametrize("extra, parameter", [
    ({"skip": "fast"}, "skip"),
    ({"es_alpha": 0.3}, "es_alpha"),
    ({"skip": "dyllm", "es_keep": "1,0.5"}, "es_keep"),
    ({"skip": "es", "dyllm_threshold": 0.9}, "dyllm_threshold"),
    ({"skip": "es", "r2": True}, "r2"),
    ({"skip": "es", "es_keep": "1,0.5"}, "es_keep"),
    ({"skip": "es", "es_keep": "1,x,0.2"}, "es_keep"),
    ({"skip": "es", "es_depth": "0,2,0.5"}, "es_depth"),
    ({"skip": "es", "es_alpha": 1.5}, "es_alpha"),
    ({"skip": "dyllm", "dyllm_threshold": 0}, "dyllm_threshold"),
    ({"skip": "dyllm", "dyllm_query_period": 0}, "dyllm_query_period"),
])
def test_bad_skip_parameters_name_the_parameter(extra, parameter):
    with pytest.raises(ParamError) as e:
        _resolve(extra)
    assert e.value.parameter == parameter


def test_skip_parameters_resolve():
    p = _resolve({"skip": "es", "es_keep": [1, 0.5, 0.125], "es_alpha": 1})
    assert (p.skip, p.es_keep, p.es_alpha) == ("es", (1.0, 0.5, 0.125), 1.0)
    assert es.layer_fractions(p.es_keep, p.es_depth, 8) == [
        1.0, 0.5, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125]
    assert _resolve({"skip": "dyllm", "dyllm_threshold": 1}).dyllm_threshold == 1.0
