"""Different layers computing different rows in one forward, on vLLM's pages, vs the reference."""

import torch

from tests.helpers import random_prompt
from vllm_dllm.engine.query_batch import build_query_batch


def _forward_plans(worker, sequences, plans, block_ids, asked):
    """Runs one forward pass on the engine's own runner and pages; logits at `asked`."""
    runner = worker.model_runner
    batch = build_query_batch(sequences, plans, block_ids, runner.cache_config.block_size,
                              runner.device)
    with torch.inference_mode():
        hidden = runner.forward_query_batch(batch)
        rows = torch.cat([batch.output_rows(i, p) for i, p in enumerate(asked)])
        return runner.model.compute_logits(hidden[rows.to(runner.device)]).float().cpu()


def test_per_layer_query_sets_match_reference(inproc, reference):
    llm, _ = inproc
    first = [torch.tensor(random_prompt(11, 40)), torch.tensor(random_prompt(12, 30))]
    # Pages no running request holds (the engine is idle): non-contiguous, different orders.
    block_ids = [[5, 2], [3, 7]]
    full = [torch.arange(40), torch.arange(30)]
    llm.collective_rpc(_forward_plans, args=(first, [[(0, f)] for f in full], block_ids, full))

    # Some canvas tokens change, as commits would; request 0 recomputes 24..39 in layer 0
    # but only four of those rows in layer 1; request 1 recomputes 20..29 in both.
    second = [first[0].clone(), first[1].clone()]
    second[0][[26, 31, 38]] = torch.tensor([7, 8, 9])
    second[1][[21, 25]] = torch.tensor([10, 11])
    subset = torch.tensor([24, 27, 31, 39])
    plans = [[(0, torch.arange(24, 40)), (1, subset)], [(0, torch.arange(20, 30))]]
    asked = [torch.tensor([27, 39]), torch.tensor([20, 25, 29])]
    (got,) = llm.collective_rpc(_forward_plans, args=(second, plans, block_ids, asked))

    expected, uniform = [], []
    for seq_before, seq, plan, want in zip(first, second, plans, asked):
        _, past = reference.forward_partial(seq_before, torch.arange(len(seq_before)))
        queries = [plan[-1][1] if len(plan) > 1 and layer >= plan[1][0] else plan[0][1]
                   for layer in range(reference.n_layers)]
        logits, _ = reference.forward_partial(seq, queries, past)
        expected.append(logits[torch.searchsorted(queries[-1], want)])
        logits, _ = reference.forward_partial(seq, plan[0][1], past)
        uniform.append(logits[torch.searchsorted(plan[0][1], want)])
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-4, rtol=1e-4)
    # The skipped rows really were skipped: computing them in layer 1 changes the result.
    assert not torch.allclose(got[:2], uniform[0], atol=1e-3)
