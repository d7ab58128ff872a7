"""R²-dLLM's extra commit rules (arXiv:2604.18995) on hand-computed rows."""

import pytest
import torch

import functools
from dataclasses import asdict

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling import r2
from vllm_dllm.sampling.r2 import AGGREGATIONS, TOKEN_CLUSTER_MODES, R2Batch, StreakState, apply_r2

# Settings default to the plugin's declared R² parameters.
R2Settings = functools.partial(r2.R2Settings, **asdict(DllmParams(r2=True).r2_settings))

NO = float("-inf")
SPATIAL = R2Settings(token_cluster=None, temporal_steps=None)
TEMPORAL = R2Settings(window=None)


def token(mode: str) -> R2Settings:
    return R2Settings(token_cluster=mode, temporal_steps=None)


def cols(mask: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row).flatten().tolist() for row in mask]


def rows(values, dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype)
    return t[None] if t.dim() == 1 else t


def run(settings, confidence, *, base=None, tokens=None, top_ids=None, top_conf=None,
        block_lengths=None, block_index=None, streaks=None, uniforms=None):
    """One step of apply_r2; by default tokens are 100 + column, top-1 ids all differ
    (no runs) and top_conf is the confidence."""
    confidence = rows(confidence)
    b, k = confidence.shape
    col = torch.arange(k).expand(b, k)
    return apply_r2(
        R2Batch.build(settings),
        StreakState(b, k) if streaks is None else streaks,
        torch.zeros((b, k), dtype=torch.bool) if base is None else rows(base, torch.bool),
        100 + col if tokens is None else rows(tokens, torch.long),
        confidence,
        1000 + col if top_ids is None else rows(top_ids, torch.long),
        confidence.clamp(min=0) if top_conf is None else rows(top_conf),
        torch.full((b,), k) if block_lengths is None else torch.tensor(block_lengths),
        torch.zeros(b, dtype=torch.long) if block_index is None else torch.tensor(block_index),
        uniforms,
    )


def test_names_and_defaults():
    assert TOKEN_CLUSTER_MODES == ("confidence", "mid", "random")
    assert AGGREGATIONS == ("last", "ave", "max")
    s = R2Settings()
    assert (s.window, s.spatial_threshold, s.unmasked_limit, s.token_cluster) == (3, 0.8, 1, "confidence")
    assert (s.temporal_steps, s.temporal_threshold, s.aggregation) == (3, 0.8, "last")


def test_rules_need_both_of_their_settings():
    assert not R2Settings(window=None).spatial and not R2Settings(spatial_threshold=None).spatial
    assert not R2Settings(temporal_steps=None).temporal
    assert not R2Settings(temporal_threshold=None).temporal
    batch = R2Batch.build([R2Settings(window=None), None])
    assert batch.window.tolist() == [0, 0] and batch.token_cluster.tolist() == [-1, -1]
    assert batch.temporal and batch.temporal_steps.tolist() == [3, 0]
    with pytest.raises(ValueError, match="token_cluster"):
        R2Batch.build([R2Settings(token_cluster="left")])
    with pytest.raises(ValueError, match="aggregation"):
        R2Batch.build([R2Settings(aggregation="min")])


def test_row_without_r2_keeps_the_base_commit():
    commit, out = run([None], [0.9, 0.9, 0.9, 0.2], base=[False, False, False, True])
    assert cols(commit) == [[3]] and out[0, 3] == 103


