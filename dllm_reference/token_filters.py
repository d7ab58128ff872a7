"""vLLM's token filters for the reference decoders, one position at a time:
`logit_bias`, `allowed_token_ids`, `bad_words` (token-id sequences) and `min_tokens`.

* A masked position's logits row is filtered before its token is chosen and scored
  (`filter_row`): tokens outside `allowed_token_ids` get -inf; a token that would
  complete a bad word with the committed canvas tokens around it gets -inf; at canvas
  positions below `min_tokens` the end tokens get -inf; `logit_bias` is added.
* After an iteration's commits, an occurrence of a bad word holding a token committed
  by that iteration loses its rightmost such token again (`bad_word_breaks`): tokens
  committed together cannot see each other.

Bad words are matched inside the canvas (never across the prompt), on committed
tokens (never the mask). The filters are the plugin's `TokenFilters` record; the
code that applies them is not shared.
"""

import torch

from vllm_dllm.sampling.token_filters import TokenFilters


def completes_bad_word(canvas: list[int], position: int, token: int, word: list[int],
                       mask_id: int) -> bool:
    """Whether `token` at canvas `position` would complete an occurrence of `word` whose
    other tokens are already committed."""
    for j, t in enumerate(word):
        start = position - j
        if t != token or start < 0 or start + len(word) > len(canvas):
            continue
        if all(canvas[start + i] == w and canvas[start + i] != mask_id
               for i, w in enumerate(word) if i != j):
            return True
    return False


def filter_row(row: torch.Tensor, canvas: list[int], position: int, filters: TokenFilters,
               mask_id: int) -> None:
    """Filter one logits row [V] (float32) of canvas `position` in place."""
    if filters.allowed_token_ids:
        keep = row[filters.allowed_token_ids].clone()
        row[:] = float("-inf")
        row[filters.allowed_token_ids] = keep
    for word in filters.bad_words:
        for token in set(word):
            if completes_bad_word(canvas, position, token, word, mask_id):
                row[token] = float("-inf")
    if position < filters.min_tokens:
        row[filters.end_ids] = float("-inf")
    for token, bias in filters.logit_bias.items():
        row[token] = row[token] + torch.tensor(bias, dtype=row.dtype)


def bad_word_breaks(canvas: list[int], new: set[int], filters: TokenFilters,
                    mask_id: int) -> set[int]:
    """The canvas positions, among the newly committed `new`, to put back to the mask:
    the rightmost new position of each bad word occurrence that holds one."""
    back = set()
    for word in filters.bad_words:
        for start in range(len(canvas) - len(word) + 1):
            span = range(start, start + len(word))
            if all(canvas[q] == w and canvas[q] != mask_id for q, w in zip(span, word)):
                fresh = [q for q in span if q in new]
                if fresh:
                    back.add(max(fresh))
    return back
