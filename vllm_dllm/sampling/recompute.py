"""Which positions of a request an iteration recomputes (Fast-dLLM caches, spec §3.1).

Positions are absolute (prompt first). Everything outside the range keeps the
K/V an earlier iteration left in the cache.
"""


def recompute_range(cache: str, prompt_len: int, gen_length: int, block_start: int,
                    block_length: int, step_in_block: int, refresh: bool = False) -> tuple[int, int]:
    """[lo, hi) of the positions to recompute in this iteration.

    `none` recomputes the whole sequence every time. `prefix` and `dual` do so at
    each block start (the refresh, which also decodes) and whenever the cache no
    longer holds the request (`refresh`, e.g. after preemption); in between,
    `prefix` recomputes the block and everything after it, `dual` the block only.
    """
    length = prompt_len + gen_length
    if cache == "none" or refresh or step_in_block == 0:
        return 0, length
    if cache == "prefix":
        return prompt_len + block_start, length
    return prompt_len + block_start, prompt_len + block_start + block_length
