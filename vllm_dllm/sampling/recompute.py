"""Which positions of a request an iteration recomputes (Fast-dLLM caches,
arXiv:2505.22618 §3.2; ES-dLLM's refresh schedule, zhuzj19/ES-dLLM `generate.py`).

Positions are absolute (prompt first). Everything outside the range keeps the
K/V an earlier iteration left in the cache. A model whose logits row p predicts
position p + offset (Dream: 1) needs the rows from block start - offset fresh,
so the cached windows start that much earlier.
"""


def refreshes(cache: str, step_in_block: int, refresh_period: int, iteration: int) -> bool:
    """Whether a cached iteration re-encodes from position 0 (and so skips nothing):
    each block start (Fast-dLLM) or, with a period, every `refresh_period`-th
    iteration (ES-dLLM's `prompt_update_freq`)."""
    if cache == "none":
        return False
    if refresh_period:
        return iteration % refresh_period == 0
    return step_in_block == 0


def cache_window(cache: str, prompt_len: int, gen_length: int, block_start: int,
                    block_length: int, step_in_block: int, refresh: bool = False,
                    logits_offset: int = 0, refresh_period: int = 0, iteration: int = 0,
                    previous_commit: int | None = None) -> tuple[int, int]:
    """[lo, hi) of the positions to recompute in this iteration.

    `none` recomputes the whole sequence every time, and so does every cache mode
    when the cache no longer holds the request (`refresh`: a new or preempted
    one). Between refreshes `prefix` recomputes the block and everything after
    it, `dual` the block only, both from `logits_offset` rows before the block
    (the rows predicting it).

    Fast-dLLM's refresh (`refresh_period` 0) recomputes the whole sequence at each
    block start. ES-dLLM's (`refresh_period` n) widens the window to start at 0
    every n-th iteration and never recomputes what lies after it; in between, the
    window also reaches back to `previous_commit`, the leftmost position the
    previous iteration committed, whose K/V still hold the mask it replaced
    (at a block start it lies in the block before).
    """
    length = prompt_len + gen_length
    if cache == "none" or refresh:
        return 0, length
    hi = length if cache == "prefix" else prompt_len + block_start + block_length
    if refreshes(cache, step_in_block, refresh_period, iteration):
        # Fast-dLLM's refresh is the whole sequence; ES-dLLM's stops at the window's end.
        return 0, hi if refresh_period else length
    lo = prompt_len + block_start - logits_offset
    if previous_commit is not None:
        lo = min(lo, previous_commit)
    return max(0, lo), hi
