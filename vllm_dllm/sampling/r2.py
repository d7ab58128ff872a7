"""R²-dLLM's extra commit rules (arXiv:2604.18995; GATECH-EIC/R2-dLLM), run after any base policy.

One step, for each row of the batch, in this order; every rule sees the
commits of the rules before it:

0. the base policy (`policies.select`) commits `base`;
1. confidence cluster: every window [a, a+W) that lies inside the row's block,
   holds at most `unmasked_limit` unmasked positions and at least one masked
   one, and whose masked positions have mean confidence >= tau_s, commits all
   its masked positions. All windows are judged on the same state (after 0),
   as the reference collects them before writing;
2. token cluster: every maximal run of >= 2 adjacent masked positions with the
   same top-1 id whose highest top-1 probability is > tau_s commits one of its
   positions (mode `confidence`: the most confident, the lower on a tie;
   `mid`: start + length // 2; `random`: start + floor(u * length));
3. temporal finalisation: a masked position whose top-1 id has been the same
   for the last `temporal_steps` steps (this one included) while it stayed
   masked commits that id when the streak's confidence (`last`: this step's,
   `ave`: mean, `max`: maximum) is >= tau_t.

"Masked" at rule r means a candidate of this step (confidence > -inf: a mask
of the row's current block) that rules 0..r-1 did not commit; "unmasked"
(rule 1) is an in-block position that is not masked in that sense, i.e.
committed in an earlier step or earlier in this one. Columns at or past a
row's block length are neither, and no window covers them. The comparisons
(>= for means and streaks, > for the run maximum) are the reference's.

Rules 0 and 1 commit the policy's `tokens` with its `confidence` (argmax or
Gumbel sample, probability or random remasking score), as the reference's
window sweep does; rules 2 and 3 look at the argmax `top_ids` and their softmax
probability `top_conf` and commit those ids. Under greedy low-confidence
decoding both pairs are the same.

Rules 1-2 are on for a row when it has a window and tau_s, rule 2 when it also
has a token-cluster mode, rule 3 when it has temporal steps and tau_t.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

TOKEN_CLUSTER_MODES = ("confidence", "mid", "random")
AGGREGATIONS = ("last", "ave", "max")


@dataclass(frozen=True)
class R2Settings:
    """One request's R² settings (`DllmParams.r2_settings`, where their defaults are
    declared); None switches the part it belongs to off."""

    window: int | None
    spatial_threshold: float | None
    unmasked_limit: int | None  # None: no limit
    token_cluster: str | None
    temporal_steps: int | None
    temporal_threshold: float | None
    aggregation: str

    @property
    def spatial(self) -> bool:
        """Rules 1-2 are on."""
        return self.window is not None and self.window > 0 and self.spatial_threshold is not None

    @property
    def temporal(self) -> bool:
        """Rule 3 is on."""
        return (self.temporal_steps is not None and self.temporal_steps > 0
                and self.temporal_threshold is not None)


_OFF = R2Settings(window=None, spatial_threshold=None, unmasked_limit=None, token_cluster=None,
                  temporal_steps=None, temporal_threshold=None, aggregation=AGGREGATIONS[0])


@dataclass(frozen=True)
class R2Batch:
    """The batch's settings as [B] tensors; a row that has a rule off never fires it.

    The host-side fields let `apply_r2` size its windows and skip rules no row
    uses without reading tensors back from the device.
    """

    window: torch.Tensor  # long, 0 where rules 1-2 are off
    spatial_threshold: torch.Tensor  # float64
    unmasked_limit: torch.Tensor  # long
    token_cluster: torch.Tensor  # long, index into TOKEN_CLUSTER_MODES, -1 off
    temporal_steps: torch.Tensor  # long, 0 where rule 3 is off
    temporal_threshold: torch.Tensor  # float64
    aggregation: torch.Tensor  # long, index into AGGREGATIONS
    max_window: int
    token_modes: frozenset[str]
    temporal: bool

    @classmethod
    def build(cls, settings: Sequence[R2Settings | None], device: torch.device | None = None) -> "R2Batch":
        """Assemble from each request's settings; None is a request without R²."""
        rows = [s if s is not None else _OFF for s in settings]
        for s in rows:
            if s.token_cluster is not None and s.token_cluster not in TOKEN_CLUSTER_MODES:
                raise ValueError(f"unknown token_cluster {s.token_cluster!r}; "
                                 f"known: {', '.join(TOKEN_CLUSTER_MODES)}")
            if s.aggregation not in AGGREGATIONS:
                raise ValueError(f"unknown aggregation {s.aggregation!r}; known: {', '.join(AGGREGATIONS)}")
        windows = [s.window if s.spatial else 0 for s in rows]
        modes = [s.token_cluster if s.spatial else None for s in rows]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            window=tensor(windows, torch.long),
            spatial_threshold=tensor([s.spatial_threshold if s.spatial else 0.0 for s in rows],
                                     torch.float64),
            # A window never holds more than W unmasked positions, so W means "no limit".
            unmasked_limit=tensor([w if s.unmasked_limit is None else s.unmasked_limit
                                   for s, w in zip(rows, windows)], torch.long),
            token_cluster=tensor([-1 if m is None else TOKEN_CLUSTER_MODES.index(m) for m in modes],
                                 torch.long),
            temporal_steps=tensor([s.temporal_steps if s.temporal else 0 for s in rows], torch.long),
            temporal_threshold=tensor([s.temporal_threshold if s.temporal else 0.0 for s in rows],
                                      torch.float64),
            aggregation=tensor([AGGREGATIONS.index(s.aggregation) for s in rows], torch.long),
            max_window=max(windows, default=0),
            token_modes=frozenset(m for m in modes if m is not None),
            temporal=any(s.temporal for s in rows),
        )


