"""vLLM's token filters on a dLLM's masked positions: `logit_bias`, `allowed_token_ids`,
`bad_words` and `min_tokens`, batched.

Every masked position's logits row is filtered before tokens are chosen and
scored, so a filter changes both the prediction and its confidence:

* `allowed_token_ids`: every other token gets -inf.
* `bad_words` (token-id sequences): token w[j] of a bad word w gets -inf at canvas
  position p when the other positions of the occurrence it would complete,
  p - j + i for every i != j, lie in the canvas and hold w[i] committed; a
  one-token word gets -inf everywhere. Tokens committed by the same iteration can
  still complete a word together, none of them having seen the others:
  `break_bad_words` then takes back the rightmost newly committed position of each
  such occurrence, which the rule above bans at the next iteration. Each such
  occurrence holds at least two new commits, so the iteration's leftmost commit
  always stays and a block still progresses.
* `min_tokens` n: the request's end tokens get -inf at canvas positions < n.
* `logit_bias`: added to the logits (float32, as vLLM adds it).

-inf absorbs any bias, so the order of the filters does not matter. Per request
the filters are short lists of token ids; `TokenFilterBatch` packs those of a
batch composition into flat device tensors once, `layout` expands them to an
iteration's logits rows (host arithmetic on the host's layout, copied to the
device) and `apply` writes them with one gather and fill for `allowed_token_ids`
and one accumulating `index_put_` for the rest: no host synchronisation.
"""

from dataclasses import dataclass, field

import torch

# A canvas cell that holds no committed token, in the windows bad words are matched on.
NOT_COMMITTED = -1


@dataclass(frozen=True)
class TokenFilters:
    """One request's filters, as token ids (`allowed_token_ids` empty: every token;
    `end_ids`: the tokens `min_tokens` keeps out)."""

    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] = field(default_factory=list)
    bad_words: list[list[int]] = field(default_factory=list)
    min_tokens: int = 0
    end_ids: list[int] = field(default_factory=list)

    @property
    def in_use(self) -> bool:
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words
                    or (self.min_tokens and self.end_ids))


class _Runs:
    """Per request b of a composition, a run of entries: `counts[b]` (host) entries
    starting at `starts[b]` of the flat device tensors in `data`."""

    def __init__(self, per_request: list[list[tuple]], dtypes: tuple[torch.dtype, ...],
                 device: torch.device):
        self.counts = torch.tensor([len(e) for e in per_request], dtype=torch.long)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        flat = [entry for entries in per_request for entry in entries]
        self.used = bool(flat)
        self.data = tuple(torch.tensor([e[i] for e in flat], dtype=dtype).to(device)
                          for i, dtype in enumerate(dtypes))

    def expand(self, logit_request: torch.Tensor, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits row, entry) pairs: every entry of each logits row's request."""
        per_row = self.counts[logit_request]
        rows = torch.repeat_interleave(torch.arange(len(logit_request)), per_row)
        first = self.starts[logit_request] - (torch.cumsum(per_row, 0) - per_row)
        entries = torch.arange(int(per_row.sum())) + first.repeat_interleave(per_row)
        return (rows.to(device, non_blocking=True), entries.to(device, non_blocking=True))


class TokenFilterBatch:
    """The filters of one batch composition (requests in batch order), packed.

    Bad words are rows of `words` [W, span + 1], right-aligned and padded on the
    left with NOT_COMMITTED; `word_request` [W] is each word's request. An entry of
    `slots` is one (word, slot) pair: the token a logits row may have to ban.
    """

    def __init__(self, filters: list[TokenFilters], device: torch.device):
        self.device = device
        self.bias = _Runs([list(f.logit_bias.items()) for f in filters],
                          (torch.long, torch.float32), device)
        self.allowed = _Runs([[(t,) for t in f.allowed_token_ids] for f in filters],
                             (torch.long,), device)
        self.ends = _Runs([[(t,) for t in f.end_ids] if f.min_tokens else [] for f in filters],
                          (torch.long,), device)
        self.min_tokens = torch.tensor([f.min_tokens for f in filters]).to(device)
        words = [(b, w) for b, f in enumerate(filters) for w in f.bad_words]
        self.span = max((len(w) for _, w in words), default=1) - 1
        self.words = torch.tensor([[NOT_COMMITTED] * (self.span + 1 - len(w)) + list(w)
                                   for _, w in words], dtype=torch.long).reshape(
            len(words), self.span + 1).to(device)
        self.word_request = torch.tensor([b for b, _ in words], dtype=torch.long).to(device)
        slots: list[list[tuple]] = [[] for _ in filters]
        for i, (b, w) in enumerate(words):
            slots[b] += [(i, self.span + 1 - len(w) + j) for j in range(len(w))]
        self.slots = _Runs(slots, (torch.long, torch.long), device)

    @property
    def has_words(self) -> bool:
        return self.slots.used

    def layout(self, logit_request: torch.Tensor) -> "TokenFilterPlan":
        """The iteration's expansion, from the host's `logit_request` [M]."""
        expanded = {name: getattr(self, name).expand(logit_request, self.device)
                    for name in ("bias", "allowed", "ends", "slots") if getattr(self, name).used}
        restricted = None
        if self.allowed.used:
            rows = torch.nonzero(self.allowed.counts[logit_request] > 0).flatten()
            restricted = rows.to(self.device, non_blocking=True)
        return TokenFilterPlan(self, expanded, restricted)


