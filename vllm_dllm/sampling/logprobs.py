"""Log-probabilities of committed tokens, in the layout vLLM's output path reads.

A token's logprob is that of the distribution its position was committed from:
log softmax of the committing iteration's logits for that position after the token
filters (and a grammar's mask), divided by the request's temperature when it samples
(T > 0). A record per logits row holds that value, the token's rank in the
distribution (vLLM's: how many tokens have a logprob >= it) and the distribution's
top k, so that the host can keep it until the position is returned, which for a
dLLM may be many iterations later.

Records travel in the iteration's one packed int64 transfer: float32 values go as
their bit patterns, which `unpack` reads back on the host.
"""

import numpy as np
import torch


def record_width(k: int) -> int:
    """Columns of one record: logprob, rank, k top ids, k top logprobs."""
    return 2 + 2 * k


def records(logits: torch.Tensor, tokens: torch.Tensor, temperature: torch.Tensor,
            k: int) -> torch.Tensor:
    """[M, record_width(k)] int64 records of `tokens` [M] under `logits` [M, V]
    (float32, filtered) at `temperature` [M] (0: greedy, the logits as they are)."""
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logprobs = torch.log_softmax(logits.double() / scale[:, None], -1).float()
    chosen = logprobs.gather(-1, tokens[:, None])
    rank = (logprobs >= chosen).sum(-1, keepdim=True)
    top, top_ids = logprobs.topk(k, -1)
    return torch.cat([_bits(chosen), rank, top_ids, _bits(top)], dim=1)


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(torch.int32).long()


def unpack(rows: list[list[int]], tokens: list[int], k: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host records of `tokens` (each with k top entries or fewer, from a batch that
    asked for fewer; those are padded and never read) as vLLM's `LogprobsLists`
    arrays: token ids [N, k + 1] (the token first), logprobs [N, k + 1] float32,
    ranks [N]."""
    data = np.zeros((len(rows), record_width(k)), dtype=np.int64)
    for i, row in enumerate(rows):
        n = (len(row) - 2) // 2
        data[i, : 2 + n] = row[: 2 + n]
        data[i, 2 + k : 2 + k + n] = row[2 + n :]
    values = data[:, [0, *range(2 + k, 2 + 2 * k)]].astype(np.int32).view(np.float32)
    ids = np.concatenate([np.asarray(tokens, dtype=np.int64).reshape(-1, 1), data[:, 2 : 2 + k]], 1)
    return ids, values, data[:, 1]
