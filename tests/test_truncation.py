"""The block-diffusion samplers' truncation: top-k, then top-p over what top-k kept
(SDAR's and LLaDA2's order, not Dream's), batched with per-row settings, equals the
reference's row-at-a-time rule."""

import math

import torch

from dllm_reference.block_diffusion import truncate
from vllm_dllm.sampling import truncation


def test_top_p_is_taken_over_the_top_k_survivors():
    scaled = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]], dtype=torch.float64)
    kept = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    one = torch.ones(1, dtype=torch.float64)
    # Alone, top-p 0.6 keeps the two tokens that the ones before them leave under 0.6.
    assert kept(truncation.top_k_top_p(scaled, torch.tensor([0]), 0.6 * one)) == [True, True, False]
    # After top-k 2 the first holds 0.625 of the mass, so top-p 0.6 keeps it alone;
    # Dream's order (top-p first) keeps two.
    both = truncation.top_k_top_p(scaled, torch.tensor([2]), 0.6 * one)
    assert kept(both) == [True, False, False]
    assert kept(truncation.top_p_top_k(scaled, 0.6 * one, torch.tensor([2]))) == [True, True, False]
    # Off: nothing removed.
    assert torch.equal(truncation.top_k_top_p(scaled, torch.tensor([0]), one), scaled)


def test_batched_equals_reference_row_by_row():
    g = torch.Generator().manual_seed(0)
    rows, vocab = 64, 50
    scaled = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    scaled[::5, :3] = float("-inf")  # rows that arrive with tokens already removed
    top_k = torch.randint(0, 12, (rows,), generator=g)
    top_p = torch.where(torch.rand(rows, generator=g) < 0.3, 1.0,
                        torch.rand(rows, generator=g, dtype=torch.float64))
    got = truncation.top_k_top_p(scaled, top_k, top_p)
    for i in range(rows):
        want = truncate(scaled[i:i + 1], int(top_k[i]), float(top_p[i]))[0]
        assert torch.equal(got[i], want), i
    assert not torch.equal(got, scaled)