class TestConfidenceCluster:
    def test_window_commits_all_its_masked_positions(self):
        # [0, 3): mean(0.9, 0.85, 0.7) = 0.817 >= 0.8; [1, 4) = 0.583, later ones lower.
        commit, out = run([SPATIAL], [0.9, 0.85, 0.7, 0.2, 0.1, 0.1])
        assert cols(commit) == [[0, 1, 2]]
        assert out[0, :3].tolist() == [100, 101, 102]  # the policy's tokens

    def test_mean_boundary_is_inclusive(self):
        row = [0.5, 0.75, 1.0, 0.0]  # mean of [0, 3) = 0.75 exactly
        assert cols(run([R2Settings(spatial_threshold=0.75, token_cluster=None, temporal_steps=None)],
                        row)[0]) == [[0, 1, 2]]
        assert cols(run([SPATIAL], row)[0]) == [[]]

    def test_unmasked_limit(self):
        # Columns 0, 1 committed in earlier steps. [0, 3) holds 2 unmasked: skipped at limit 1;
        # [1, 4) holds 1: its masked 0.9, 0.9 pass.
        row = [NO, NO, 0.9, 0.9, 0.2, 0.2]
        assert cols(run([SPATIAL], row)[0]) == [[2, 3]]
        zero = R2Settings(unmasked_limit=0, token_cluster=None, temporal_steps=None)
        assert cols(run([zero], row)[0]) == [[]]
        # Without a limit, [0, 3) is judged on column 2 alone.
        row = [NO, NO, 0.9, 0.1, 0.1, 0.1]
        assert cols(run([SPATIAL], row)[0]) == [[]]
        free = R2Settings(unmasked_limit=None, token_cluster=None, temporal_steps=None)
        assert cols(run([free], row)[0]) == [[2]]

    def test_base_commits_count_as_unmasked_and_leave_the_mean(self):
        # Column 0 committed by the policy this step: [0, 3) has 1 unmasked and a masked mean
        # of 0.75 (0.83 if column 0 still counted), so it fails.
        row = [0.99, 0.75, 0.75, 0.1]
        base = [True, False, False, False]
        assert cols(run([SPATIAL], row, base=base)[0]) == [[0]]
        # With mean 0.9 it passes, but not at limit 0.
        row = [0.99, 0.9, 0.9, 0.1]
        assert cols(run([SPATIAL], row, base=base)[0]) == [[0, 1, 2]]
        zero = R2Settings(unmasked_limit=0, token_cluster=None, temporal_steps=None)
        assert cols(run([zero], row, base=base)[0]) == [[0]]

    def test_window_of_only_unmasked_positions_commits_nothing(self):
        assert cols(run([SPATIAL], [NO, NO, NO, NO])[0]) == [[]]

    def test_windows_stay_inside_the_block(self):
        # Block of 5 in an 8-wide batch: [3, 6) would hold the 0.9s but reaches past the block.
        row = [0.1, 0.1, 0.1, 0.9, 0.9, NO, NO, NO]
        assert cols(run([SPATIAL], row, block_lengths=[5])[0]) == [[]]
        pair = R2Settings(window=2, token_cluster=None, temporal_steps=None)
        assert cols(run([pair], row, block_lengths=[5])[0]) == [[3, 4]]
        # Window wider than the block: nothing.
        assert cols(run([SPATIAL], [0.9, 0.9, NO, NO], block_lengths=[2])[0]) == [[]]
        # First window of the block.
        assert cols(run([SPATIAL], [0.9, 0.9, 0.9, 0.1, 0.1])[0]) == [[0, 1, 2]]

    def test_per_row_window_sizes(self):
        row = [0.1, 0.9, 0.9, 0.1, 0.1]
        pair = R2Settings(window=2, token_cluster=None, temporal_steps=None)
        commit, _ = run([SPATIAL, pair, None], [row, row, row])
        assert cols(commit) == [[], [1, 2], []]


