"""Reference ES-dLLM (arXiv:2603.10088) and DyLLM (arXiv:2603.08026) forwards of one
request.

Written from the methods as their papers and released code describe them, with
per-row loops where that reads plainest, on the layer parts every reference model
has (`embed`, `project`, `attention_output`, `ffn`, `head`: `ReferenceLLaDA` and
`ReferenceDream`); `RequestSkipping` holds one request's state across its forwards
and is what `generate.generate(..., skip=...)` and `dream.diffusion_generate(...,
skip=...)` drive. The conventions the plugin follows too:

* Both methods work on the cache mode's window (the positions the first layer
  computes) and skip nothing in a full iteration: a cache refresh (the first
  iteration, and every block start under prefix/dual), every
  `es_block_update_freq`-th iteration for ES, the first `dyllm_full_steps` for
  DyLLM. A full iteration fills the method's caches for every window row.
* A model whose logits row p predicts position p + `logits_offset` (Dream: 1)
  has its windows start that many rows earlier: from the row predicting the
  block's first position under prefix/dual (and ES's prompt re-encoding starts
  at 0 as for LLaDA), from the row predicting the canvas's first position under
  DyLLM's canvas-only queries.
* ES: after each layer l where the keep fraction p_l drops (p_l = the last keep
  value whose depth * n_layers <= l), a sparse iteration keeps the
  max(int(p_l * W), min(last commits + 2, block_length)) best rows (W the window,
  at most the rows the layer had) by ES-dLLM's importance score (its default
  `HiddenState` mode), ties to the lower position; the kept rows' hidden states
  at that layer are cached. Rows dropped get no logits. A row is scored by what
  it predicts and by its own token: its confidence (and the top-2 bonus) is the
  last top-1 probability of the position it predicts (0 once that is committed,
  and 0 for a row predicting past the sequence), the +5 goes to the row
  predicting the block's leftmost mask, and the +3 to rows whose own token the
  previous iteration committed (ES-dLLM's reason: their K/V must be refreshed);
  with offset 0 these are one row.
* DyLLM: layer 0 refreshes K/V only for the positions the previous iteration
  committed; every row is a query; the rows whose K/V the layer refreshes get
  exact attention, the others their cached context plus softmax(q Kᵀ) · ΔV (ΔV:
  the change of the refreshed values), or, with `dyllm_attention="exact"`, exact
  attention too; rows whose context has cosine similarity < tau to their cached one (tau >= 1:
  all rows, layer 0's too) run the FFN and refresh K/V in the next layer; the others add their
  cached FFN output. Under cache `none` a sparse iteration queries the canvas
  only, unless its 1-based step is a multiple of `dyllm_query_period` or within
  the first period.
"""

import inspect
import math

import torch
import torch.nn.functional as F


def es_layer_fractions(keep: list[float], depth: list[float], n_layers: int) -> list[float]:
    fractions = []
    for layer in range(n_layers):
        chosen = 1.0
        for p, s in zip(keep, depth):
            if layer >= s * n_layers:
                chosen = p
        fractions.append(chosen)
    return fractions


def es_drop_layers(fractions: list[float]) -> list[int]:
    return [l for l in range(1, len(fractions)) if fractions[l] < fractions[l - 1]]


def _attention(model, i: int, x: torch.Tensor, rows: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], write: torch.Tensor,
               cached: torch.Tensor | None = None):
    """q for `rows`, K/V written at the positions in `write` (a subset of `rows`);
    returns the attention context [len(rows), d] over the whole cached sequence.

    With `cached` (contexts [sequence, d] by position), DyLLM's approximate attention
    (its `attention_sparse_varlen`): a row outside `write` keeps its cached context
    plus softmax(q Kᵀ / √d) · ΔV, where ΔV is what this call changed in V (zero at
    every position not written); rows in `write` get exact attention."""
    q, k_new, v_new = model.project(i, x, rows)
    k, v = kv[i]
    written = set(write.tolist())
    j = torch.tensor([j for j, pos in enumerate(rows.tolist()) if pos in written],
                     dtype=torch.long)
    delta = torch.zeros_like(v)
    delta[:, rows[j]] = v_new[:, j] - v[:, rows[j]]
    k[:, rows[j]], v[:, rows[j]] = k_new[:, j], v_new[:, j]
    if model.n_kv_heads != model.n_heads:
        rep = model.n_heads // model.n_kv_heads
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        delta = delta.repeat_interleave(rep, 0)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    a = a.transpose(0, 1).reshape(len(rows), -1)
    if cached is None:
        return a
    for r, pos in enumerate(rows.tolist()):
        if pos not in written:
            scores = torch.einsum("hd,hld->hl", q[:, r], k) * model.head_dim**-0.5
            weights = torch.softmax(scores, dim=-1)
            change = torch.einsum("hl,hld->hd", weights, delta).reshape(-1)
            a[r] = cached[pos] + change
    return a


