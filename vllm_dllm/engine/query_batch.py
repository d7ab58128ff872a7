"""Lays out one forward pass: which rows each layer computes, and their attention metadata.

Each request brings a plan, a list of `(first_layer, positions)`: layers from
`first_layer` on compute the absolute `positions` (ascending) of that request. The
first entry starts at layer 0 and each later set lies inside the one before, so a
layer only ever drops rows. A dropped row keeps, in that layer and every later one,
the K/V an earlier pass left in the pages; that is what token skipping (different
subsets per layer) stands on. A plan with one entry is a plain partial recompute.

The pass is cut into segments at every layer where some request's set changes;
each segment has its own `BidirectionalMetadata` and the row gather that enters it.
"""

from dataclasses import dataclass

import torch

from vllm_dllm.attention_backends.bidirectional import BidirectionalMetadata

Plan = list[tuple[int, torch.Tensor]]


@dataclass
class Segment:
    first_layer: int
    # Indices into the previous segment's rows that stay computed (None for the first).
    keep: torch.Tensor | None
    metadata: BidirectionalMetadata


@dataclass
class QueryBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    segments: list[Segment]
    # Per request: the positions the last segment computes, and where its rows begin
    # (`final_positions` is None for a range batch, where `range_rows` finds rows).
    final_positions: list[torch.Tensor] | None
    final_starts: torch.Tensor
    range_lo: torch.Tensor | None = None

    def range_rows(self, request: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Output rows of a range batch holding `positions` of `request` (host tensors)."""
        return self.final_starts[request] + positions - self.range_lo[request]

    def layer_rows(self) -> dict[int, torch.Tensor]:
        """Row gathers keyed by the layer they come before."""
        return {s.first_layer: s.keep for s in self.segments[1:]}

    def run(self, layers, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row controller of a pass whose sets are all fixed before it starts."""
        gathers = self.layer_rows()
        for i, layer in enumerate(layers):
            if i in gathers:
                x, positions = x[gathers[i]], positions[gathers[i]]
            x = layer(positions, x)
        return x

    def metadata_for_layer(self, layer: int) -> BidirectionalMetadata:
        return next(s.metadata for s in reversed(self.segments) if s.first_layer <= layer)

    def output_rows(self, request: int, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the model's output holding `positions` of request `request`."""
        index = _index_within(self.final_positions[request], positions)
        if index is None:
            raise ValueError("the last layer does not compute every position asked for")
        return index + self.final_starts[request]


def _metadata(starts: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
              slot_mapping: torch.Tensor, device: torch.device) -> BidirectionalMetadata:
    """Attention metadata of one segment; `starts` [B+1] and `seq_lens` [B] are host tensors."""
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
    """The pass where request b computes the absolute positions [lo[b], hi[b]) in every layer.

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
        segments=[Segment(0, None, metadata)],
        final_positions=None,
        final_starts=starts[:-1],
        range_lo=lo,
    )


def _index_within(computed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """Where each of `positions` sits in the ascending `computed`; None if one is missing."""
    index = torch.searchsorted(computed, positions)
    if bool((index >= len(computed)).any()) or not bool((computed[index] == positions).all()):
        return None
    return index


def plan_positions(plan: Plan, layer: int) -> torch.Tensor:
    """The positions `plan` computes at `layer`."""
    return next(positions for first, positions in reversed(plan) if first <= layer)


def build_query_batch(sequences: list[torch.Tensor], plans: list[Plan],
                      block_ids: list[list[int]], block_size: int,
                      device: torch.device) -> QueryBatch:
    """The forward pass over `sequences` (full token rows, prompt + canvas) that `plans` ask for."""
    for plan in plans:
        if plan[0][0] != 0:
            raise ValueError("a plan must start at layer 0")
    boundaries = sorted({first for plan in plans for first, _ in plan})
    max_pages = max(len(ids) for ids in block_ids)
    block_table = torch.zeros((len(plans), max_pages), dtype=torch.long)
    for i, ids in enumerate(block_ids):
        block_table[i, : len(ids)] = torch.tensor(ids)
    seq_lens = [len(s) for s in sequences]
    block_table = block_table.to(device, torch.int32)

    segments: list[Segment] = []
    previous: list[torch.Tensor] | None = None
    previous_starts: list[int] = []
    for first in boundaries:
        sets = [plan_positions(plan, first) for plan in plans]
        starts = [0]
        for positions in sets:
            starts.append(starts[-1] + len(positions))
        keep = None
        if previous is not None:
            pieces = []
            for before, now, offset in zip(previous, sets, previous_starts):
                index = _index_within(before, now)
                if index is None:
                    raise ValueError(f"the positions of layer {first} are not inside "
                                     "those of the layer before")
                pieces.append(index + offset)
            keep = torch.cat(pieces).to(device)
        positions = torch.cat(sets)
        pages = torch.cat([torch.tensor(ids, dtype=torch.long)[s // block_size]
                           for ids, s in zip(block_ids, sets)])
        metadata = _metadata(torch.tensor(starts), torch.tensor(seq_lens), block_table,
                             (pages * block_size + positions % block_size).to(device), device)
        segments.append(Segment(first, keep, metadata))
        previous, previous_starts = sets, starts[:-1]

    first_sets = [plan[0][1] for plan in plans]
    return QueryBatch(
        input_ids=torch.cat([s[p] for s, p in zip(sequences, first_sets)]).to(device),
        positions=torch.cat(first_sets).to(device),
        segments=segments,
        final_positions=previous,
        final_starts=torch.tensor(previous_starts),
    )
