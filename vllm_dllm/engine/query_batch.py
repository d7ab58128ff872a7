"""Lays out one forward pass: each request's query segments and its attention metadata.

A segment is a run of absolute positions [lo, hi) of one request computed in the
first layer, whose rows attend to the request's positions [0, key length) in the
pages. A bidirectional model's request has one segment, its window (all of its
sequence, or what a cache mode recomputes) over the whole sequence; a block-causal
model's has one per block it computes, each seeing up to its own end, so the
attention call needs no mask. Which rows later layers keep is the pass's row
controller's business (`engine/pass_rows.py`).
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


def segment_query_batch(tokens: torch.Tensor, rows: torch.Tensor, segments: list[list[tuple]],
                        seq_lens: torch.Tensor, block_table: torch.Tensor, block_size: int
                        ) -> QueryBatch:
    """The pass where request b computes its `segments[b]`: (lo, hi, key length) each,
    ascending.

    `tokens` [R, L] are the batch's token rows on the device and `rows` [B] the
    scheduled requests' rows (device); `seq_lens` [B] is a host tensor; `block_table`
    [B, pages] is on the device. Everything is laid out with batched tensor
    operations: no per-request loop on the device.
    """
    device = tokens.device
    owner = torch.tensor([b for b, own in enumerate(segments) for _ in own], dtype=torch.long)
    lo, hi, key_lens = torch.tensor([s for own in segments for s in own],
                                    dtype=torch.long).reshape(-1, 3).unbind(1)
    lengths = hi - lo
    starts = row_offsets(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lo)), lengths)
    positions = lo[segment] + torch.arange(int(starts[-1])) - starts[:-1][segment]
    request = owner[segment]
    positions_dev = positions.to(device, non_blocking=True)
    request_dev = request.to(device, non_blocking=True)
    pages = block_table[request_dev, positions_dev // block_size].long()
    slots = pages * block_size + positions_dev % block_size
    owner_dev = owner.to(device, non_blocking=True)
    return QueryBatch(
        input_ids=tokens[rows[request_dev], positions_dev],
        positions=positions_dev,
        metadata=rows_metadata(lengths, key_lens, block_table[owner_dev], slots, device),
        request=request_dev,
        counts=torch.zeros(len(segments), dtype=torch.long).index_add_(0, owner, lengths).tolist(),
        seq_lens=seq_lens,
    )
