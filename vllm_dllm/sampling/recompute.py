"""Which positions of a request an iteration recomputes (Fast-dLLM caches, spec §3.1).

Positions are absolute (prompt first). Everything outside the range keeps the
K/V an earlier iteration left in the cache. A model whose logits row p predicts
position p + offset (Dream: 1) needs the rows from block start - offset fresh,
so the cached windows start that much earlier.
"""


def recompute_range(cache: str, prompt_len: int, gen_length: int, block_start: int,
                    block_length: int, step_in_block: int, refresh: bool = False,
                    logits_offset: int = 0) -> tuple[int, int]:
    """[lo, hi) of the positions to recompute in this iteration.

    `none` recomputes the whole sequence every time. `prefix` and `dual` do so at
    each block start (the refresh, which also decodes) and whenever the cache no
    longer holds the request (`refresh`, e.g. after preemption); in between,
    `prefix` recomputes the block and everything after it, `dual` the block only,
    both from `logits_offset` rows before the block (the rows predicting it).
    """
    length = prompt_len + gen_length
    if cache == "none" or refresh or step_in_block == 0:
        return 0, length
    lo = max(0, prompt_len + block_start - logits_offset)
    if cache == "prefix":
        return lo, length
    return lo, prompt_len + block_start + block_length
