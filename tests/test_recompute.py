"""Which positions each cache mode recomputes, iteration by iteration."""

import torch

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.recompute import recompute_range
from vllm_dllm.sampling.state import DenoiseState


def ranges(cache: str, refresh_at: int | None = None) -> list[tuple[int, int]]:
    """Recompute ranges of a 10-token prompt, gen 16 in blocks of 8, 4 steps per block."""
    state = DenoiseState(10, DllmParams(16, 8, 8, cache=cache), mask_id=99, temperature=0.0,
                         seed=0)
    out = []
    for i in range(8):
        out.append(recompute_range(state, refresh=(i == refresh_at)))
        masked = state.masked_in_block()
        state.commit(masked[:2], torch.zeros(2, dtype=torch.long))
    assert state.finished
    return out


def test_none_recomputes_everything():
    assert ranges("none") == [(0, 26)] * 8


def test_prefix_refreshes_at_block_start_then_block_and_suffix():
    assert ranges("prefix") == [(0, 26)] + [(10, 26)] * 3 + [(0, 26)] + [(18, 26)] * 3


def test_dual_refreshes_at_block_start_then_block_only():
    assert ranges("dual") == [(0, 26)] + [(10, 18)] * 3 + [(0, 26)] + [(18, 26)] * 3


def test_lost_cache_forces_a_full_pass():
    assert ranges("dual", refresh_at=2)[2] == (0, 26)