class TestTokenCluster:
    # Policy confidence 0.1 everywhere keeps rule 1 quiet. Runs: [0, 3) id 5 (max 0.9),
    # [3, 5) id 7 (max 0.81), [5] id 9 (too short), [6, 8) id 4 (max 0.8, not > 0.8).
    IDS = [5, 5, 5, 7, 7, 9, 4, 4]
    TOP = [0.5, 0.9, 0.85, 0.81, 0.6, 0.99, 0.3, 0.8]
    LOW = [0.1] * 8

    @pytest.mark.parametrize("mode, expected", [("confidence", [1, 3]), ("mid", [1, 4])])
    def test_modes(self, mode, expected):
        commit, out = run([token(mode)], self.LOW, top_ids=self.IDS, top_conf=self.TOP)
        assert cols(commit) == [expected]
        assert out[0, expected].tolist() == [self.IDS[c] for c in expected]  # the top-1 ids

    def test_random_uses_the_uniform_at_the_run_start(self):
        u = torch.zeros((1, 8), dtype=torch.float64)
        u[0, 0], u[0, 3] = 0.99, 0.2  # floor(0.99 * 3) = 2, floor(0.2 * 2) = 0
        commit, _ = run([token("random")], self.LOW, top_ids=self.IDS, top_conf=self.TOP, uniforms=u)
        assert cols(commit) == [[2, 3]]
        with pytest.raises(ValueError, match="uniforms"):
            run([token("random")], self.LOW, top_ids=self.IDS, top_conf=self.TOP)

    def test_confidence_tie_goes_to_lower_position_and_mid_of_even_run(self):
        ids, top = [3, 3, 3, 3], [0.7, 0.9, 0.9, 0.2]
        assert cols(run([token("confidence")], [0.1] * 4, top_ids=ids, top_conf=top)[0]) == [[1]]
        assert cols(run([token("mid")], [0.1] * 4, top_ids=ids, top_conf=top)[0]) == [[2]]

    def test_committed_positions_split_runs(self):
        ids, top = [5, 5, 5, 5, 5], [0.9] * 5
        # Column 1 committed by the policy now, column 3 earlier: runs [0], [2], [4].
        commit, _ = run([token("confidence")], [0.1, 0.1, 0.1, NO, 0.1], top_ids=ids, top_conf=top,
                        base=[False, True, False, False, False])
        assert cols(commit) == [[1]]

    def test_runs_form_after_confidence_cluster(self):
        # Rule 1 takes [0, 3); the rest of the id-5 run, [3, 5), commits its most confident.
        commit, out = run([token("confidence")], [0.9, 0.9, 0.9, 0.1, 0.1],
                          top_ids=[5] * 5, top_conf=[0.9, 0.9, 0.9, 0.95, 0.85])
        assert cols(commit) == [[0, 1, 2, 3]]
        assert out[0].tolist()[:4] == [100, 101, 102, 5]

    def test_off_without_spatial_settings(self):
        off = R2Settings(window=None, temporal_steps=None)
        assert cols(run([off], self.LOW, top_ids=self.IDS, top_conf=self.TOP)[0]) == [[]]


class TestTemporal:
    @staticmethod
    def steps(settings, top_ids, top_conf, *, confidence=None, base=None, block_index=None):
        """Run consecutive steps on one row, committing as we go; returns each step's commits."""
        k = len(top_ids[0])
        streaks = StreakState(1, k)
        conf = torch.full((1, k), 0.1, dtype=torch.float64) if confidence is None else rows(confidence)
        done = []
        for i, (ids, top) in enumerate(zip(top_ids, top_conf)):
            b = None if base is None else base[i]
            blk = None if block_index is None else [block_index[i]]
            commit, _ = run([settings], conf, top_ids=ids, top_conf=top, base=b, block_index=blk,
                            streaks=streaks)
            done.append(cols(commit)[0])
            conf = torch.where(commit, NO, conf)
        return done, streaks

    def test_commits_after_n_equal_steps(self):
        done, _ = self.steps(TEMPORAL, [[7, 8]] * 3, [[0.9, 0.5]] * 3)
        assert done == [[], [], [0]]

    def test_id_change_restarts_the_streak(self):
        done, _ = self.steps(TEMPORAL, [[7], [6], [6], [6]], [[0.9]] * 4)
        assert done == [[], [], [], [0]]

    def test_commit_resets_and_other_positions_continue(self):
        base = [None, [[True, False]], None]
        done, streaks = self.steps(TEMPORAL, [[7, 8]] * 3, [[0.9, 0.9]] * 3, base=base)
        assert done == [[], [0], [1]]
        assert streaks.ids.tolist() == [[-1, -1]] and streaks.count.tolist() == [[0, 0]]

    def test_position_committed_by_policy_forgets_its_streak(self):
        done, streaks = self.steps(TEMPORAL, [[7, 8]] * 2, [[0.9, 0.9]] * 2, base=[None, [[True, False]]])
        assert done == [[], [0]]
        assert streaks.ids.tolist() == [[-1, 8]] and streaks.count.tolist() == [[0, 2]]
        assert streaks.conf_sum.tolist() == [[0.0, 1.8]]

    def test_block_change_restarts(self):
        done, _ = self.steps(TEMPORAL, [[7]] * 5, [[0.9]] * 5, block_index=[0, 0, 1, 1, 1])
        assert done == [[], [], [], [], [0]]

    @pytest.mark.parametrize("aggregation, threshold, fires", [
        ("last", 0.75, False), ("ave", 0.75, True), ("max", 0.75, True),
        ("last", 0.5, True), ("ave", 0.8, False), ("max", 0.8, True),
    ])
    def test_aggregation(self, aggregation, threshold, fires):
        # Streak confidences 1.0, 0.75, 0.5: last 0.5, mean 0.75, max 1.0 (thresholds inclusive).
        settings = R2Settings(window=None, temporal_threshold=threshold, aggregation=aggregation)
        done, _ = self.steps(settings, [[7]] * 3, [[1.0], [0.75], [0.5]])
        assert done == [[], [], [0] if fires else []]

    def test_streak_stops_at_positions_committed_by_token_cluster(self):
        # Spatial rules on: the id-7 run commits column 1 in step 1, column 0 keeps its streak.
        both = R2Settings(temporal_steps=2)
        done, streaks = self.steps(both, [[7, 7]], [[0.85, 0.9]])
        assert done == [[1]] and streaks.ids.tolist() == [[7, -1]]
        done, _ = self.steps(both, [[7, 7]] * 2, [[0.85, 0.9]] * 2)
        assert done == [[1], [0]]

    def test_off_rows_do_not_commit(self):
        off = R2Settings(window=None, temporal_steps=None)
        done, _ = self.steps(off, [[7]] * 4, [[0.99]] * 4)
        assert done == [[], [], [], []]


