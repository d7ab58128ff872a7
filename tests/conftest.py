import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Keep each engine's KV cache small so several fit beside each other.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from dllm_reference.tiny_llada import write_random_model  # noqa: E402
from tests.helpers import inproc_engine, shutdown, start_server  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts an engine, a server or a training run "
                                       "(`make test-fast` leaves these out)")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: reference work row by row over Dream's 151k
    vocabulary, where OpenMP threads waiting for each other on a shared CPU cost more
    than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random LLaDA in the original checkpoint format."""
    return write_random_model(tmp_path_factory.mktemp("llada-tiny"), seed=0)


@pytest.fixture(scope="session")
def reference(tiny_model):
    from dllm_reference.modeling import ReferenceLLaDA

    return ReferenceLLaDA.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def llm(tiny_model):
    """One multiprocess vLLM engine on the tiny model, shared by the token-exact tests."""
    from vllm import LLM

    engine = LLM(model=str(tiny_model), max_model_len=512, max_num_seqs=64)
    yield engine
    shutdown(engine)


@pytest.fixture(scope="session")
def inproc(tiny_model):
    """An in-process engine on the tiny model with a recorder of its schedules."""
    llm, recorder = inproc_engine(tiny_model, max_model_len=512, max_num_seqs=16)
    yield llm, recorder
    shutdown(llm)


TASKS_MODEL = ROOT / "examples" / "llada-tasks"
# 4 layers x (K, V) x 4 heads x 32 dims x fp32 = 4 KiB per token: KV room for 1024
# tokens, about eight sequences, so that a burst of clients forces preemptions.
TASKS_KV_BYTES = 1024 * 4096


@pytest.fixture(scope="session")
def tasks_server(tmp_path_factory):
    """One `vllm serve examples/llada-tasks` for every test of the served API, as an
    operator might run it: a server default (`--additional-config`), priority
    scheduling, a small KV cache and a stats log every second. Yields (base URL,
    process, log path)."""
    log = tmp_path_factory.mktemp("tasks-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_LOG_STATS_INTERVAL"] = "1"
    proc, base = start_server(TASKS_MODEL, [
        "--max-model-len", "256", "--max-num-seqs", "48", "--scheduling-policy", "priority",
        "--kv-cache-memory-bytes", str(TASKS_KV_BYTES),
        "--additional-config", '{"dllm": {"block_length": 8}}'], log, env=env)
    yield base, proc, log
    proc.terminate()
    proc.wait(30)
