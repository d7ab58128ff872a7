"""The row controller of a forward pass: which rows each layer computes.

The runner lays out each request's window (the cache mode's positions) for the
first layer; this controller then drives the model's layers over them and,
between and inside layers, applies each request's token skipping:

* `none` (and every refresh iteration): all rows through every layer, which is
  the plain layer loop;
* `es` (ES-dLLM): after each layer where the request's keep fraction drops, its
  rows are scored (`skipping.es.importance`) and only the best go on; the others
  keep their stale K/V in the pages and get no logits this iteration;
* `dyllm` (DyLLM): every row stays a query, but only salient rows write K/V and
  run the FFN; the rest reuse their cached attention-context and FFN output
  (`skipping.dyllm.salient`).

All requests of the pass share one attention call per layer: the controller
rewrites the one `BidirectionalMetadata` object that every layer's name points
to (rows, slots, query starts) when the rows change. Row counts of ES are known
on the host before the pass (so are query starts); DyLLM's FFN rows are counted
once per layer (its K/V rows and FFN rows), its only read-backs.

Per-token caches (hidden states for ES; contexts and FFN outputs for DyLLM) are
indexed by KV-cache slot, so a request owns exactly the cache rows of its pages:
vLLM's block manager allocates and frees them with the pages, and a preempted
request, which resumes on new pages, rebuilds them in its first (full) pass.
"""

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)

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

    `counts` [B] are the first layer's rows per request (host); `positions`,
    `slots` [N] and the row features (`last_conf`, `fresh`, `leftmost` [N], read
    from the decoding state before the pass) are on the device.
    """

    def __init__(self, metadata, counts: list[int], positions: torch.Tensor,
                 slots: torch.Tensor, skips: list[RequestSkip], caches: SlotCaches,
                 last_conf: torch.Tensor, fresh: torch.Tensor, leftmost: torch.Tensor):
        self.metadata = metadata
        self.counts = list(counts)
        self.skips = skips
        self.caches = caches
        device = positions.device
        self.device = device
        n = len(positions)
        request = torch.repeat_interleave(
            torch.arange(len(counts), device=device),
            torch.tensor(counts, device=device), output_size=n)
        self.es_layers = sorted({i for s in skips if s.method == "es" for i in s.es_layers})
        self.uses_dyllm = any(s.method == "dyllm" for s in skips)

        def per_row(values: list) -> torch.Tensor:
            return torch.tensor(values, device=device)[request]

        self.rows: dict[str, torch.Tensor] = {
            "positions": positions, "slots": slots, "request": request,
            "last_conf": last_conf, "fresh": fresh, "leftmost": leftmost,
        }
        if self.uses_dyllm:
            self.rows["dy_sparse"] = per_row([s.method == "dyllm" and s.sparse for s in skips])
            self.rows["tau"] = per_row([s.params.dyllm_threshold for s in skips])
            # The first layer's salient rows: those whose token the last iteration set.
            self.rows["kv"] = ~self.rows["dy_sparse"] | fresh
        if self.es_layers:
            self.rows["alpha"] = per_row([s.params.es_alpha for s in skips])
        # Query rows and FFN rows per layer, summed over the batch (for reports).
        self.rows_per_layer: list[int] = []
        self.ffn_rows_per_layer: list[int] = []

    @property
    def positions(self) -> torch.Tensor:
        return self.rows["positions"]

    @property
    def request(self) -> torch.Tensor:
        return self.rows["request"]

    def run(self, layers: nn.ModuleList, x: torch.Tensor, positions: torch.Tensor
            ) -> torch.Tensor:
        for i, layer in enumerate(layers):
            self.rows_per_layer.append(len(x))
            positions = self.positions
            if self.uses_dyllm:
                x = self._dyllm_layer(i, layer, x, positions)
            else:
                x = layer(positions, x)
                self.ffn_rows_per_layer.append(len(x))
            if i in self.es_layers:
                x = self._es_after(i, x)
        return x

    def _set_rows(self, slots: torch.Tensor) -> None:
        m = self.metadata
        counts = torch.tensor(self.counts)
        starts = torch.zeros(len(counts) + 1, dtype=torch.int32)
        torch.cumsum(counts, 0, out=starts[1:])
        m.num_actual_tokens = int(starts[-1])
        m.query_start_loc = starts.to(self.device, non_blocking=True)
        m.max_query_len = max(self.counts) if self.counts else 0
        m.slot_mapping = slots

    def _dyllm_layer(self, i: int, layer: nn.Module, x: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        slots, dy_sparse = rows["slots"], rows["dy_sparse"]
        attn = layer.self_attn
        # Only salient rows refresh their K/V; the others keep what the pages hold.
        kv_index = rows["kv"].nonzero().squeeze(1)
        # Every row is a query; K/V are projected for the salient rows only.
        q, k, v = attn.project(positions, layer.input_layernorm(x), kv_index)
        self.metadata.slot_mapping = slots[kv_index]
        self.metadata.num_kv_tokens = len(kv_index)
        context = attn.attn(q, k, v)
        cached = self.caches.get("context", i, context.shape[-1])
        reduce = (tensor_model_parallel_all_reduce
                  if get_tensor_model_parallel_world_size() > 1 else None)
        salient = torch.where(dy_sparse, dyllm.salient(context, cached[slots], rows["tau"], reduce),
                              True)
        # Rows of requests that do not use DyLLM write the caches too: only a sparse
        # DyLLM pass reads them, and a request's first pass, full, overwrites its slots.
        cached[slots] = context
        out, _ = attn.o_proj(context)
        x = x + out
        # Non-salient rows (sparse DyLLM rows only) add their cached FFN output.
        ffn_cache = self.caches.get("ffn", i, x.shape[-1])
        ffn = ffn_cache[slots]
        # The pass's one read-back per layer: how many rows run the FFN.
        index = salient.nonzero().squeeze(1)
        self.ffn_rows_per_layer.append(len(index))
        if len(index):
            computed = layer.mlp(layer.post_attention_layernorm(x[index]))
            ffn[index] = computed
            ffn_cache[slots[index]] = computed
        rows["kv"] = salient
        self.metadata.slot_mapping = slots
        self.metadata.num_kv_tokens = None
        return x + ffn

    def _es_after(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Score the rows at the end of layer `i`, keep the best ones of every request
        whose count drops here, and cache the kept rows' hidden states."""
        rows, counts = self.rows, self.counts
        b, n, width = len(counts), len(x), max(counts)
        keep_n = [s.es_counts.get(i, c) if s.method == "es" and s.sparse else c
                  for s, c in zip(self.skips, counts)]
        request = rows["request"]
        starts = torch.zeros(b, dtype=torch.long)
        torch.cumsum(torch.tensor(counts[:-1]), 0, out=starts[1:])
        offset = torch.arange(n, device=self.device) - starts.to(self.device)[request]
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
            self._set_rows(self.rows["slots"])
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
        starts = torch.zeros(b, dtype=torch.long)
        torch.cumsum(torch.tensor(counts[:-1]), 0, out=starts[1:])
        first = torch.zeros(b, dtype=torch.long)
        torch.cumsum(torch.tensor(slots_per[:-1]), 0, out=first[1:])
        rank = torch.cumsum(candidate.long(), 0) - 1
        before = torch.cat([rank.new_zeros(1), torch.cumsum(candidate.long(), 0)])
        rank = rank - before[starts.to(self.device)][request]
        target = torch.where(candidate, first.to(self.device)[request] + rank,
                             torch.full_like(rank, total))
        out_rows = torch.zeros(total + 1, dtype=torch.long, device=self.device)
        out_rows.index_put_((target,), torch.arange(n, device=self.device))
        out_col = torch.zeros(total + 1, dtype=torch.long, device=self.device)
        out_col.index_put_((target,), column)
        valid = torch.zeros(total + 1, dtype=torch.bool, device=self.device)
        valid.index_put_((target,), candidate)
        logit_request = torch.repeat_interleave(torch.arange(b), torch.tensor(slots_per))
        return out_rows[:total], out_col[:total], valid[:total], logit_request
