"""The row controller of a forward pass: which rows each layer computes.

The runner lays out each request's window (the cache mode's positions) for the
first layer; the model runs its own layer loop and asks this controller, a
`decoder.LayerHook`, before and after each layer:

* `none` (and every refresh iteration): all rows through every layer;
* `es` (ES-dLLM, arXiv:2603.10088): after each layer where the request's keep
  fraction drops, its rows are scored (`skipping.es.importance`) and only the best
  go on; the others keep their stale K/V in the pages and get no logits;
* `dyllm` (DyLLM, arXiv:2603.08026): every row stays a query, but the layer is a
  `decoder.SparseRows`: only salient rows write K/V, get exact attention and run
  the FFN; the rest add the change of the salient values to their cached context
  (`DeltaRows`; or get exact attention, `dyllm_attention=exact`) and reuse their
  cached FFN output (`skipping.dyllm.salient`).

All requests of the pass share one attention call per layer. Each row set gets its
own attention metadata (`rows_metadata` when ES drops rows; a K/V slot list for a
sparse layer), installed for the layers it serves and never changed afterwards.
Row counts of ES are known on the host before the pass; a sparse layer reads back
its K/V and FFN row sets (and, approximating, their per-request counts).

Per-token caches (hidden states for ES; contexts and FFN outputs for DyLLM) are
indexed by KV-cache slot, so a request owns exactly the cache rows of its pages:
vLLM's block manager allocates and frees them with the pages, and a preempted
request, which resumes on new pages, rebuilds them in its first (full) pass.
"""

from dataclasses import replace

import torch
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

from vllm_dllm.attention_backends.bidirectional import (
    BidirectionalMetadata,
    row_offsets,
    rows_metadata,
)
from vllm_dllm.attention_backends.paged_attention import DeltaRows
from vllm_dllm.skipping import dyllm, es
from vllm_dllm.skipping.plan import RequestSkip


class SlotCaches:
    """Per-slot tensors [num_slots, width], one per (kind, layer), made on first use."""

    def __init__(self, num_slots: int, device: torch.device, dtype: torch.dtype):
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.tensors: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, kind: str, layer: int, width: int) -> torch.Tensor:
        key = (kind, layer)
        if key not in self.tensors:
            self.tensors[key] = torch.zeros((self.num_slots, width), dtype=self.dtype,
                                            device=self.device)
        return self.tensors[key]


