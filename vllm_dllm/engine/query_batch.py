"""Lays out one forward pass: each request's window of positions and its attention metadata.

Request b computes the absolute positions [lo[b], hi[b]) in the first layer (all
of its sequence, or what a cache mode recomputes). Which rows later layers keep
is the pass's row controller's business (`engine/pass_rows.py`).
"""

from dataclasses import dataclass

import torch

from vllm_dllm.attention_backends.bidirectional import (
    BidirectionalMetadata,
    row_offsets,
    rows_metadata,
)


@dataclass(frozen=True)
class QueryBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    # The first layer's row set, and each row's request (0..B-1, device).
    metadata: BidirectionalMetadata
    request: torch.Tensor
    # Rows per request and sequence lengths (host).
    counts: list[int]
    seq_lens: torch.Tensor


def range_query_batch(tokens: torch.Tensor, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int
                      ) -> QueryBatch:
    """The pass where request b computes the absolute positions [lo[b], hi[b]).

    `tokens` [R, L] are the batch's token rows on the device and `rows` [B] the
    scheduled requests' rows (device); `lo`, `hi`, `seq_lens` [B] are host tensors;
    `block_table` [B, pages] is on the device. Everything is laid out with batched
    tensor operations: no per-request loop.
    """
    device = tokens.device
    lengths = hi - lo
    starts = row_offsets(lengths)
    request = torch.repeat_interleave(torch.arange(len(lo)), lengths)
    positions = lo[request] + torch.arange(int(starts[-1])) - starts[:-1][request]
    positions_dev = positions.to(device, non_blocking=True)
    request_dev = request.to(device, non_blocking=True)
    pages = block_table[request_dev, positions_dev // block_size].long()
    slots = pages * block_size + positions_dev % block_size
    return QueryBatch(
        input_ids=tokens[rows[request_dev], positions_dev],
        positions=positions_dev,
        metadata=rows_metadata(lengths, seq_lens, block_table, slots, device),
        request=request_dev,
        counts=lengths.tolist(),
        seq_lens=seq_lens,
    )
