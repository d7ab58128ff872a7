"""Decodes cases with vLLM's Ray executor at tensor parallelism N, on the test platform.

    python -m tests.ray_platform.generate MODEL CASES_JSON OUT_JSON --tp 2

Run with the folder from `tests.ray_platform.install` on PYTHONPATH, so that
vLLM picks `RayCpuPlatform` in this process and in every Ray worker. Ray is
started here with N `GPU` resources; the engine core runs in this process, so
vLLM finds Ray already initialised and places its workers in that cluster.
"""

import argparse
import json
import os
from pathlib import Path


def _rank_facts(worker) -> dict:
    """Evidence, from inside each worker, of where the rank runs."""
    import ray

    from vllm.platforms import current_platform

    worker = getattr(worker, "worker", worker)  # the executor's wrapper around it
    return {"platform": type(current_platform).__name__,
            "actor": ray.get_runtime_context().get_actor_id(),
            "worker": type(worker).__name__, "runner": type(worker.model_runner).__name__,
            "rank": worker.rank}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("cases", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=2, num_gpus=args.tp, include_dashboard=False,
             object_store_memory=256 * 2**20)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from tests.helpers import REFERENCE_DTYPE

    # The suite's engine's dtype: the tokens are compared with it. 64 MiB of K/V per
    # rank hold every case at once (the tiny model needs 16 MiB for 64 x 512 tokens); the
    # suite's GiB would take two of what its neighbours on the node need.
    llm = LLM(model=args.model, max_model_len=512, max_num_seqs=64, dtype=REFERENCE_DTYPE,
              kv_cache_memory_bytes=64 * 2**20, tensor_parallel_size=args.tp,
              distributed_executor_backend="ray")
    try:
        cases = json.loads(args.cases.read_text())
        outputs = llm.generate(
            [{"prompt_token_ids": c["prompt"]} for c in cases],
            [SamplingParams(**c["sampling"]) for c in cases], use_tqdm=False)
        args.out.write_text(json.dumps({
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "ranks": llm.collective_rpc(_rank_facts),
            "executor": type(llm.llm_engine.engine_core.engine_core.model_executor).__name__,
        }))
    finally:
        llm.llm_engine.engine_core.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