def es_forward(model, tokens: torch.Tensor, window: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], hidden: dict[int, torch.Tensor],
               *, fractions: list[float], sparse: bool, alpha: float, last_conf: torch.Tensor,
               fresh: torch.Tensor, leftmost: int, last_commits: int, block_length: int,
               logits_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One ES pass over `window`; updates `kv` and `hidden` in place. Returns the
    positions that reached the last layer and their last hidden states. `last_conf`
    is indexed by the position a row predicts (one entry past the sequence), `fresh`
    by its own."""
    rows = window.clone()
    x = model.embed(tokens[rows])
    drops = es_drop_layers(fractions)
    size = len(window)
    for i in range(model.n_layers):
        x = x + model.attention_output(i, _attention(model, i, x, rows, kv, rows))
        x = x + model.ffn(i, x)
        if i not in drops:
            continue
        cache = hidden.setdefault(i, torch.zeros(len(tokens), x.shape[-1]))
        if sparse:
            count = max(int(fractions[i] * size), min(last_commits + 2, block_length))
            count = max(1, min(count, len(rows)))
            if count < len(rows):
                scores = []
                changes = []
                for j, pos in enumerate(rows.tolist()):
                    prev = cache[pos]
                    rms = prev.norm() / math.sqrt(len(prev))
                    changes.append(float((x[j] - prev).abs().mean() / (rms + 1e-6)))
                top = max(max(changes), 1.0)
                confs = [float(last_conf[pos + logits_offset]) for pos in rows.tolist()]
                best_two = sorted(range(len(rows)), key=lambda j: (-confs[j], j))[:2]
                for j, pos in enumerate(rows.tolist()):
                    score = alpha * confs[j] + (1 - alpha) * changes[j] / top
                    if alpha > 0 and j in best_two:
                        score += 2.0
                    if pos + logits_offset == leftmost:
                        score += 5.0
                    if alpha < 1 and bool(fresh[pos]):
                        score += 3.0
                    scores.append(score)
                order = sorted(range(len(rows)), key=lambda j: (-scores[j], j))[:count]
                keep = torch.tensor(sorted(order))
                rows, x = rows[keep], x[keep]
        cache[rows] = x
    return rows, x


def dyllm_forward(model, tokens: torch.Tensor, window: torch.Tensor,
                  kv: list[tuple[torch.Tensor, torch.Tensor]],
                  contexts: dict[int, torch.Tensor], ffns: dict[int, torch.Tensor],
                  *, sparse: bool, tau: float, fresh: torch.Tensor, approximate: bool
                  ) -> torch.Tensor:
    """One DyLLM pass over `window`; updates `kv`, `contexts`, `ffns`. Returns the
    last hidden states of every window row."""
    rows = window
    x = model.embed(tokens[rows])
    salient = [not sparse or tau >= 1 or bool(fresh[pos]) for pos in rows.tolist()]
    width = model.n_heads * model.head_dim
    for i in range(model.n_layers):
        write = torch.tensor([pos for pos, s in zip(rows.tolist(), salient) if s],
                             dtype=torch.long)
        c_cache = contexts.setdefault(i, torch.zeros(len(tokens), width))
        context = _attention(model, i, x, rows, kv, write,
                             c_cache if sparse and approximate else None)
        m_cache = ffns.setdefault(i, torch.zeros(len(tokens), x.shape[-1]))
        if sparse:
            salient = []
            for j, pos in enumerate(rows.tolist()):
                cos = float(F.cosine_similarity(context[j], c_cache[pos], dim=0, eps=1e-12))
                salient.append(tau >= 1 or cos < tau)
        else:
            salient = [True] * len(rows)
        c_cache[rows] = context
        x = x + model.attention_output(i, context)
        for j, pos in enumerate(rows.tolist()):
            if salient[j]:
                m_cache[pos] = model.ffn(i, x[j : j + 1])[0]
        x = x + m_cache[rows]
    return x


class RequestSkipping:
    """One request's token skipping across its forwards: each iteration's window,
    the methods' caches (K/V of every layer, ES's hidden states, DyLLM's contexts
    and FFN outputs) and what ES scores rows by (`last_conf`, `fresh`)."""

    def __init__(self, model, prompt_len: int, length: int, *, skip: str, cache: str,
                 mask_id: int, block_length: int, logits_offset: int, refresh_period: int,
                 es_keep: tuple[float, ...] = (1.0, 0.5, 0.25),
                 es_depth: tuple[float, ...] = (0.0, 0.125, 0.25), es_alpha: float = 0.5,
                 es_block_update_freq: int = 16, dyllm_threshold: float = 0.99,
                 dyllm_full_steps: int = 4, dyllm_query_period: int = 4,
                 dyllm_attention: str = "approximate"):
        assert skip in ("es", "dyllm"), skip
        self.model, self.skip, self.cache, self.mask_id = model, skip, cache, mask_id
        self.prompt_len, self.length, self.block_length = prompt_len, length, block_length
        self.offset = logits_offset
        self.es_alpha = es_alpha
        self.es_block_update_freq, self.refresh_period = es_block_update_freq, refresh_period
        self.dyllm_threshold, self.dyllm_full_steps = dyllm_threshold, dyllm_full_steps
        self.dyllm_query_period = dyllm_query_period
        self.dyllm_attention = dyllm_attention
        self.fractions = es_layer_fractions(list(es_keep), list(es_depth), model.n_layers)
        self.kv = [(torch.zeros(model.n_kv_heads, length, model.head_dim),
                    torch.zeros(model.n_kv_heads, length, model.head_dim))
                   for _ in range(model.n_layers)]
        self.hidden: dict[int, torch.Tensor] = {}
        self.contexts: dict[int, torch.Tensor] = {}
        self.ffns: dict[int, torch.Tensor] = {}
        # By predicted position; the last row of the sequence predicts one past it.
        self.last_conf = torch.zeros(length + logits_offset)
        self.fresh = torch.zeros(length, dtype=torch.bool)

    def forward(self, x: torch.Tensor, *, iteration: int, step_in_block: int, start: int,
                last_commits: int) -> tuple[torch.Tensor, set[int]]:
        """Iteration `iteration` (the request's forwards before it), step `step_in_block`
        of the block starting at absolute `start`. Returns the logits predicting the
        block's columns [block_length, V] and the masked columns that have them (the
        rows that reached the last layer); the head runs on those rows only, since
        over Dream's 151k vocabulary it is most of a forward's cost, and the other
        rows stay 0."""
        period = self.refresh_period
        if self.cache == "none":
            refresh = iteration == 0
        elif period:
            refresh = iteration % period == 0
        else:
            refresh = step_in_block == 0
        if self.cache == "none" or iteration == 0 or (refresh and not period):
            lo, hi = 0, self.length
        else:
            hi = self.length if self.cache == "prefix" else start + self.block_length
            if refresh:
                lo = 0
            else:
                # The previous iteration's commits (ES-dLLM's schedule: maybe in the
                # block before) need their K/V recomputed.
                committed = self.fresh.nonzero().flatten().tolist()
                lo = max(0, min([start - self.offset] + committed[:1]))
        if self.skip == "es":
            full = refresh or bool(self.es_block_update_freq
                                   and iteration % self.es_block_update_freq == 0)
        else:
            full = refresh or iteration < self.dyllm_full_steps
            # DyLLM's `prepare_sparse`: the canvas only, except at 1-based steps that
            # are multiples of the period, and during the first period.
            step, period = iteration + 1, self.dyllm_query_period
            if not full and self.cache == "none" and step > period and step % period:
                lo = max(0, self.prompt_len - self.offset)
        window = torch.arange(lo, hi)
        if self.skip == "es":
            masks = [p for p in range(start, start + self.block_length)
                     if int(x[p]) == self.mask_id]
            out_rows, out = es_forward(
                self.model, x, window, self.kv, self.hidden, fractions=self.fractions,
                sparse=not full, alpha=self.es_alpha, last_conf=self.last_conf,
                fresh=self.fresh, leftmost=masks[0] if masks else -1,
                last_commits=last_commits, block_length=self.block_length,
                logits_offset=self.offset)
        else:
            out_rows = window
            out = dyllm_forward(self.model, x, window, self.kv, self.contexts, self.ffns,
                                sparse=not full, tau=self.dyllm_threshold, fresh=self.fresh,
                                approximate=self.dyllm_attention == "approximate")
        column = out_rows + self.offset - start
        inside = (column >= 0) & (column < self.block_length)
        needed = inside & (x[(out_rows + self.offset).clamp(max=self.length - 1)]
                           == self.mask_id)
        head = self.model.head(out[needed]).float()
        rows = torch.zeros(self.block_length, head.shape[-1])
        rows[column[needed]] = head
        return rows, set(column[needed].tolist())

    def record(self, start: int, top: dict[int, float], committed: list[int]) -> None:
        """After an iteration: `top` the top-1 probability of each block column that had
        logits and was a mask, `committed` the columns it committed."""
        for column, value in top.items():
            self.last_conf[start + column] = value
        self.fresh[:] = False
        for column in committed:
            self.fresh[start + column] = True
            self.last_conf[start + column] = 0.0


def request_skipping(model, prompt_len: int, length: int, *, skip: str, **settings
                     ) -> RequestSkipping | None:
    """A request's `RequestSkipping`, or None under `skip="none"`; either way a setting
    that `RequestSkipping` does not take is an error."""
    unknown = set(settings) - set(inspect.signature(RequestSkipping).parameters)
    if unknown:
        raise TypeError(f"unknown skipping settings {sorted(unknown)}")
    if skip == "none":
        return None
    return RequestSkipping(model, prompt_len, length, skip=skip, **settings)
