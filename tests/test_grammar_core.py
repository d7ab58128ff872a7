"""The decoding core's side of structured outputs (`sampling/grammar.py`): masks reach the
rows they belong to, and an iteration's commits for a structured request are the
frontier and then a contiguous run whose tokens led to the next masks (selected by the
policy, or the one token a mask allows)."""

import torch

from vllm_dllm.sampling.grammar import GrammarPlan


def bitmask(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    words = torch.zeros((len(allowed), -(-vocab // 32)), dtype=torch.int64)
    for r, tokens in enumerate(allowed):
        for t in tokens:
            words[r, t // 32] |= 1 << (t % 32)
    # int32 words as vLLM's bitmasks hold them (bit 31 is the sign bit).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def plan(num_rows: list[int], frontier: list[int], first_row: list[int], masks,
         drafts: torch.Tensor | None = None, forced: torch.Tensor | None = None
         ) -> GrammarPlan:
    shape = (len(num_rows), 6)
    return GrammarPlan(masks, torch.tensor(first_row), torch.tensor(num_rows),
                       torch.tensor(frontier),
                       torch.full(shape, -1) if drafts is None else drafts,
                       torch.zeros(shape, dtype=torch.bool) if forced is None else forced)


def test_masks_go_to_the_frontier_and_the_rows_after_it():
    vocab = 40
    masks = bitmask([[3, 33], [5], [7, 39]], vocab)
    # Request 0 structured from block column 2 with rows 0-1; request 1 with row 2 at 0.
    p = plan([2, 1, 0], [2, 0, 0], [0, 2, 0], masks)
    request = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    column = torch.tensor([1, 2, 3, 4, 0, 1, 0])
    logits = torch.zeros(7, vocab)
    p.apply(logits, request, column)
    finite = [set(torch.nonzero(r > float("-inf")).flatten().tolist()) for r in logits]
    everything = set(range(vocab))
    assert finite == [everything, {3, 33}, {5}, everything, {7, 39}, everything, everything]


def test_chain_commits_the_frontier_and_a_contiguous_run():
    masks = bitmask([[1]] * 8, 8)
    commit = torch.tensor([[0, 0, 1, 1, 0, 1],    # the policy skipped the frontier
                           [0, 1, 1, 0, 1, 1],    # a gap at column 3
                           [0, 0, 0, 1, 0, 1]]).bool()
    tokens = torch.tensor([[9, 5, 6, 7, 8, 9],
                           [9, 5, 6, 7, 8, 9],
                           [9, 5, 6, 7, 8, 9]])
    drafts = torch.tensor([[-1, 5, 0, 7, 8, 9],   # column 2's token differs from its draft
                           [-1, 5, 6, 7, 8, 9],
                           [-1, 5, 6, 7, 8, 9]])
    valid = torch.ones(3, 6, dtype=torch.bool)
    held = torch.zeros(3, 6, dtype=torch.bool)
    # Three requests, frontier at column 1, 4 mask rows each; the third is not structured.
    p = plan([4, 4, 0], [1, 1, 1], [0, 4, 0], masks, drafts)
    out = p.chain(commit, tokens, valid, held).int().tolist()
    # Request 0: the frontier, then column 2 (its mask was built on column 1's draft 5,
    # which column 1 committed); column 3's mask assumed draft 0 at column 2: it waits.
    assert out[0] == [0, 1, 1, 0, 0, 0]
    # Request 1: the frontier and column 2; column 3 was not selected, so 4 and 5 wait.
    assert out[1] == [0, 1, 1, 0, 0, 0]
    assert out[2] == commit[2].int().tolist()
    # Past its mask rows nothing commits; a column without logits (-1) breaks the run;
    # a frontier a filter took back is not forced.
    full = torch.ones(3, 6, dtype=torch.bool)
    same = plan([4, 4, 0], [1, 1, 1], [0, 4, 0], masks, tokens.clone())
    assert same.chain(full, tokens, valid, held).int().tolist()[0] == [0, 1, 1, 1, 1, 0]
    gap = tokens.clone()
    gap[0, 3] = -1
    assert same.chain(full, gap, valid, held).int().tolist()[0] == [0, 1, 1, 0, 0, 0]
    # A column whose mask allows one token commits though the policy did not select it.
    forced = torch.zeros(3, 6, dtype=torch.bool)
    forced[1, 3] = True
    both = plan([4, 4, 0], [1, 1, 1], [0, 4, 0], masks, drafts, forced)
    assert both.chain(commit, tokens, valid, held).int().tolist()[1] == [0, 1, 1, 1, 1, 0]
    held[0, 1] = True
    assert p.chain(commit, tokens, valid, held).int().tolist()[0] == [0] * 6