class StreakState:
    """Rule 3's memory: per request row and block column, the top-1 id being tracked
    (-1 none), how many consecutive steps it has held while masked, and the sum
    and maximum of its probability over those steps; plus the block each row's
    streaks belong to, so a row that moved to another block starts over.
    """

    def __init__(self, batch: int, width: int, device: torch.device | None = None):
        self.ids = torch.full((batch, width), -1, dtype=torch.long, device=device)
        self.count = torch.zeros((batch, width), dtype=torch.long, device=device)
        self.conf_sum = torch.zeros((batch, width), dtype=torch.float64, device=device)
        self.conf_max = torch.zeros((batch, width), dtype=torch.float64, device=device)
        self.block = torch.full((batch,), -1, dtype=torch.long, device=device)

    def widen(self, width: int) -> None:
        """Grow to `width` columns (a request with a longer block joined); new ones start empty."""
        old = self.ids.shape[1]
        fresh = StreakState(self.ids.shape[0], width, self.ids.device)
        for name in ("ids", "count", "conf_sum", "conf_max"):
            getattr(fresh, name)[:, :old] = getattr(self, name)
        self.ids, self.count = fresh.ids, fresh.count
        self.conf_sum, self.conf_max = fresh.conf_sum, fresh.conf_max

    def observe(self, block_index: torch.Tensor, settled: torch.Tensor, active: torch.Tensor,
                top_ids: torch.Tensor, top_conf: torch.Tensor) -> None:
        """Record one step: rows whose block changed and `settled` positions
        (committed this step) forget their streak; `active` positions extend it
        when the top-1 id is unchanged and start a new one otherwise."""
        forget = (self.block != block_index)[:, None] | settled
        self.block = block_index.clone()
        ids = torch.where(forget, -1, self.ids)
        count = torch.where(forget, 0, self.count)
        conf_sum = torch.where(forget, 0.0, self.conf_sum)
        conf_max = torch.where(forget, 0.0, self.conf_max)
        conf = top_conf.to(torch.float64)
        same = active & (ids == top_ids)
        new = active & ~same
        self.ids = torch.where(new, top_ids, ids)
        self.count = torch.where(same, count + 1, torch.where(new, 1, count))
        self.conf_sum = torch.where(same, conf_sum + conf, torch.where(new, conf, conf_sum))
        self.conf_max = torch.where(same, torch.maximum(conf_max, conf), torch.where(new, conf, conf_max))

    def clear(self, positions: torch.Tensor) -> None:
        """Forget the streaks at `positions` ([B, K] bool), e.g. once committed."""
        self.ids = torch.where(positions, -1, self.ids)
        self.count = torch.where(positions, 0, self.count)
        self.conf_sum = torch.where(positions, 0.0, self.conf_sum)
        self.conf_max = torch.where(positions, 0.0, self.conf_max)


def _windows(x: torch.Tensor, size: int, left: bool = False) -> torch.Tensor:
    """[B, K, size] views: at column j, x[j : j+size] (or x[j-size+1 : j+1] with `left`), zero-padded."""
    pad = torch.zeros(x.shape[0], size - 1, dtype=x.dtype, device=x.device)
    padded = torch.cat([pad, x] if left else [x, pad], dim=-1)
    return padded.unfold(-1, size, 1)


def confidence_cluster(batch: R2Batch, masked: torch.Tensor, block_lengths: torch.Tensor,
                       confidence: torch.Tensor) -> torch.Tensor:
    """Rule 1: the masked positions covered by a window that passes (see module doc)."""
    size = batch.max_window
    start = torch.arange(masked.shape[-1], device=masked.device)
    width = batch.window[:, None]
    inside = (torch.arange(size, device=masked.device) < width)[:, None, :]  # [B, 1, size]
    unmasked = (start < block_lengths[:, None]) & ~masked
    score = torch.where(masked, confidence, torch.zeros_like(confidence))
    n_masked = (_windows(masked, size) & inside).sum(-1)
    n_unmasked = (_windows(unmasked, size) & inside).sum(-1)
    total = (_windows(score, size) * inside).sum(-1)
    fits = start + width <= block_lengths[:, None]
    passes = (fits & (width > 0) & (n_unmasked <= batch.unmasked_limit[:, None]) & (n_masked > 0)
              & (total / n_masked.clamp(min=1) >= batch.spatial_threshold[:, None]))
    # Column j is covered by the passing windows starting at j-W+1 .. j.
    covered = (_windows(passes, size, left=True) & inside.flip(-1)).any(-1)
    return covered & masked


