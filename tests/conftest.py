import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Keep each engine's KV cache small so several fit beside each other.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Under `make test`'s workers (pytest-xdist), each takes its share of the cores: OpenMP
# threads of two processes on the same cores wait for each other at every barrier.
# In-process engines use this process's torch threads; vLLM's CPU worker then keeps them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _workers))

from dllm_reference.tiny_llada import write_random_model  # noqa: E402
from tests.helpers import inproc_engine, shutdown  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts an engine, a server or a training run "
                                       "(`make test-fast` leaves these out)")


# The files that take minutes (`--durations`), started first so that no worker is left
# with one of them at the end.
LONGEST = ("test_tensor_parallel.py", "test_long_model.py")


def pytest_collection_modifyitems(config, items):
    """The longest files, then the other slow ones, then the rest (a stable sort): `make
    test`'s workers take a file at a time in this order, so the files that start engines
    and servers are spread over the workers and the quick ones fill the gaps at the end.
    A file moves as a whole, so its module fixtures are still set up once."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (Path(item.fspath).name not in LONGEST,
                                 item.module not in slow))


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
def inproc(tiny_model):
    """The suite's engine on the tiny model, with a recorder of its schedules: in this
    process, which starts in seconds where a separate engine process takes tens (the
    servers and the tensor-parallel tests run the multiprocess engine)."""
    llm, recorder = inproc_engine(tiny_model, max_model_len=512, max_num_seqs=64)
    yield llm, recorder
    shutdown(llm)


@pytest.fixture(scope="session")
def llm(inproc):
    """The suite's engine (`inproc`), for the token-exact tests."""
    return inproc[0]