class PassRows:
    """Row controller of one pass (see the module docstring).

    `metadata` maps each layer's attention name to the metadata it reads during the
    pass (the first layer's row set to start with); `layer_names` lists those names
    in layer order; the rows' slots are the first metadata's. `counts` [B] are the first
    layer's rows per request (host); `positions`, `request` (0..B-1) [N] and, when some
    request skips, the row features (`last_conf`, `fresh`, `leftmost` [N], read from the decoding state
    before the pass) are on the device; `seq_lens` [B] is the host copy of the
    metadata's.
    """

    def __init__(self, metadata: dict[str, BidirectionalMetadata], layer_names: list[str],
                 counts: list[int], seq_lens: torch.Tensor, positions: torch.Tensor,
                 request: torch.Tensor, skips: list[RequestSkip], caches: SlotCaches | None,
                 features: dict[str, torch.Tensor], hidden_size: int, context_width: int):
        self.metadata = metadata
        self.seq_lens = seq_lens
        self.ffn_width = hidden_size
        self.context_width = context_width
        self.layer_names = layer_names
        self.counts = list(counts)
        self.skips = skips
        self.caches = caches
        device = positions.device
        self.device = device
        self.es_layers = {i for s in skips if s.method == "es" for i in s.es_layers}
        self.uses_dyllm = any(s.method == "dyllm" for s in skips)
        first = metadata[layer_names[0]]
        self.row_set = first

        def per_row(values: list) -> torch.Tensor:
            return torch.tensor(values, device=device)[request]

        self.rows: dict[str, torch.Tensor] = {
            "positions": positions, "slots": first.slot_mapping, "request": request, **features}
        if self.uses_dyllm:
            self.rows["dy_sparse"] = per_row([s.method == "dyllm" and s.sparse for s in skips])
            self.rows["tau"] = per_row([s.params.dyllm_threshold for s in skips])
            # The first layer's salient rows: those whose token the last iteration set
            # (every row under tau >= 1, which makes every row salient).
            self.rows["kv"] = ~self.rows["dy_sparse"] | features["fresh"] | (self.rows["tau"] >= 1)
            approximate = [s.method == "dyllm" and s.sparse
                           and s.params.dyllm_attention == "approximate" for s in skips]
            # Rows with exact attention in every layer; the others only where salient.
            self.rows["exact"] = ~per_row(approximate)
            self.approximates = any(approximate)
        if self.es_layers:
            self.rows["alpha"] = per_row([s.params.es_alpha for s in skips])
        # Query rows, rows with exact attention and FFN rows per layer, summed over the
        # batch (for reports).
        self.rows_per_layer: list[int] = []
        self.attention_rows_per_layer: list[int] = []
        self.ffn_rows_per_layer: list[int] = []

    @property
    def positions(self) -> torch.Tensor:
        return self.rows["positions"]

    @property
    def request(self) -> torch.Tensor:
        return self.rows["request"]

    def before(self, layer: int) -> "_SalientRows | None":
        self.rows_per_layer.append(len(self.positions))
        if not self.uses_dyllm:
            self.attention_rows_per_layer.append(len(self.positions))
            self.ffn_rows_per_layer.append(len(self.positions))
            return None
        sparse = _SalientRows(self, layer)
        delta = self._delta_rows(sparse) if self.approximates else None
        if delta is None:
            self.attention_rows_per_layer.append(len(self.positions))
        self.metadata[self.layer_names[layer]] = replace(
            self.row_set, slot_mapping=self.rows["slots"][sparse.kv_rows], delta=delta)
        return sparse

    def _delta_rows(self, sparse: "_SalientRows") -> DeltaRows:
        """DyLLM's approximate attention for the layer `sparse`: exact for the rows that
        refresh K/V (and those of requests that approximate nothing), the cached
        context plus the values' change for the others."""
        rows = self.rows
        exact = rows["exact"] | rows["kv"]
        per_request = torch.zeros(2, len(self.counts), device=self.device).index_add_(
            1, rows["request"], torch.stack([rows["kv"], exact]).float()).tolist()
        self.attention_rows_per_layer.append(int(sum(per_request[1])))
        return DeltaRows(positions=self.positions, refreshed=sparse.kv_rows, exact=exact,
                         context=sparse.cached_context, max_refreshed=int(max(per_request[0])),
                         max_exact=int(max(per_request[1])))

    def after(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer in self.es_layers:
            x = self._es_after(layer, x)
        return x

    def _es_after(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Score the rows at the end of layer `i`, keep the best ones of every request
        whose count drops here, and cache the kept rows' hidden states."""
        rows, counts = self.rows, self.counts
        b, n, width = len(counts), len(x), max(counts)
        keep_n = [s.es_counts.get(i, c) if s.method == "es" and s.sparse else c
                  for s, c in zip(self.skips, counts)]
        request = rows["request"]
        offset = torch.arange(n, device=self.device) - row_offsets(counts)[:-1].to(self.device)[request]
        cache = self.caches.get("hidden", i, x.shape[-1])
        slots = rows["slots"]
        if keep_n != counts:
            def padded(values: torch.Tensor, fill=0) -> torch.Tensor:
                out = values.new_full((b, width, *values.shape[1:]), fill)
                out[request, offset] = values
                return out

            valid = padded(torch.ones(n, dtype=torch.bool, device=self.device), False)
            alpha = torch.zeros(b, device=self.device).index_put_((request,), rows["alpha"])
            score = es.importance(padded(x), padded(cache[slots]), padded(rows["last_conf"]),
                                  padded(rows["leftmost"], False), padded(rows["fresh"], False),
                                  valid, alpha)
            keep = es.keep_mask(score, torch.tensor(keep_n, device=self.device))
            row_id = padded(torch.arange(n, device=self.device))
            order = torch.argsort((~keep).flatten().to(torch.uint8), stable=True)
            kept = row_id.flatten()[order[: sum(keep_n)]]
            self.rows = {name: t[kept] for name, t in rows.items()}
            self.counts = keep_n
            x = x[kept]
            self.row_set = rows_metadata(torch.tensor(keep_n), self.seq_lens,
                                         self.row_set.block_table, self.rows["slots"],
                                         self.device)
            for name in self.layer_names[i + 1:]:
                self.metadata[name] = self.row_set
        cache[self.rows["slots"]] = x
        return x

    def logit_rows(self, block_start: torch.Tensor, block_length: torch.Tensor,
                   is_mask: torch.Tensor, masked: list[int], offset: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Output rows predicting each request's masked block positions, in column order.

        Output row p predicts position p + `offset`. `block_start` (absolute),
        `block_length` [B] and `is_mask` [N_last] (whether the position an output row
        predicts is a mask) are on the device; `masked` [B] counts each request's masked block
        columns (host). A request gets min(masked, output rows) logits rows; those
        its skipped positions leave empty are placeholders (`valid` False). Returns
        (rows, columns, valid) on the device and the requests of the logits rows (host).
        """
        counts = self.counts
        slots_per = [min(m, c) for m, c in zip(masked, counts)]
        total = sum(slots_per)
        request, positions = self.request, self.positions
        column = positions + offset - block_start[request]
        candidate = is_mask & (column >= 0) & (column < block_length[request])
        b, n = len(counts), len(positions)
        first = row_offsets(slots_per)[:-1].to(self.device)
        rank = torch.cumsum(candidate.long(), 0) - 1
        before = torch.cat([rank.new_zeros(1), torch.cumsum(candidate.long(), 0)])
        rank = rank - before[row_offsets(counts)[:-1].to(self.device)][request]
        target = torch.where(candidate, first[request] + rank, torch.full_like(rank, total))
        out_rows = torch.zeros(total + 1, dtype=torch.long, device=self.device)
        out_rows.index_put_((target,), torch.arange(n, device=self.device))
        out_col = torch.zeros(total + 1, dtype=torch.long, device=self.device)
        out_col.index_put_((target,), column)
        valid = torch.zeros(total + 1, dtype=torch.bool, device=self.device)
        valid.index_put_((target,), candidate)
        logit_request = torch.repeat_interleave(torch.arange(b), torch.tensor(slots_per))
        return out_rows[:total], out_col[:total], valid[:total], logit_request


class _SalientRows:
    """One DyLLM layer of a pass (`decoder.SparseRows`): K/V for the rows salient after
    the layer before, FFN for the rows whose attention context moved."""

    def __init__(self, rows: PassRows, layer: int):
        self.pass_rows = rows
        self.layer = layer
        self.kv_rows = rows.rows["kv"].nonzero().squeeze(1)
        self.context_cache = rows.caches.get("context", layer, rows.context_width)
        # The rows' contexts as the pass found them: what the approximate attention
        # starts from and the similarity test compares with.
        self.cached_context = self.context_cache[rows.rows["slots"]]

    def ffn(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pass_rows
        rows, slots = p.rows, p.rows["slots"]
        reduce = (tensor_model_parallel_all_reduce
                  if get_tensor_model_parallel_world_size() > 1 else None)
        salient = torch.where(rows["dy_sparse"],
                              dyllm.salient(context, self.cached_context, rows["tau"], reduce),
                              True)
        # Rows of requests that do not use DyLLM write the caches too: only a sparse
        # DyLLM pass reads them, and a request's first pass, full, overwrites its slots.
        self.context_cache[slots] = context
        rows["kv"] = salient
        index = salient.nonzero().squeeze(1)
        p.ffn_rows_per_layer.append(len(index))
        self.ffn_cache = p.caches.get("ffn", self.layer, p.ffn_width)
        return index, self.ffn_cache[slots]

    def computed(self, rows: torch.Tensor, out: torch.Tensor) -> None:
        self.ffn_cache[self.pass_rows.rows["slots"][rows]] = out