def token_cluster(batch: R2Batch, masked: torch.Tensor, top_ids: torch.Tensor, top_conf: torch.Tensor,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Rule 2: one position per qualifying run of equal top-1 ids (see module doc).

    `uniforms` [B, K] in [0, 1) is needed only when a row uses `random`; the
    run starting at column a uses `uniforms[b, a]`. Draw each row from its
    request's own generator (e.g. `noise.random_scores`) so a seeded request
    does not depend on its batch neighbours.
    """
    b, k = masked.shape
    col = torch.arange(k, device=masked.device).expand(b, k)
    joins = torch.zeros_like(masked)
    joins[:, 1:] = masked[:, 1:] & masked[:, :-1] & (top_ids[:, 1:] == top_ids[:, :-1])
    starts = masked & ~joins
    # Run number of each masked column; the other columns go to spare bin k.
    run = torch.where(masked, starts.long().cumsum(-1) - 1, k)

    def per_run(values: torch.Tensor, reduce: str, empty: float) -> torch.Tensor:
        bins = torch.full((b, k + 1), empty, dtype=values.dtype, device=values.device)
        return bins.scatter_reduce(1, run, values, reduce)

    length = per_run(torch.ones_like(col), "sum", 0)
    first = per_run(col, "amin", k)
    best = per_run(top_conf, "amax", float("-inf"))
    is_best = masked & (top_conf == best.gather(1, run))
    choice = per_run(torch.where(is_best, col, k), "amin", k)  # mode "confidence"
    mode = batch.token_cluster[:, None]
    choice = torch.where(mode == TOKEN_CLUSTER_MODES.index("mid"), first + length // 2, choice)
    if "random" in batch.token_modes:
        if uniforms is None:
            raise ValueError("token_cluster 'random' needs uniforms")
        u = uniforms.gather(1, first.clamp(max=k - 1))
        offset = torch.minimum((u * length).long(), length - 1)
        choice = torch.where(mode == TOKEN_CLUSTER_MODES.index("random"), first + offset, choice)
    fires = (mode >= 0) & (length >= 2) & (best > batch.spatial_threshold[:, None])
    return masked & fires.gather(1, run) & (col == choice.gather(1, run))


def temporal_finalise(batch: R2Batch, streaks: StreakState, block_index: torch.Tensor,
                      candidates: torch.Tensor, masked: torch.Tensor, top_ids: torch.Tensor,
                      top_conf: torch.Tensor) -> torch.Tensor:
    """Rule 3: update the streaks with this step and return the positions they confirm."""
    on = (batch.temporal_steps > 0)[:, None]
    active = masked & on
    streaks.observe(block_index, candidates & ~active, active, top_ids, top_conf)
    mean = streaks.conf_sum / streaks.count.clamp(min=1)
    agg = batch.aggregation[:, None]
    value = torch.where(agg == AGGREGATIONS.index("last"), top_conf.to(torch.float64),
                        torch.where(agg == AGGREGATIONS.index("ave"), mean, streaks.conf_max))
    confirm = (active & (streaks.count >= batch.temporal_steps[:, None])
               & (value >= batch.temporal_threshold[:, None]))
    streaks.clear(confirm)
    return confirm


def apply_r2(
    batch: R2Batch,
    streaks: StreakState,
    base: torch.Tensor,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    top_ids: torch.Tensor,
    top_conf: torch.Tensor,
    block_lengths: torch.Tensor,
    block_index: torch.Tensor,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add rules 1-3 to the base policy's commit mask `base`.

    All [B, K] except `block_lengths` (the row's block length, columns past it
    are padding) and `block_index` (which block of its canvas the row is
    decoding, for rule 3's reset), both [B]. `streaks` must have B rows and K
    columns. Returns the final commit mask and the token to write at each
    committed position: `tokens` for rules 0-1, `top_ids` for rules 2-3.
    """
    candidates = confidence > float("-inf")
    commit = base & candidates
    if batch.max_window > 0:
        commit = commit | confidence_cluster(batch, candidates & ~commit, block_lengths, confidence)
    from_top = torch.zeros_like(commit)
    if batch.token_modes:
        from_top = token_cluster(batch, candidates & ~commit, top_ids, top_conf, uniforms)
    if batch.temporal:
        from_top = from_top | temporal_finalise(batch, streaks, block_index, candidates,
                                                candidates & ~commit & ~from_top, top_ids, top_conf)
    return commit | from_top, torch.where(from_top, top_ids, tokens)