@dataclass(frozen=True)
class TokenFilterPlan:
    """One iteration's filters: for each kind in use, (logits row, entry) pairs, and
    the logits rows whose request restricts them to `allowed_token_ids`."""

    batch: TokenFilterBatch
    expanded: dict[str, tuple[torch.Tensor, torch.Tensor]]
    restricted: torch.Tensor | None

    def apply(self, logits: torch.Tensor, request: torch.Tensor, column: torch.Tensor,
              position: torch.Tensor, context: torch.Tensor | None) -> None:
        """Filter `logits` [M, V] (float32) in place. Logits row i belongs to request
        `request[i]` at block column `column[i]`, canvas position `position[i]`;
        `context` is `word_context` of the block before this iteration's commits
        (needed when the batch has bad words)."""
        f, inf = self.batch, float("-inf")
        rows, tokens, values = [], [], []
        if "allowed" in self.expanded:
            at, entries = self.expanded["allowed"]
            allowed = f.allowed.data[0][entries]
            # Keep, fill, restore: no [M, V] mask for a handful of allowed ids.
            kept = logits[at, allowed]
            logits.index_fill_(0, self.restricted, inf)
            logits.index_put_((at, allowed), kept)
        if "bias" in self.expanded:
            at, entries = self.expanded["bias"]
            rows.append(at)
            tokens.append(f.bias.data[0][entries])
            values.append(f.bias.data[1][entries])
        if "ends" in self.expanded:
            at, entries = self.expanded["ends"]
            early = position[at] < f.min_tokens[request[at]]
            rows.append(at)
            tokens.append(f.ends.data[0][entries])
            values.append(torch.zeros_like(early, dtype=torch.float32).masked_fill(early, inf))
        if "slots" in self.expanded:
            at, entries = self.expanded["slots"]
            word, slot = (d[entries] for d in f.slots.data)
            spelled = f.words[word]
            # The occurrence that has this token at `slot` ends `span - slot` columns on.
            end = column[at] + f.span - slot
            held = _windows(context[request[at]], end[:, None], f.span).squeeze(1)
            others = torch.arange(f.span + 1, device=logits.device) != slot[:, None]
            complete = ((spelled == NOT_COMMITTED) | ~others | (held == spelled)).all(-1)
            rows.append(at)
            tokens.append(spelled.gather(1, slot[:, None]).squeeze(1))
            values.append(torch.zeros_like(complete, dtype=torch.float32)
                          .masked_fill(complete, inf))
        if rows:
            logits.index_put_((torch.cat(rows), torch.cat(tokens)),
                              torch.cat(values).to(logits.dtype), accumulate=True)

    def break_bad_words(self, context: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """[B, k] bool: the newly committed block columns to take back. `context` is
        `word_context` of the blocks with this iteration's commits, `new` [B, k] marks
        those commits. Occurrences end inside the block: the masks after it hold none."""
        f = self.batch
        b, k = new.shape
        last = torch.arange(k, device=new.device).expand(len(f.words), k)
        spelled = f.words[:, None, :]
        held = _windows(context[f.word_request], last, f.span)
        padded = torch.zeros((b, k + 2 * f.span), dtype=torch.bool, device=new.device)
        padded[:, f.span : f.span + k] = new
        fresh = _windows(padded[f.word_request], last, f.span)
        fresh &= spelled != NOT_COMMITTED
        hit = ((spelled == NOT_COMMITTED) | (held == spelled)).all(-1) & fresh.any(-1)
        # The rightmost fresh slot j sits span - j columns before the occurrence's end.
        back = last - fresh.flip(-1).int().argmax(-1)
        out = torch.zeros((b, k + 1), dtype=torch.bool, device=new.device)
        request = f.word_request[:, None].expand_as(hit)
        return out.index_put_((request, torch.where(hit, back, k)),
                              torch.ones_like(hit))[:, :k]


def word_context(before: torch.Tensor, block: torch.Tensor, span: int) -> torch.Tensor:
    """The committed canvas bad words are matched on, per request [B, 2 span + k]:
    `before` [B, span] the positions before the block, `block` [B, k] the block
    (NOT_COMMITTED where a cell holds no committed token), then `span` cells for
    the masks after it. Column c + span is block column c."""
    after = torch.full((block.shape[0], span), NOT_COMMITTED, dtype=block.dtype,
                       device=block.device)
    return torch.cat([before, block, after], dim=1)


def _windows(context: torch.Tensor, end: torch.Tensor, span: int) -> torch.Tensor:
    """[N, E, span + 1]: for each of `end` [N, E] (block columns where an occurrence
    ends), the cells of `context` [N, C] it covers, context columns end .. end + span."""
    columns = end[..., None] + torch.arange(span + 1, device=end.device)
    return context[:, None, :].expand(*end.shape, context.shape[-1]).gather(-1, columns)
