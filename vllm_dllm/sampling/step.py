"""One denoising iteration for a whole batch of requests."""

import torch

from vllm_dllm.sampling.noise import block_uniforms, gumbel_argmax, random_scores
from vllm_dllm.sampling.policies import select_fixed
from vllm_dllm.sampling.schedule import transfer_counts
from vllm_dllm.sampling.state import DenoiseState


def denoise_step(states: list[DenoiseState], positions: list[torch.Tensor], logits: torch.Tensor) -> None:
    """Choose tokens for the masked positions of each request's block and commit some.

    `positions[b]` are the canvas positions of request b whose predictions are
    in `logits`, rows concatenated in request order ([sum(len(p)), V]).
    """
    # A committed mask would stay masked: the mask id is never a prediction.
    logits = logits.float().index_fill(-1, torch.tensor([states[0].mask_id], device=logits.device),
                                       float("-inf"))
    x0 = logits.argmax(-1)
    log_norm = torch.logsumexp(logits.double(), -1)
    rows_of = torch.split(torch.arange(logits.shape[0], device=logits.device),
                          [len(p) for p in positions])
    confidence_rows = []
    for state, pos, rows in zip(states, positions, rows_of):
        rel = pos - state.block_start
        if state.temperature > 0:
            u = block_uniforms(state.generator, state.params.block_length, logits.shape[-1])
            x0[rows] = gumbel_argmax(logits[rows], u[rel].to(logits.device), state.temperature)
        if state.params.remasking == "random":
            scores = random_scores(state.generator, state.params.block_length)
            confidence_rows.append(scores[rel].to(logits.device))
        else:
            chosen = logits[rows].gather(-1, x0[rows, None]).squeeze(-1).double()
            confidence_rows.append((chosen - log_norm[rows]).exp())

    width = max(s.params.block_length for s in states)
    batch = torch.arange(len(states)).repeat_interleave(torch.tensor([len(p) for p in positions]))
    cols = torch.cat([p - s.block_start for s, p in zip(states, positions)])
    confidence = torch.full((len(states), width), float("-inf"), dtype=torch.float64)
    confidence[batch, cols] = torch.cat(confidence_rows).cpu()
    tokens = torch.zeros((len(states), width), dtype=torch.long)
    tokens[batch, cols] = x0.cpu()

    counts = transfer_counts(
        torch.tensor([s.block_start_masked for s in states]),
        torch.tensor([s.params.steps_per_block for s in states]),
        torch.tensor([s.step_in_block for s in states]),
    )
    commit = select_fixed(confidence, counts)
    for b, state in enumerate(states):
        cols_b = torch.nonzero(commit[b]).flatten()
        state.commit(cols_b + state.block_start, tokens[b, cols_b])
