"""Structured outputs on a canvas: grammar token masks, and which commits keep the
committed text a valid prefix of the grammar.

The grammar itself (vLLM's matcher) lives with the scheduler; the decoding core
gets, per structured request, the token bitmasks of consecutive positions from its
frontier f (its first masked canvas position, which for such a request is the end
of its committed text): row 0 is the grammar's mask after the committed text, row
i the mask after the committed text followed by the drafts of f .. f + i - 1, which
the grammar accepted. A position's draft is the one token its mask allows when it
allows one (the grammar decides it: `{"answer":"` of a JSON schema), else the token
the last iteration predicted there. So a token drawn under row i extends a valid
prefix exactly when the tokens before it, back to f, are committed in this iteration
and equal their drafts. An iteration commits, for a structured request, the frontier
(always: it progresses every iteration) and then, left to right, each position the
policy selected or whose mask allows one token, while that holds (`chain`); a
selected position that is not contiguous with it waits. Positions beyond the last
mask row get no mask: their predictions become the next iteration's drafts.

Bitmasks are vLLM's: int32 words, bit j of word w allows token 32 w + j.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GrammarPlan:
    """The masks of one iteration: `bitmask` [R, W] rows; per request b of the
    batch, `first_row[b]` and `num_rows[b]` (0: not structured) of them, for block
    columns `frontier[b]` onward; `drafts` [B, k] the tokens the masks after each
    column were built on (-1: none), `forced` [B, k] the columns whose mask allows
    a single token."""

    bitmask: torch.Tensor
    first_row: torch.Tensor
    num_rows: torch.Tensor
    frontier: torch.Tensor
    drafts: torch.Tensor
    forced: torch.Tensor

    @property
    def structured(self) -> torch.Tensor:
        return self.num_rows > 0

    def apply(self, logits: torch.Tensor, request: torch.Tensor, column: torch.Tensor) -> None:
        """-inf on `logits` [M, V] wherever the row's mask disallows a token; logits row
        i is block column `column[i]` of request `request[i]`."""
        offset = column - self.frontier[request]
        masked = (offset >= 0) & (offset < self.num_rows[request])
        row = (self.first_row[request] + offset).clamp(0, len(self.bitmask) - 1)
        vocab = logits.shape[-1]
        token = torch.arange(vocab, device=logits.device)
        words = self.bitmask.shape[-1]
        word = self.bitmask[row][:, (token // 32).clamp(max=words - 1)]
        allowed = ((word >> (token % 32)) & 1).bool() & (token < 32 * words)
        logits.masked_fill_(masked[:, None] & ~allowed, float("-inf"))

    def chain(self, commit: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
              held: torch.Tensor) -> torch.Tensor:
        """The commits [B, k] that keep each structured request a valid prefix:
        `commit` the policy's, `tokens` the iteration's predictions (-1 where a column had
        no logits row), `valid` the block's real columns, `held` [B, k] columns a filter
        took back this iteration (never forced)."""
        k = commit.shape[1]
        column = torch.arange(k, device=commit.device)
        offset = column - self.frontier[:, None]
        has_mask = (offset >= 0) & (offset < self.num_rows[:, None]) & valid
        ok = has_mask & (tokens >= 0) & (commit | self.forced | (offset == 0)) & ~held
        extends = (offset < 0) | (ok & (tokens == self.drafts))
        # Every column before c, from the frontier on, committed and equal to its draft.
        before = torch.cumprod(torch.cat([torch.ones_like(extends[:, :1]), extends[:, :-1]], 1)
                               .int(), 1).bool()
        return torch.where(self.structured[:, None], ok & before, commit)
