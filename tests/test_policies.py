"""Commit policies and the EOS options, on hand-computed rows: the fixed schedule and EOS
options of LLaDA's `generate.py` (arXiv:2502.09992), Fast-dLLM's threshold and factor rules
(arXiv:2505.22618) and Fast-dLLM++'s Fréchet rule (arXiv:2606.02955)."""

import pytest
import torch

from vllm_dllm.sampling.eos import eos_eot_confidence, suppress_eos_logits
from vllm_dllm.params import DEFAULTS
from vllm_dllm.sampling.policies import (
    POLICIES,
    PolicyBatch,
    rank_in_row,
    select,
    select_factor,
    select_fixed,
    select_frechet,
    select_sequential,
    select_threshold,
)

NO = float("-inf")


def conf(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def per_row(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def cols(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def reference_factor(row: torch.Tensor, factor: float) -> tuple[torch.Tensor, bool]:
    """Fast-dLLM v1 `get_transfer_index_dynamic` for one row, and whether its last-candidate
    branch committed a failing token."""
    mask = row > NO
    commit = torch.zeros_like(mask)
    m = int(mask.sum())
    if m == 0:
        return commit, False
    threshs = [1 - factor / (n + 1) for n in range(1, m + 1)]
    threshs[0] = -1
    ordered = torch.sort(row[mask], descending=True)[0]
    failed = False
    for top_i in range(m):
        if ordered[top_i] < threshs[top_i]:
            failed = True
            break
    quirk = failed and top_i == m - 1
    if top_i == 0 or top_i == m - 1:
        top_i += 1
    commit[torch.topk(row, k=top_i).indices] = True
    return commit, quirk


def policy_batch(names, counts, thresholds, factors, deltas) -> PolicyBatch:
    def floats(values):
        return torch.tensor(values, dtype=torch.float64)

    return PolicyBatch(torch.tensor([POLICIES.index(n) for n in names]), counts,
                       floats(thresholds), floats(factors), floats(deltas), frozenset(names))


def test_names_and_defaults():
    assert POLICIES == ("fixed", "threshold", "factor", "frechet", "sequential")
    assert (DEFAULTS["threshold"], DEFAULTS["factor"], DEFAULTS["frechet_delta"]) == (0.9, 1.0, 0.25)


def test_rank_ties_go_to_lower_position():
    assert rank_in_row(conf([0.5, 0.7, 0.5, 0.7, NO])).tolist() == [[2, 0, 3, 1, 4]]


def test_fixed_takes_counts_best_and_skips_non_candidates():
    c = conf([0.5, 0.7, 0.5, 0.7, NO], [NO, NO, NO, NO, NO], [NO, 0.1, NO, NO, NO])
    assert cols(select_fixed(c, torch.tensor([3, 2, 4]))) == [[0, 1, 3], [], [1]]


def test_sequential_takes_the_leftmost_candidates_whatever_their_confidence():
    # SDAR's `sequential`: a committed (or prompt) position is skipped, not counted.
    c = conf([NO, 0.1, 0.9, NO, 0.2], [NO, NO, NO, NO, NO], [0.3, NO, NO, NO, NO])
    assert cols(select_sequential(c, torch.tensor([2, 3, 4]))) == [[1, 2], [], [0]]
    assert cols(select_sequential(c[:1], torch.tensor([0]))) == [[]]


class TestThreshold:
    def test_commits_all_at_or_above(self):
        c = conf([0.5, 0.95, 0.9, NO, 0.3])
        assert cols(select_threshold(c, per_row(0.9))) == [[1, 2]]

    def test_top1_forced_when_nothing_clears_lower_position_on_tie(self):
        c = conf([0.5, 0.7, NO, 0.7])
        assert cols(select_threshold(c, per_row(0.9))) == [[1]]

    def test_one_mask_left(self):
        assert cols(select_threshold(conf([NO, NO, 0.01]), per_row(0.9))) == [[2]]

    def test_no_candidates(self):
        assert cols(select_threshold(conf([NO, NO, NO]), per_row(0.9))) == [[]]

    def test_threshold_per_row(self):
        c = conf([0.6, 0.8, 0.7], [0.6, 0.8, 0.7])
        assert cols(select_threshold(c, per_row(0.65, 0.9))) == [[1, 2], [1]]


class TestFactor:
    # Thresholds 1 - f/(n+1) with f = 1: n=2 -> 2/3, n=3 -> 0.75, n=4 -> 0.8, n=5 -> 5/6.

    def test_boundary_is_accepted_and_first_failure_stops(self):
        # Sorted: 0.9 (n=1 forced), 0.8 >= 2/3, 0.75 >= 0.75 (equality passes, as in the
        # reference's `c >= 1 - f/(n+1)`), 0.5 < 0.8 stops; 0.4 is not looked at.
        c = conf([0.5, 0.75, 0.9, 0.4, 0.8])
        assert cols(select_factor(c, per_row(1.0))) == [[1, 2, 4]]

    def test_last_candidate_quirk_not_replicated(self):
        # The reference loop breaks at the last candidate (0.7 < 0.8 at n=4) and then still
        # commits it (`top_i == len - 1`); we stop at the last passing prefix.
        c = conf([0.9, 0.8, 0.75, 0.7])
        assert cols(select_factor(c, per_row(1.0))) == [[0, 1, 2]]
        # With two masks left the reference commits both whatever the second one's confidence.
        assert cols(select_factor(conf([0.9, 0.1]), per_row(1.0))) == [[0]]

    def test_equals_reference_loop_except_the_quirk(self):
        g = torch.Generator().manual_seed(1)
        quirks = 0
        for _ in range(200):
            row = torch.rand(6, generator=g, dtype=torch.float64) ** 0.2
            row[torch.rand(6, generator=g) < 0.3] = NO
            f = float(torch.rand((), generator=g)) * 2
            ref, quirk = reference_factor(row, f)
            ours = select_factor(row[None], per_row(f))[0]
            expected = ref.clone()
            if quirk:  # the reference's one extra token is its least confident one
                quirks += 1
                expected[torch.nonzero(ref).flatten()[row[ref].argmin()]] = False
            assert torch.equal(ours, expected)
        assert 0 < quirks < 200

    def test_all_pass(self):
        assert cols(select_factor(conf([0.9, 0.8, 0.76, NO]), per_row(1.0))) == [[0, 1, 2]]

    def test_nothing_passes_still_commits_top1_lower_on_tie(self):
        assert cols(select_factor(conf([0.2, 0.3, 0.3]), per_row(1.0))) == [[1]]

    def test_one_mask_left_and_no_candidates(self):
        c = conf([NO, 0.05, NO], [NO, NO, NO])
        assert cols(select_factor(c, per_row(1.0, 1.0))) == [[1], []]

    def test_ties_in_prefix_go_to_lower_positions(self):
        # Sorted 0.9 (c2), 0.75 (c0), 0.75 (c1), 0.75 (c3), 0.1 (c4): n=3 passes (0.75 >= 0.75),
        # n=4 fails (0.75 < 0.8), so of the tied 0.75s the two lower positions go.
        c = conf([0.75, 0.75, 0.9, 0.75, 0.1])
        assert cols(select_factor(c, per_row(1.0))) == [[0, 1, 2]]


class TestFrechet:
    # Sorted 1.0, 0.75, 0.5: G_2 = (1.75 - 1) - 0.25 = 0.5, G_3 = (2.25 - 2) - 0.5 = -0.25.
    ROW = [0.5, NO, 1.0, 0.75]

    @pytest.mark.parametrize("delta, expected", [
        (0.5, [2]),          # G_2 = 0.5 is not > 0.5
        (0.49, [2, 3]),
        (-0.25, [2, 3]),     # G_3 = -0.25 is not > -0.25
        (-0.26, [0, 2, 3]),
    ])
    def test_delta_boundaries(self, delta, expected):
        assert cols(select_frechet(conf(self.ROW), per_row(delta))) == [expected]

    def test_equals_reference_vectorised_code(self):
        # Fast-dLLM++ `get_transfer_index_frechet_profile`, transcribed.
        g = torch.Generator().manual_seed(2)
        c = torch.rand((64, 12), generator=g, dtype=torch.float64) ** 0.1
        mask = torch.rand((64, 12), generator=g) > 0.3
        c = torch.where(mask, c, NO)
        deltas = torch.rand(64, generator=g, dtype=torch.float64) * 0.6 - 0.1
        values, idx = torch.sort(torch.where(mask, c, torch.finfo(c.dtype).min), dim=1, descending=True)
        col = torch.arange(12).expand(64, 12)
        valid = col < mask.sum(1, keepdim=True)
        score = (torch.cumsum(torch.where(valid, values, 0.0), 1) - col) - (1.0 - values)
        score = torch.where(valid, score, -torch.inf)
        score[:, 0] = torch.inf
        top = (score > deltas[:, None]).sum(1).clamp(min=1)
        ref = torch.zeros_like(mask).scatter(1, idx, col < top[:, None]) & mask
        assert torch.equal(select_frechet(c, deltas), ref)

    def test_equal_confidences_match_factor_core(self):
        # c = 0.875 everywhere: G_n = 1 - 0.125 (n + 1) > 0.25 iff n <= 4.
        c = conf([0.875] * 8)
        assert cols(select_frechet(c, per_row(0.25))) == [[0, 1, 2, 3]]

    def test_at_least_one_lower_position_on_tie(self):
        assert cols(select_frechet(conf([0.1, 0.3, 0.3]), per_row(0.25))) == [[1]]

    def test_one_mask_left_and_no_candidates(self):
        c = conf([NO, NO, 0.2], [NO, NO, NO])
        assert cols(select_frechet(c, per_row(0.25, 0.25))) == [[2], []]

    def test_heterogeneity_bonus_beats_factor(self):
        # 0.99, 0.99, 0.6: G_3 = (2.58 - 2) - 0.4 = 0.18 > 0.1; the factor rule at f = 1 - delta
        # = 0.9 needs 1 - 0.9/4 = 0.775 at n=3 and stops at 2.
        c = conf([0.99, 0.6, 0.99])
        assert cols(select_frechet(c, per_row(0.1))) == [[0, 1, 2]]
        assert cols(select_factor(c, per_row(0.9))) == [[0, 2]]


def test_default_policy_parameters_give_documented_results():
    c = conf([0.95, 0.85, 0.8, 0.3, 0.2])
    assert cols(select_threshold(c, per_row(DEFAULTS["threshold"]))) == [[0]]
    assert cols(select_factor(c, per_row(DEFAULTS["factor"]))) == [[0, 1, 2]]
    # G_2 = 0.8 - 0.15 = 0.65, G_3 = 0.6 - 0.2 = 0.4, G_4 = -0.1 - 0.7 < 0.25.
    # Factor 1: 0.85 >= 2/3, 0.8 >= 0.75, 0.3 < 0.8.
    assert cols(select_frechet(c, per_row(DEFAULTS["frechet_delta"]))) == [[0, 1, 2]]


def test_mixed_batch_equals_rows_alone():
    g = torch.Generator().manual_seed(0)
    c = torch.rand((8, 16), generator=g, dtype=torch.float64)
    c[torch.rand((8, 16), generator=g) < 0.3] = NO
    c[5] = NO  # a row without candidates
    c[6, 3] = c[6, 9] = c[6].max()  # a tie at the top
    names = ["fixed", "threshold", "factor", "frechet", "threshold", "frechet", "sequential",
             "fixed"]
    counts = torch.tensor([3, 0, 0, 0, 0, 0, 2, 1])
    thresholds = [0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9]
    factors = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    deltas = [0.25, 0.25, 0.25, 0.0, 0.25, 0.25, 0.25, 0.25]
    batch = policy_batch(names, counts, thresholds, factors, deltas)
    got = select(c, batch)
    for b, name in enumerate(names):
        row = c[b : b + 1]
        alone = {
            "fixed": lambda: select_fixed(row, counts[b : b + 1]),
            "threshold": lambda: select_threshold(row, per_row(thresholds[b])),
            "factor": lambda: select_factor(row, per_row(factors[b])),
            "frechet": lambda: select_frechet(row, per_row(deltas[b])),
            "sequential": lambda: select_sequential(row, counts[b : b + 1]),
        }[name]()
        assert torch.equal(got[b], alone[0]), (b, name)
    assert not got[5].any()


def test_select_runs_only_the_policies_in_use():
    batch = policy_batch(["threshold"], torch.tensor([0]), [0.9], [1.0], [0.25])
    assert cols(select(conf([0.2, 0.95, 0.91]), batch)) == [[1, 2]]
    # A row whose policy is not listed in `used` commits nothing.
    unused = PolicyBatch(batch.policy, batch.counts, batch.threshold, batch.factor,
                         batch.frechet_delta, used=frozenset({"fixed"}))
    assert cols(select(conf([0.2, 0.95, 0.91]), unused)) == [[]]


class TestEos:
    EOS, EOT = 2, 3
    # Probabilities 0.5, 0.25, 0.125 (EOS), 0.125 (EoT).
    LOGITS = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 4, dtype=torch.float64).log()

    def test_logits_eos_inf_sets_the_chosen_rows_eos_column_to_minus_inf(self):
        rows = torch.tensor([True, False, True, False])
        out = suppress_eos_logits(self.LOGITS.float(), self.EOS, rows)
        assert torch.isinf(out[rows, self.EOS]).all() and (out[rows, self.EOS] < 0).all()
        assert torch.equal(out[~rows], self.LOGITS.float()[~rows])
        assert torch.equal(out[:, [0, 1, 3]], self.LOGITS.float()[:, [0, 1, 3]])
        assert out.argmax(-1).tolist() == [0, 0, 0, 0]

    def test_eos_and_eot_get_zero_others_renormalised(self):
        tokens = torch.tensor([0, 1, self.EOS, self.EOT])
        got = eos_eot_confidence(self.LOGITS.float(), tokens, self.EOS, self.EOT)
        assert got.dtype == torch.float64
        assert torch.allclose(got, per_row(0.5 / 0.75, 0.25 / 0.75, 0.0, 0.0))
        assert torch.isfinite(self.LOGITS).all()

    def test_matches_reference_chained_assignment_at_temperature_zero(self):
        # LLaDA: at T = 0 `add_gumbel_noise` returns `logits` itself, so the chained
        # assignment writes -inf to both ids of the same tensor before the softmax.
        logits = self.LOGITS.clone()
        logits_with_noise = logits  # add_gumbel_noise(logits, 0)
        logits_with_noise[:, self.EOS] = logits[:, self.EOT] = float("-inf")
        tokens = torch.tensor([0, self.EOS, self.EOT, 1])
        ref = torch.softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.allclose(eos_eot_confidence(self.LOGITS, tokens, self.EOS, self.EOT), ref)

    def test_follows_intent_not_reference_at_positive_temperature(self):
        # At T > 0 the reference's `logits_with_noise` is a new tensor: only EoT leaves the
        # softmax and an EOS prediction keeps 0.125 / 0.875. We give EOS 0 at any temperature.
        logits = self.LOGITS.clone()
        logits[:, self.EOT] = float("-inf")
        literal = torch.softmax(logits, -1)[0, self.EOS]
        assert torch.isclose(literal, torch.tensor(0.125 / 0.875, dtype=torch.float64))
        ours = eos_eot_confidence(self.LOGITS[:1], torch.tensor([self.EOS]), self.EOS, self.EOT)
        assert ours.tolist() == [0.0]

    def test_eos_predictions_stay_candidates_and_go_last(self):
        tokens = torch.tensor([self.EOS, 0, self.EOT, 1])
        c = eos_eot_confidence(self.LOGITS, tokens, self.EOS, self.EOT)[None]
        assert cols(select_fixed(c, torch.tensor([3]))) == [[0, 1, 3]]
        assert cols(select_threshold(conf([0.0, NO, 0.0]), per_row(0.9))) == [[0]]
