"""The scheduler charges each request the rows it really recomputes in an iteration."""

import pytest
from vllm import SamplingParams

from tests.helpers import random_prompt, run_to_completion


def scheduled_rows(llm, cache: str) -> list[int]:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen: list[int] = []
    original = scheduler.schedule

    def schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.extend(out.num_scheduled_tokens.values())
        return out

    scheduler.schedule = schedule
    try:
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, extra_args={
            "gen_length": 32, "block_length": 8, "steps": 32, "cache": cache})
        run_to_completion(llm, {0: [(f"budget-{cache}", random_prompt(5, 10), params)]})
    finally:
        scheduler.schedule = original
    return seen


@pytest.mark.parametrize("cache, after_refresh", [
    ("none", lambda block: 42),
    ("prefix", lambda block: 42 - 10 - 8 * block),
    ("dual", lambda block: 8),
])
def test_rows_charged_follow_the_cache_mode(inproc, cache, after_refresh):
    llm, _ = inproc
    # 10-token prompt, 4 blocks of 8, one token per iteration: a full pass opens each block.
    want = [r for block in range(4) for r in [42] + [after_refresh(block)] * 7]
    assert scheduled_rows(llm, cache) == want