def test_streak_state_widen_keeps_every_row():
    s = StreakState(2, 3)
    none, every = torch.zeros((2, 3), dtype=torch.bool), torch.ones((2, 3), dtype=torch.bool)
    s.observe(torch.tensor([4, 5]), none, every,
              torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.full((2, 3), 0.5, dtype=torch.float64))
    s.widen(4)
    assert s.ids.tolist() == [[1, 2, 3, -1], [4, 5, 6, -1]]
    assert s.count.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert s.conf_sum.tolist() == [[0.5, 0.5, 0.5, 0.0]] * 2
    assert s.block.tolist() == [4, 5]


def test_mixed_batch_equals_rows_alone():
    settings = [
        SPATIAL,
        R2Settings(token_cluster="random", temporal_steps=2, aggregation="ave"),
        R2Settings(window=2, token_cluster="mid", unmasked_limit=None, aggregation="max"),
        TEMPORAL,
        None,
    ]
    b, k = len(settings), 8
    block_lengths = [8, 8, 6, 8, 4]
    g = torch.Generator().manual_seed(0)
    conf = torch.rand((b, k), generator=g, dtype=torch.float64) ** 0.3
    conf[torch.arange(k) >= torch.tensor(block_lengths)[:, None]] = NO
    batch_streaks = StreakState(b, k)
    alone_streaks = [StreakState(1, k) for _ in range(b)]
    fired = torch.zeros((b, k), dtype=torch.bool)
    top_ids = torch.randint(0, 3, (b, k), generator=g)
    for step in range(5):
        # Top-1 ids that mostly hold, so streaks and runs both occur.
        change = torch.rand((b, k), generator=g) < 0.2
        top_ids = torch.where(change, torch.randint(0, 3, (b, k), generator=g), top_ids)
        top_conf = torch.rand((b, k), generator=g, dtype=torch.float64) ** 0.2
        base = torch.zeros((b, k), dtype=torch.bool)
        base[:, step] = conf[:, step] > NO
        u = torch.rand((b, k), generator=g, dtype=torch.float64)
        tokens = torch.randint(0, 50, (b, k), generator=g)
        args = dict(tokens=tokens, top_ids=top_ids, top_conf=top_conf, base=base, uniforms=u)
        commit, out = apply_r2(R2Batch.build(settings), batch_streaks, base, tokens, conf, top_ids, top_conf,
                               torch.tensor(block_lengths), torch.zeros(b, dtype=torch.long), u)
        for r in range(b):
            one = {name: value[r : r + 1] for name, value in args.items()}
            c1, o1 = apply_r2(R2Batch.build([settings[r]]), alone_streaks[r], one["base"],
                              one["tokens"], conf[r : r + 1], one["top_ids"], one["top_conf"],
                              torch.tensor([block_lengths[r]]), torch.zeros(1, dtype=torch.long),
                              one["uniforms"])
            assert torch.equal(commit[r], c1[0]) and torch.equal(out[r][commit[r]], o1[0][c1[0]]), (step, r)
        fired |= commit & ~base
        conf = torch.where(commit, NO, conf)
    assert not fired[4].any()
    assert fired[:4].any(1).all()  # every R² row used some extra rule


