"""Shared pieces of the integration tests."""

import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dllm_reference.generate import generate
from dllm_reference.tiny_dream import special_ids


def model_ids(model_dir: Path) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {"mask": config["mask_token_id"], "eos": config["eos_token_id"],
            "eot": config["eot_token_id"]}


def shutdown(llm) -> None:
    """Stop an engine now, not at interpreter exit after pytest's summary. An engine core
    in this process frees only its own executor and scheduler: vLLM's
    `EngineCore.shutdown` would also tear down the process's distributed state, which
    the suite's other in-process engines still use."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        client.shutdown()
        return
    # Its finalizer would run the full shutdown when the client is collected.
    client._finalizer.detach()
    core.model_executor.shutdown()
    core.scheduler.shutdown()
    # EngineCore freezes what it allocated at start-up; the collector may free it now.
    gc.unfreeze()


def random_prompt(seed: int, length: int, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (length,), generator=g).tolist()


def cut_after_end(tokens: list[int], ends: tuple[int, ...]) -> list[int]:
    """What the plugin returns of a canvas: up to and including the first end token."""
    for i, t in enumerate(tokens):
        if t in ends:
            return tokens[: i + 1]
    return tokens


def reference_tokens(reference, model_dir: Path, prompt: list[int], *, stop_at_end: bool = True,
                     **params) -> list[int]:
    """What the plugin must return: the reference canvas, cut after the first end token."""
    ids = model_ids(model_dir)
    tokens = generate(reference, prompt, mask_id=ids["mask"], **params)["tokens"]
    return cut_after_end(tokens, (ids["eos"], ids["eot"])) if stop_at_end else tokens


# Dream: `<|mask|>`, `<|endoftext|>`, `<|im_end|>` of its tokenizer.
DREAM_MASK, DREAM_EOS, DREAM_EOT = (special_ids()[k] for k in ("mask", "eos", "eot"))
# The vocabulary of the tiny Dreams the decoding tests run (no tokenizer, the last three
# ids special): a 151k-wide head and float64 softmax would cost those tests the most.
SMALL_VOCAB = 512
SMALL = special_ids(SMALL_VOCAB)
# The request keys the Dream tests pass through `extra_args` when a case has them.
DREAM_EXTRA_ARGS = ("gen_length", "block_length", "steps", "alg", "alg_temp", "cache", "policy",
                    "threshold", "frechet_delta", "refresh_period", "skip", "es_keep",
                    "es_depth", "es_block_update_freq", "dyllm_threshold",
                    "dyllm_full_steps", "dyllm_query_period", "dyllm_attention")


def dream_prompt(seed: int, length: int, below: int = DREAM_EOS) -> list[int]:
    """Random ordinary tokens (below the special ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, below, (length,), generator=g).tolist()


def dream_cut(tokens: list[int]) -> list[int]:
    return cut_after_end(tokens, (DREAM_EOS, DREAM_EOT))


def small_prompt(seed: int, length: int) -> list[int]:
    """`dream_prompt` for a small-vocabulary Dream."""
    return dream_prompt(seed, length, below=SMALL["eos"])


def small_cut(tokens: list[int]) -> list[int]:
    return cut_after_end(tokens, (SMALL["eos"], SMALL["eot"]))


def dream_sampling_params(case: dict):
    """A Dream test case (prompt, sampling fields and extra_args keys) as SamplingParams."""
    from vllm import SamplingParams

    return SamplingParams(temperature=case["temperature"], seed=case["seed"],
                          top_p=case.get("top_p", 1.0), top_k=case.get("top_k", 0),
                          max_tokens=case["gen_length"],
                          extra_args={k: case[k] for k in DREAM_EXTRA_ARGS if k in case})


def dream_engine(model_dir: Path):
    """An in-process engine on a random Dream, with a small KV cache (token skipping
    sizes its per-slot caches by it); one with a small vocabulary has no tokenizer."""
    llm, _ = inproc_engine(model_dir, max_model_len=256, max_num_seqs=32,
                           kv_cache_memory_bytes=32 << 20,
                           skip_tokenizer_init=not (Path(model_dir) / "vocab.json").is_file())
    return llm


class ScheduleRecorder:
    """Wraps an in-process engine's scheduler and records every iteration it plans."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.steps: list[dict] = []
        original = self.scheduler.schedule

        def schedule(*args, **kwargs):
            out = original(*args, **kwargs)
            self.steps.append({
                "scheduled": {
                    self._external(rid): self.scheduler.requests[rid].num_output_tokens
                    for rid in out.num_scheduled_tokens},
                "preempted": {self._external(rid) for rid in out.preempted_req_ids or ()},
            })
            return out

        self.scheduler.schedule = schedule
        # Per iteration and request: (rows the scheduler charged, rows the runner computed).
        self.charges: list[dict[str, tuple[int, int]]] = []
        update = self.scheduler.update_from_output

        def update_from_output(scheduler_output, runner_output):
            self.charges.append({
                self._external(rid): (scheduler_output.num_scheduled_tokens[rid], rows)
                for rid, rows in getattr(runner_output, "dllm_rows", {}).items()})
            return update(scheduler_output, runner_output)

        self.scheduler.update_from_output = update_from_output

    @staticmethod
    def _external(request_id: str) -> str:
        # vLLM appends "-<8 random chars>" to the id a caller gives.
        return request_id.rsplit("-", 1)[0]

    def mischarged(self) -> list[tuple[int, str, int, int]]:
        """(iteration, request, charged, computed) wherever the two differ."""
        return [(i, rid, charged, rows) for i, step in enumerate(self.charges)
                for rid, (charged, rows) in step.items() if charged != rows]

    def iterations(self, request_id: str) -> int:
        return sum(request_id in s["scheduled"] for s in self.steps)


class SyncCounter:
    """Counts calls that read a tensor's value back to the host."""

    NAMES = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__",
             "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                self.calls.append(_name)
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, wrapper)
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (self.calls.append("nonzero"),
                                                                original_nonzero(*a, **k))[1])


