"""Which positions of a request an iteration recomputes (Fast-dLLM caches, spec §3.1).

Positions are absolute (prompt first). Everything outside the range keeps the
K/V an earlier iteration left in the cache.
"""

from vllm_dllm.sampling.state import DenoiseState


def recompute_range(state: DenoiseState, refresh: bool = False) -> tuple[int, int]:
    """[lo, hi) of the positions to recompute in this iteration.

    `none` recomputes the whole sequence every time. `prefix` and `dual` do so at
    each block start (the refresh, which also decodes) and whenever the cache no
    longer holds the request (`refresh`, e.g. after preemption); in between,
    `prefix` recomputes the block and everything after it, `dual` the block only.
    """
    prompt_len, params = state.prompt_len, state.params
    length = prompt_len + params.gen_length
    if params.cache == "none" or refresh or state.step_in_block == 0:
        return 0, length
    if params.cache == "prefix":
        return prompt_len + state.block_start, length
    return prompt_len + state.block_start, prompt_len + state.block_end
