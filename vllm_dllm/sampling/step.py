"""One denoising iteration for a whole batch of requests."""

from dataclasses import dataclass

import torch

from vllm_dllm.sampling.eos import eos_eot_confidence, suppress_eos_logits
from vllm_dllm.sampling import noise
from vllm_dllm.sampling.policies import PolicyBatch, select
from vllm_dllm.sampling.r2 import R2Batch, StreakState, apply_r2
from vllm_dllm.sampling.schedule import transfer_counts
from vllm_dllm.sampling.state import DenoiseState


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    eos: int
    eot: int | None


class Denoiser:
    """Turns each iteration's logits into commits, for whichever requests are in the batch.

    It keeps R²'s per-position streaks between iterations, keyed by request id,
    so requests may join, leave or sit out an iteration.
    """

    def __init__(self, special: SpecialTokens):
        self.special = special
        self.streaks = StreakState(0, 0)
        self.streak_keys: list[str] = []

    def forget(self, key: str) -> None:
        """Drop a finished request's streak row at the next iteration."""
        if key in self.streak_keys:
            self.streak_keys[self.streak_keys.index(key)] = ""

    def step(self, keys: list[str], states: list[DenoiseState], positions: list[torch.Tensor],
             logits: torch.Tensor) -> None:
        """Choose tokens for the masked positions of each request's block and commit some.

        `positions[b]` are the canvas positions of request `keys[b]` whose
        predictions are in `logits`, rows concatenated in request order
        ([sum(len(p)), V]).
        """
        special = self.special
        # A committed mask would stay masked: the mask id is never a prediction.
        logits = logits.float().index_fill(
            -1, torch.tensor([special.mask], device=logits.device), float("-inf"))
        row_counts = [len(p) for p in positions]
        request_of_row = torch.arange(len(states), device=logits.device).repeat_interleave(
            torch.tensor(row_counts, device=logits.device))
        no_eos = torch.tensor([s.params.logits_eos_inf for s in states], device=logits.device)
        if bool(no_eos.any()):
            rows = no_eos[request_of_row]
            logits[rows] = suppress_eos_logits(logits[rows], special.eos)

        top_ids = logits.argmax(-1)
        log_norm = torch.logsumexp(logits.double(), -1)

        def probability(rows, ids: torch.Tensor) -> torch.Tensor:
            """float64 softmax probability of `ids` in the logits `rows`."""
            return (logits[rows].gather(-1, ids[:, None]).squeeze(-1).double()
                    - log_norm[rows]).exp()

        top_conf = probability(slice(None), top_ids)
        x0 = top_ids.clone()
        confidence = top_conf.clone()
        rows_of = torch.split(torch.arange(logits.shape[0], device=logits.device), row_counts)
        for state, pos, rows in zip(states, positions, rows_of):
            rel = pos - state.block_start
            params = state.params
            seed, it = torch.tensor(state.seed), torch.tensor(state.iterations)
            if state.temperature > 0:
                u = noise.uniforms(seed, it, pos, noise.STREAM_SAMPLE)
                x0[rows] = noise.sample(logits[rows], torch.full_like(u, state.temperature), u)
                confidence[rows] = probability(rows, x0[rows])
            if params.remasking == "random":
                confidence[rows] = noise.uniforms(seed, it, pos, noise.STREAM_REMASK)
            elif params.confidence_eos_eot_inf and special.eot is not None:
                confidence[rows] = eos_eot_confidence(logits[rows], x0[rows], special.eos,
                                                      special.eot)

        width = max(s.params.block_length for s in states)
        cols = torch.cat([p - s.block_start for s, p in zip(states, positions)]).to(logits.device)

        def scatter(values: torch.Tensor, fill) -> torch.Tensor:
            out = torch.full((len(states), width), fill, dtype=values.dtype, device=logits.device)
            out[request_of_row, cols] = values
            return out

        conf_matrix = scatter(confidence, float("-inf"))
        tokens = scatter(x0, 0)
        counts = transfer_counts(
            torch.tensor([s.block_start_masked for s in states]),
            torch.tensor([s.params.steps_per_block for s in states]),
            torch.tensor([s.step_in_block for s in states]),
        ).to(logits.device)
        commit = select(conf_matrix, PolicyBatch.build(
            [s.params.policy for s in states], counts,
            [s.params.threshold for s in states], [s.params.factor for s in states],
            [s.params.frechet_delta for s in states]))

        settings = [s.params.r2_settings for s in states]
        if any(settings):
            commit, tokens = self._apply_r2(keys, states, settings, commit, tokens, conf_matrix,
                                            scatter(top_ids, 0), scatter(top_conf, 0.0), width)
        commit, tokens = commit.cpu(), tokens.cpu()
        for b, state in enumerate(states):
            cols_b = torch.nonzero(commit[b]).flatten()
            state.commit(cols_b + state.block_start, tokens[b, cols_b])

    def _apply_r2(self, keys, states, settings, commit, tokens, conf_matrix, top_ids, top_conf,
                  width):
        device = conf_matrix.device
        previous = {k: i for i, k in enumerate(self.streak_keys) if k}
        self.streaks.reorder(torch.tensor([previous.get(k, -1) for k in keys], dtype=torch.long),
                             width)
        self.streak_keys = list(keys)
        uniforms = None
        random_mode = [s is not None and s.token_cluster == "random" for s in settings]
        if any(random_mode):
            # Only requests that use the random mode draw: the others' streams stay
            # as they would be alone.
            uniforms = torch.zeros((len(states), width), dtype=torch.float64)
            for b, (state, drawn) in enumerate(zip(states, random_mode)):
                if drawn:
                    uniforms[b, : state.params.block_length] = noise.uniforms(
                        torch.tensor(state.seed), torch.tensor(state.iterations),
                        torch.arange(state.block_start, state.block_end), noise.STREAM_TOKEN_CLUSTER)
            uniforms = uniforms.to(device)
        return apply_r2(
            R2Batch.build(settings, device), self.streaks, commit, tokens, conf_matrix,
            top_ids, top_conf,
            torch.tensor([s.params.block_length for s in states], device=device),
            torch.tensor([s.block for s in states], device=device), uniforms)
