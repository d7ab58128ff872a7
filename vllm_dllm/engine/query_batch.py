"""Lays out one forward pass: each request's window of positions and its attention metadata.

Request b computes the absolute positions [lo[b], hi[b]) in the first layer (all
of its sequence, or what a cache mode recomputes). Which rows later layers keep
is the pass's row controller's business (`engine/pass_rows.py`), which rewrites
this one metadata object as the rows change; every layer's name points to it.
"""

from dataclasses import dataclass

import torch

from vllm_dllm.attention_backends.bidirectional import BidirectionalMetadata


@dataclass
class QueryBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: BidirectionalMetadata
    # Per request: its first row and its window's first position (host tensors).
    starts: torch.Tensor
    lo: torch.Tensor
    # Rows per request (host).
    counts: list[int]

    def range_rows(self, request: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows holding `positions` of `request` when every layer computes the window."""
        return self.starts[request] + positions - self.lo[request]


def _metadata(starts: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              slot_mapping: torch.Tensor, device: torch.device) -> BidirectionalMetadata:
    """Attention metadata of a pass; `starts` [B+1] and `seq_lens` [B] are host tensors."""
    return BidirectionalMetadata(
        num_actual_tokens=int(starts[-1]),
        query_start_loc=starts.to(device, torch.int32, non_blocking=True),
        seq_lens=seq_lens.to(device, torch.int32, non_blocking=True),
        block_table=block_table,
        slot_mapping=slot_mapping,
        max_query_len=int((starts[1:] - starts[:-1]).max()) if len(seq_lens) else 0,
        max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
    )


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
    starts = torch.zeros(len(lo) + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=starts[1:])
    request = torch.repeat_interleave(torch.arange(len(lo)), lengths)
    positions = lo[request] + torch.arange(int(starts[-1])) - starts[:-1][request]
    positions_dev = positions.to(device, non_blocking=True)
    request_dev = request.to(device, non_blocking=True)
    pages = block_table[request_dev, positions_dev // block_size].long()
    metadata = _metadata(starts, seq_lens, block_table,
                         pages * block_size + positions_dev % block_size, device)
    return QueryBatch(
        input_ids=tokens[rows[request_dev], positions_dev],
        positions=positions_dev,
        metadata=metadata,
        starts=starts[:-1],
        lo=lo,
        counts=lengths.tolist(),
    )