def reference_step(s: R2Settings, masked: list[bool], base: list[bool], conf: list[float], top_ids: list[int],
                   top_conf: list[float], streak: dict) -> list[bool]:
    """R²-dLLM's `_run_window_sweep`, `_apply_temporal_consistency` and `maybe_auto_confirm`
    (llada/generate.py) for one row, transcribed loop for loop; returns the final commits."""
    k = len(masked)
    now = [m and not c for m, c in zip(masked, base)]  # still a mask after the policy
    if s.spatial:
        decode = [False] * k
        for a in range(k - s.window + 1):
            win = range(a, a + s.window)
            if s.unmasked_limit is not None and sum(not now[j] for j in win) > s.unmasked_limit:
                continue
            js = [j for j in win if now[j]]
            if js and sum(conf[j] for j in js) / len(js) >= s.spatial_threshold:
                for j in js:
                    decode[j] = True
        now = [n and not d for n, d in zip(now, decode)]
    if s.spatial and s.token_cluster is not None:
        pos = 0
        while pos < k:
            if not now[pos]:
                pos += 1
                continue
            start, pos = pos, pos + 1
            while pos < k and now[pos] and top_ids[pos] == top_ids[start]:
                pos += 1
            if pos - start < 2:
                continue
            run = top_conf[start:pos]
            if max(run) <= s.spatial_threshold:
                continue
            pick = run.index(max(run)) if s.token_cluster == "confidence" else (pos - start) // 2
            now[start + pick] = False
    if s.temporal:
        for j in range(k):
            if masked[j] and not now[j]:
                streak["count"][j], streak["sum"][j], streak["id"][j], streak["max"][j] = 0, 0.0, -1, 0.0
            elif now[j]:
                if streak["id"][j] == top_ids[j]:
                    streak["count"][j] += 1
                    streak["sum"][j] += top_conf[j]
                    streak["max"][j] = max(streak["max"][j], top_conf[j])
                else:
                    streak["count"][j], streak["sum"][j] = 1, top_conf[j]
                    streak["id"][j], streak["max"][j] = top_ids[j], top_conf[j]
                value = {"last": top_conf[j], "ave": streak["sum"][j] / streak["count"][j],
                         "max": streak["max"][j]}[s.aggregation]
                if streak["count"][j] >= s.temporal_steps and value >= s.temporal_threshold:
                    now[j] = False
                    streak["count"][j], streak["sum"][j], streak["id"][j], streak["max"][j] = 0, 0.0, -1, 0.0
    return [m and not n for m, n in zip(masked, now)]


@pytest.mark.parametrize("settings", [
    R2Settings(),
    R2Settings(token_cluster="mid", aggregation="ave", unmasked_limit=None),
    R2Settings(window=4, spatial_threshold=0.7, unmasked_limit=2, temporal_steps=2, aggregation="max"),
    R2Settings(spatial_threshold=0.95, temporal_steps=2, temporal_threshold=0.7, aggregation="ave"),
    R2Settings(window=None, temporal_steps=2, temporal_threshold=0.6),
])
def test_matches_reference_loops(settings):
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        k = 8
        masked = torch.ones(k, dtype=torch.bool)
        streaks = StreakState(1, k)
        ref_streak = {"count": [0] * k, "sum": [0.0] * k, "id": [-1] * k, "max": [0.0] * k}
        top_ids = torch.randint(0, 2, (k,), generator=g)
        while masked.any():
            change = torch.rand(k, generator=g) < 0.3
            top_ids = torch.where(change, torch.randint(0, 2, (k,), generator=g), top_ids)
            top_conf = torch.rand(k, generator=g, dtype=torch.float64) ** 0.3
            conf = torch.where(masked, torch.rand(k, generator=g, dtype=torch.float64) ** 0.3, NO)
            base = torch.zeros(k, dtype=torch.bool)
            base[int(torch.where(masked, conf, -1.0).argmax())] = True
            commit, _ = run([settings], conf, base=base, top_ids=top_ids, top_conf=top_conf, streaks=streaks)
            expected = reference_step(settings, masked.tolist(), base.tolist(), conf.tolist(),
                                      top_ids.tolist(), top_conf.tolist(), ref_streak)
            assert commit[0].tolist() == expected
            masked &= ~commit[0]
