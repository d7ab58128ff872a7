"""The plugin's decoding core driven by a reference model, the way the model runner drives
it, without vLLM: what token-exact tests, bf16 checks and `benchmarks.gpu_check` run.

Each iteration computes, per request, the window `RequestState.recompute_range` says
(under `cache=none` a full forward; under `prefix` / `dual` the reference model's
`forward_partial` over the window against the K/V the request's last pass left, as
vLLM's pages hold them), takes the logits of the masked positions of its current
block and runs one batched `DenoiseBatch.step`.
"""

import itertools

import torch

from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.batch import DenoiseBatch, SpecialTokens
from vllm_dllm.sampling.state import RequestState
from vllm_dllm.sampling.token_filters import TokenFilters


class CoreDriver:
    """Runs the core the way the model runner does, with the reference model's logits
    (computed where the model's weights are; the core runs on `device`)."""

    def __init__(self, model, mask_id: int, device: str | torch.device, max_rows: int = 2,
                 eos: int = -1, logits_offset: int = 0):
        self.model, self.mask_id, self.device = model, mask_id, device
        self.logits_offset = logits_offset
        self.batch = DenoiseBatch(max_rows, 256, SpecialTokens(mask_id, eos=eos, eot=None), device)
        self.states: dict[str, tuple[RequestState, list[int]]] = {}
        # Per request, the per-layer K/V its last pass left (the pages' contents).
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: str, prompt: list[int], params: DllmParams, temperature: float, seed: int,
            token_filters: TokenFilters | None = None, top_p: float = 1.0, top_k: int = 0
            ) -> None:
        assert params.skip == "none", "token skipping runs in the model (vLLM's runner)"
        row = self.batch.add(prompt, params, temperature, seed, top_p, top_k, token_filters)
        self.states[key] = (RequestState(len(prompt), params, self.mask_id, row,
                                         self.logits_offset), prompt)

    def _logits(self, key: str, state: RequestState, prompt: list[int]) -> torch.Tensor:
        """[sequence, V] logits of the request's window (zeros elsewhere)."""
        device = self.model.weights[next(iter(self.model.weights))].device
        x = torch.tensor(prompt + state.canvas, device=device)
        if state.params.cache == "none":
            return self.model(x)
        lo, hi = state.recompute_range()
        if lo == 0 and hi == len(x):
            logits, self.kv[key] = self.model.forward_partial(x, torch.arange(len(x), device=device))
            return logits
        window, self.kv[key] = self.model.forward_partial(x, torch.arange(lo, hi, device=device),
                                                          self.kv[key])
        logits = window.new_zeros(len(x), window.shape[-1])
        logits[lo:hi] = window
        return logits

    def iterate(self, keys: list[str]) -> None:
        states = [self.states[k][0] for k in keys]
        masked = [s.masked_columns() for s in states]
        request = torch.repeat_interleave(torch.arange(len(keys)),
                                          torch.tensor([len(m) for m in masked]))
        column = torch.tensor([c for m in masked for c in m], dtype=torch.long)
        rows = []
        for key, (state, prompt), cols in zip(keys, (self.states[k] for k in keys), masked):
            logits = self._logits(key, state, prompt)
            rows.append(logits[[state.prompt_len + state.block_start + c - self.logits_offset
                                for c in cols]])
        plan = self.batch.plan([s.row for s in states], request, column)
        packed = self.batch.step(plan, torch.cat(rows).to(self.device)).tolist()
        for state, p in zip(states, packed):
            state.apply(p)
        for key, state in zip(keys, states):
            if state.finished:
                self.batch.remove(state.row)
                self.kv.pop(key, None)

    def run(self, arrivals: dict[int, list[tuple]] | None = None) -> dict[str, list[int]]:
        """Decode until every request finished; `arrivals[i]` join before iteration i."""
        arrivals = arrivals or {}
        for i in itertools.count():
            for args in arrivals.get(i, []):
                self.add(*args)
            active = [k for k, (s, _) in self.states.items() if not s.finished]
            if not active and i >= max(arrivals, default=0):
                return {k: s.canvas for k, (s, _) in self.states.items()}
            if active:
                self.iterate(active)
