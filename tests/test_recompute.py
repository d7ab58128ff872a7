"""Which positions each cache mode recomputes, iteration by iteration."""

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.state import RequestState


def ranges(cache: str, refresh_at: int | None = None, logits_offset: int = 0,
           skip: str = "none", refresh_period: int = 0) -> list[tuple[int, int]]:
    """Recompute ranges of a 10-token prompt, gen 16 in blocks of 8, 4 steps per block."""
    extra = {"dyllm_full_steps": 1, "dyllm_query_period": 2} if skip == "dyllm" else {}
    state = RequestState(10, DllmParams(16, 8, 8, cache=cache, skip=skip,
                                           refresh_period=refresh_period, **extra), mask_id=99,
                         row=0, logits_offset=logits_offset)
    state.needs_refresh = False
    out = []
    for i in range(8):
        state.needs_refresh = i == refresh_at
        out.append(state.recompute_range())
        block = state.canvas[state.block_start: state.block_start + 8]
        masked = [c for c, t in enumerate(block) if t == 99]
        for c in masked[:2]:
            block[c] = 0
        state.apply(block + [int(99 not in block and state.step_in_block == 3)])
    assert state.finished
    return out


def test_none_recomputes_everything():
    assert ranges("none") == [(0, 26)] * 8


def test_prefix_refreshes_at_block_start_then_block_and_suffix():
    assert ranges("prefix") == [(0, 26)] + [(10, 26)] * 3 + [(0, 26)] + [(18, 26)] * 3


def test_dual_refreshes_at_block_start_then_block_only():
    assert ranges("dual") == [(0, 26)] + [(10, 18)] * 3 + [(0, 26)] + [(18, 26)] * 3


def test_periodic_refresh_replaces_the_block_start_refresh():
    """ES-dLLM's schedule: from 0 every 3rd iteration, never past the block (dual); a
    block's first window reaches back to the last commits of the block before (16)."""
    assert ranges("dual", refresh_at=0, refresh_period=3) == [
        (0, 26), (10, 18), (10, 18), (0, 18), (16, 26), (18, 26), (0, 26), (18, 26)]
    assert ranges("prefix", refresh_at=0, refresh_period=3) == [
        (0, 26), (10, 26), (10, 26), (0, 26), (16, 26), (18, 26), (0, 26), (18, 26)]


def test_shifted_logits_widen_the_cached_windows():
    """Dream's row p predicts p + 1: each window starts at the row predicting the block."""
    assert ranges("prefix", logits_offset=1) == [(0, 26)] + [(9, 26)] * 3 + [(0, 26)] + [
        (17, 26)] * 3
    assert ranges("dual", logits_offset=1) == [(0, 26)] + [(9, 18)] * 3 + [(0, 26)] + [
        (17, 26)] * 3
    # DyLLM's canvas-only queries under `none` start at the last prompt row.
    assert ranges("none", logits_offset=1, skip="dyllm")[2:5:2] == [(9, 26)] * 2
    assert ranges("none", skip="dyllm")[2:5:2] == [(10, 26)] * 2


def test_dyllm_queries_the_whole_sequence_on_its_papers_schedule():
    """DyLLM's engine (younjoo0614/DyLLM, `prepare_sparse`) queries the canvas only at
    1-based steps past the 4th that are not multiples of 4: after 4 full steps, step 5
    is canvas-only and steps 8, 12, 16 query everything."""
    params = DllmParams(32, 32, 32, skip="dyllm")
    state = RequestState(10, params, mask_id=99, row=0)
    whole = []
    for step in range(1, 17):
        if state.recompute_range() == (0, 42):
            whole.append(step)
        else:
            assert state.recompute_range() == (10, 42)
        block = state.canvas[:32]
        block[block.index(99)] = 0
        state.apply(block + [0])
    assert whole == [1, 2, 3, 4, 8, 12, 16]


def test_lost_cache_forces_a_full_pass():
    assert ranges("dual", refresh_at=2)[2] == (0, 26)


def test_the_window_after_an_iteration_is_the_next_ones():
    state = RequestState(10, DllmParams(16, 8, 8, cache="dual"), mask_id=99, row=0)
    assert state.recompute_range() == (0, 26)
    state.apply([0] * 2 + [99] * 6 + [0])
    assert state.recompute_range() == (10, 18)


def test_apply_hands_out_the_committed_prefix_once():
    state = RequestState(3, DllmParams(8, 4, 8, policy="threshold"), mask_id=99, row=0)
    assert state.apply([5, 99, 6, 99, 0]) == [5]
    assert state.apply([5, 7, 6, 8, 1]) == [7, 6, 8]
    assert (state.block, state.step_in_block) == (1, 0)