def run_to_completion(llm, arrivals: dict[int, list[tuple]], max_steps: int = 2000) -> dict:
    """Step the engine by hand; `arrivals[i]` are (request_id, prompt, params[, priority])
    added before step i. Returns the final token ids per request."""
    engine = llm.llm_engine
    done: dict[str, list[int]] = {}
    for step in range(max_steps):
        for arrival in arrivals.get(step, []):
            request_id, prompt, params, *priority = arrival
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params,
                               priority=priority[0] if priority else 0)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        if not engine.has_unfinished_requests() and step >= max(arrivals):
            return done
    raise AssertionError("engine did not finish")


# The references decode the bundled and tiny float32 checkpoints in float32; vLLM's default
# (`--dtype auto`) would cast them to bfloat16, on CPU as on GPU.
REFERENCE_DTYPE = "float32"


def inproc_engine(model, **kwargs):
    """An LLM whose engine core runs in this process, so tests can watch its scheduler."""
    from vllm import LLM, envs

    kwargs.setdefault("dtype", REFERENCE_DTYPE)
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # An engine core caches vLLM's environment variables when it starts; each engine
    # here reads them afresh (the tensor-parallel one sets its own thread binding).
    envs.disable_envs_cache()
    try:
        llm = LLM(model=str(model), **kwargs)
    finally:
        mp.undo()
        envs.disable_envs_cache()
    return llm, ScheduleRecorder(llm)


def plugin_tokens(llm, cases: list[dict], params_of, *, batched: bool) -> list[list[int]]:
    """The plugin's tokens for each case: all in one `generate` call, or one call per case."""
    prompts = [{"prompt_token_ids": c["prompt"]} for c in cases]
    params = [params_of(c) for c in cases]
    if batched:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    else:
        outputs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    return [list(o.outputs[0].token_ids) for o in outputs]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: list[str], log_path: Path, env: dict | None = None,
                 timeout: float = 240):
    """`vllm serve model args` on a free loopback port, in float32 unless `args` name a
    `--dtype`; returns (process, base URL) once /health answers."""
    import os
    import subprocess
    import sys
    import time

    import requests

    if "--dtype" not in args:
        args = [*args, "--dtype", REFERENCE_DTYPE]
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
         "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=env if env is not None else {**os.environ})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, open(log_path).read()[-3000:]
        try:
            if requests.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except requests.ConnectionError:
            pass
        time.sleep(1)
    proc.terminate()
    pytest.fail("server did not start:\n" + open(log_path).read()[-3000:])


# A separate process: vLLM's distributed state is global, and the in-process engines
# of other tests set it up their own way.
_COUNT_PARAMETERS = textwrap.dedent("""
    import json, sys, torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.utils.torch_utils import set_default_torch_dtype

    folder, port, layers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    out = {}
    for n in layers:
        config = EngineArgs(model=folder, load_format="dummy", skip_tokenizer_init=True,
                            max_model_len=2048,
                            hf_overrides={"num_hidden_layers": n}).create_engine_config()
        with set_current_vllm_config(config):
            if not out:
                init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
                ensure_model_parallel_initialized(1, 1)
            loader = get_model_loader(config.load_config)
            # On the meta device: the shapes are real, the 7B of memory is not.
            with set_default_torch_dtype(config.model_config.dtype), torch.device("meta"):
                model = loader.create_model(vllm_config=config, model_config=config.model_config)
                loader.load_weights(model, config.model_config)
        out[n] = {"class": type(model).__name__, "offset": model.dllm_logits_offset,
                  "params": {k: v.numel() for k, v in model.named_parameters()}}
    print("RESULT " + json.dumps(out))
""")


def dummy_model_parameters(folder: Path, layers: list[int]) -> dict[int, dict]:
    """Per layer count n: the model class vLLM builds from `folder`'s config.json with n
    layers (`hf_overrides`, load_format=dummy, on the meta device), its logits offset and
    its parameters' sizes by name."""
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_PARAMETERS, str(folder), str(free_port()),
         json.dumps(layers)],
        capture_output=True, text=True, timeout=300, env={**os.environ})
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return {int(k): v for k, v in json.loads(line[0][len("RESULT "):]).items()}
