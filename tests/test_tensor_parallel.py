"""Tensor parallelism: TP=2 decodes the tokens TP=1 does, under vLLM's multiprocessing
executor and under its Ray executor; pipeline parallelism is refused at start-up.

The tiny model's 2 heads give each rank one head (its own QKV, MLP and attention
shards, K/V pages of one head) and its 104-token vocabulary is split 64 + 40 (the
second shard padded), so every sharded layer and the all-gathered logits are in
play. TP=1 is the session's `llm` engine, which other tests check against the
reference. vLLM's CPU platform needs each rank bound to its own cores
(`VLLM_CPU_OMP_THREADS_BIND`), else it fails a NUMA assertion.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import inproc_engine, plugin_tokens, random_prompt, shutdown
from tests.ray_platform import install as install_ray_platform

ROOT = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(len(CPUS) < 2, reason="TP=2 on CPU binds each rank to a core")]
BIND = "|".join(str(c) for c in CPUS[:2])

SHAPES = [(32, 8, 16), (64, 16, 64)]
POLICIES = [{"policy": "fixed"}, {"policy": "threshold", "threshold": 0.5}]
CASES = [
    dict(prompt=random_prompt(700 + i, [2, 11, 29, 57][i % 4]), gen_length=g, block_length=b,
         steps=s, cache=cache, temperature=t, seed=i, **policy)
    for i, ((g, b, s), cache, policy, t) in enumerate(
        itertools.product(SHAPES, ("none", "prefix", "dual"), POLICIES, (0.0, 0.7)))
]
# Token skipping: DyLLM's similarity test must pick the same rows on both ranks.
CASES += [
    dict(prompt=random_prompt(760 + i, 7 + 9 * i), gen_length=32, block_length=8, steps=32,
         cache=cache, temperature=t, seed=40 + i, policy="fixed", skip=skip,
         **({"dyllm_full_steps": 1} if skip == "dyllm" else {}))
    for i, (skip, cache, t) in enumerate(
        itertools.product(("es", "dyllm"), ("none", "dual"), (0.0, 0.7)))
]
EXTRA_KEYS = ("gen_length", "block_length", "steps", "cache", "policy", "threshold", "skip",
              "dyllm_full_steps")


def sampling(case: dict) -> dict:
    return dict(temperature=case["temperature"], seed=case["seed"],
                max_tokens=case["gen_length"],
                extra_args={k: case[k] for k in EXTRA_KEYS if k in case})


def params_of(case: dict):
    from vllm import SamplingParams

    return SamplingParams(**sampling(case))


@pytest.fixture(scope="module")
def tp1_tokens(llm) -> list[list[int]]:
    return plugin_tokens(llm, CASES, params_of, batched=True)


@pytest.fixture(scope="module")
def tp2(tiny_model):
    """TP=2 with the multiprocessing executor; the engine core runs here so tests can step it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_CPU_OMP_THREADS_BIND", BIND)
    try:
        llm, _ = inproc_engine(tiny_model, max_model_len=512, max_num_seqs=64,
                               tensor_parallel_size=2)
    finally:
        mp.undo()
    yield llm
    shutdown(llm)


def test_cases_cover_the_matrix():
    configs = {(c["cache"], c["policy"], c["temperature"] > 0) for c in CASES}
    assert len(configs) == 3 * 2 * 2


def test_tp2_equals_tp1(tp2, tp1_tokens):
    got = plugin_tokens(tp2, CASES, params_of, batched=True)
    assert [i for i in range(len(CASES)) if got[i] != tp1_tokens[i]] == []
    assert all(tp1_tokens)


def _canvases(worker) -> dict[str, list[int]]:
    runner = worker.model_runner
    return {req_id: runner.batch.tokens[state.row].tolist()
            for req_id, state in runner.requests.items()}


def test_ranks_commit_the_same_tokens_unseeded(tp2, tiny_model):
    """Every rank decodes the all-gathered logits itself; an unseeded sampled request must
    still commit the same tokens on every rank, or the ranks' inputs (and K/V shards) part."""
    from vllm import SamplingParams

    mask = json.loads((tiny_model / "config.json").read_text())["mask_token_id"]
    engine = tp2.llm_engine
    for i in range(4):
        engine.add_request(f"unseeded-{i}", {"prompt_token_ids": random_prompt(800 + i, 7)},
                           SamplingParams(temperature=1.0, max_tokens=64, extra_args={
                               "gen_length": 64, "block_length": 32, "steps": 64,
                               "cache": ["none", "dual"][i % 2]}))
    for _ in range(12):
        engine.step()
    ranks = tp2.collective_rpc(_canvases)
    while engine.has_unfinished_requests():
        engine.step()
    assert len(ranks) == 2 and len(ranks[0]) == 4
    assert ranks[0] == ranks[1]
    # Twelve iterations commit twelve tokens per request: the comparison covers sampled tokens.
    assert all(canvas[7:71].count(mask) == 64 - 12 for canvas in ranks[0].values())


def test_pipeline_parallel_is_refused_at_start(tiny_model):
    from vllm import LLM

    with pytest.raises(ValueError, match="do not support pipeline parallelism"):
        LLM(model=str(tiny_model), max_model_len=512, pipeline_parallel_size=2)


def test_ray_executor_tp2_equals_tp1(tiny_model, tp1_tokens, tmp_path):
    """vLLM's Ray executor (RayExecutorV2, its default) with two Ray actors as ranks, on the
    test platform of `tests/ray_platform`, activated through vLLM's platform entry point."""
    site = install_ray_platform(tmp_path / "site")
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"prompt": c["prompt"], "sampling": sampling(c)}
                                 for c in CASES]))
    out = tmp_path / "out.json"
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": BIND, "RAY_USAGE_STATS_ENABLED": "0",
           # Ray kills workers when the node nears full memory; the suite shares it.
           "RAY_memory_monitor_refresh_ms": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    # Else it overrides generate.py's `kv_cache_memory_bytes`.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    run = subprocess.run(
        [sys.executable, "-m", "tests.ray_platform.generate", str(tiny_model), str(cases),
         str(out), "--tp", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "ray.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, f"{tmp_path / 'ray.log'}:\n" + run.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["executor"] == "RayExecutorV2"
    ranks = result["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert {(r["platform"], r["worker"], r["runner"]) for r in ranks} == {
        ("RayCpuPlatform", "DllmWorker", "DllmModelRunner")}
    assert len({r["actor"] for r in ranks}) == 2 and None not in {r["actor"] for r in ranks}
    assert [i for i in range(len(CASES)) if result["tokens"][i] != tp1_tokens[i]] == []
