"""`vllm serve examples/llada-tasks` (what `make serve` serves) as clients and operators use
it: the OpenAI client (streaming, server and model defaults, bad parameters), dLLM metrics
on /metrics and in the log, the lm-eval task, and a load-and-fault run (loopback only).

One server: the bundled model's generation_config.json sets its canvas (gen_length 32,
one block), `--additional-config` overrides the block length, and KV room for about
eight sequences with priority scheduling makes a burst of clients force preemptions.
Its JSON grammars allow no free whitespace (vLLM's `disable_any_whitespace`): the
model never saw JSON and would fill the canvas with it.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import model_ids, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "llada-tasks"
NAME = str(MODEL)
VANILLA = {"gen_length": 32, "block_length": 8, "steps": 32}


# 4 layers x (K, V) x 4 heads x 32 dims x fp32 = 4 KiB per token: 1024 tokens.
KV_BYTES = 1024 * 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, process, log path) of the module's one server."""
    log = tmp_path_factory.mktemp("serving") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["VLLM_LOG_STATS_INTERVAL"] = "1"
    proc, base = start_server(MODEL, [
        "--max-model-len", "256", "--max-num-seqs", "48", "--scheduling-policy", "priority",
        "--kv-cache-memory-bytes", str(KV_BYTES),
        "--additional-config", '{"dllm": {"block_length": 8}}',
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}'], log, env=env)
    yield base, proc, log
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def reference():
    from dllm_reference.modeling import ReferenceLLaDA

    return ReferenceLLaDA.from_pretrained(MODEL)


# The bundled model's held-out accuracy (examples/llada-tasks/README.md) makes more
# than this many right answers out of 8 all but certain.
MIN_RIGHT_OF_8 = 5


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server[0]}/v1", api_key="none")


@pytest.fixture(scope="module")
def model_name(client):
    return client.models.list().data[0].id


XARGS = {"gen_length": 32, "block_length": 8, "steps": 16}


def test_completion_stream_joins_to_full_text(client, model_name):
    from dllm_reference.tasks import render_chat

    # A raw prompt in chat form, so the trained model writes text rather than end tokens.
    kwargs = dict(model=model_name, prompt=render_chat("Uppercase: streamed"), max_tokens=32,
                  temperature=0,
                  extra_body={"vllm_xargs": XARGS, "ignore_eos": True})
    full = client.completions.create(**kwargs)
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs)]
    assert full.usage.completion_tokens == 32
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == full.choices[0].text


def test_chat_stream_joins_to_full_text(client, model_name):
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "What is 2+2?"}],
                  max_tokens=32, temperature=0, extra_body={"vllm_xargs": XARGS})
    full = client.chat.completions.create(**kwargs)
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(stream=True, **kwargs) if c.choices]
    assert full.choices[0].finish_reason in ("stop", "length")
    assert "".join(pieces) == full.choices[0].message.content


def test_model_and_server_defaults_apply(client, model_name):
    # gen_length 32 comes from the model folder; block_length 8 from the server, which
    # is why a 24-token canvas is accepted.
    out = client.completions.create(model=model_name, prompt="abc", max_tokens=200,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 32
    out = client.completions.create(model=model_name, prompt="abc", max_tokens=200,
                                    temperature=0, extra_body={"ignore_eos": True,
                                                               "vllm_xargs": {"gen_length": 24}})
    assert out.usage.completion_tokens == 24


def test_chat_answers_held_out_tasks(client, model_name):
    """Plain chat requests (no dLLM parameter) for held-out task prompts: the server answers
    exactly what the reference decodes with the same defaults, and mostly right."""
    from tokenizers import Tokenizer

    from dllm_reference import tasks
    from dllm_reference.modeling import ReferenceLLaDA
    from tests.helpers import reference_tokens

    reference = ReferenceLLaDA.from_pretrained(MODEL)
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    problems = tasks.heldout(8)
    answers, expected = [], []
    for problem in problems:
        answers.append(client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": problem.prompt}],
            temperature=0).choices[0].message.content)
        prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
        tokens = reference_tokens(reference, MODEL, prompt, gen_length=32, block_length=8,
                                  steps=32, remasking="low_confidence", temperature=0.0)
        expected.append(tokenizer.decode(tokens, skip_special_tokens=True))
    assert answers == expected
    right = sum(tasks.score(a, p.answer) for a, p in zip(answers, problems))
    assert right >= MIN_RIGHT_OF_8, list(zip([p.prompt for p in problems], answers))


@pytest.mark.parametrize("xargs", [
    {"skip": "es", "cache": "dual", "es_keep": "1,0.5,0.25", "es_block_update_freq": 3},
    {"skip": "dyllm", "dyllm_full_steps": 2, "dyllm_threshold": 0.95},
])
def test_token_skipping_through_vllm_xargs(client, model_name, xargs):
    """Skipping chosen per request through vllm_xargs decodes what the reference does."""
    from tokenizers import Tokenizer

    from dllm_reference import tasks
    from dllm_reference.modeling import ReferenceLLaDA
    from tests.helpers import reference_tokens

    reference = ReferenceLLaDA.from_pretrained(MODEL)
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    settings = {k: v for k, v in xargs.items() if k != "es_keep"}
    for problem in tasks.heldout(3):
        answer = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": problem.prompt}],
            temperature=0, extra_body={"vllm_xargs": xargs}).choices[0].message.content
        prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
        tokens = reference_tokens(reference, MODEL, prompt, gen_length=32, block_length=8,
                                  steps=32, remasking="low_confidence", temperature=0.0,
                                  **settings)
        assert answer == tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("xargs, parameter", [
    ({"gen_length": 30}, "gen_length"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "steps"),
    ({"remasking": "lowest"}, "remasking"),
    ({"gen_length": 0}, "gen_length"),
    ({"block_length": -8}, "block_length"),
    ({"steps": 0}, "steps"),
    ({"gen_length": 512, "block_length": 32}, "gen_length"),
    ({"gen_lenght": 32}, "gen_lenght"),
    ({"skip": "early"}, "skip"),
    ({"es_alpha": 0.3}, "es_alpha"),
    ({"skip": "es", "r2": True}, "r2"),
    ({"skip": "dyllm", "dyllm_threshold": 2}, "dyllm_threshold"),
])
def test_bad_parameters_get_400(server, model_name, xargs, parameter):
    base = server[0]
    r = requests.post(f"{base}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "vllm_xargs": xargs})
    assert r.status_code == 400, r.text
    assert parameter in r.json()["error"]["message"]
    ok = requests.post(f"{base}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("option, value", [
    ("top_p", 0.5), ("min_p", 0.1), ("presence_penalty", 0.5), ("frequency_penalty", 0.5),
    ("repetition_penalty", 1.2), ("prompt_logprobs", 1),
])
def test_unsupported_sampling_option_gets_400(server, model_name, option, value):
    r = requests.post(f"{server[0]}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, option: value})
    assert r.status_code == 400
    assert option in r.json()["error"]["message"]
    if option == "prompt_logprobs":
        assert "left-to-right" in r.json()["error"]["message"]


def test_logprobs_stream_and_non_stream_agree(client, model_name, reference):
    """Completions and chat with logprobs: each token's logprob is the log softmax of
    the iteration that committed it (the reference's record), top logprobs are sorted
    and hold the token, and the streamed chunks carry the same values."""
    from tokenizers import Tokenizer

    from dllm_reference.generate import generate
    from dllm_reference.tasks import render_chat

    ids = model_ids(MODEL)
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    prompt = render_chat("Sort: 7 2 9 4")
    kwargs = dict(model=model_name, prompt=prompt, max_tokens=32, temperature=0, logprobs=3,
                  extra_body={"vllm_xargs": XARGS, "return_token_ids": True})
    full = client.completions.create(**kwargs).choices[0]
    ref = generate(reference, tokenizer.encode(prompt).ids, mask_id=ids["mask"], logprobs=3,
                   **XARGS)
    assert full.token_ids == ref["tokens"][: len(full.token_ids)]
    assert len(full.logprobs.token_logprobs) == len(full.token_ids) > 1
    for given, top, (logprob, ref_top) in zip(full.logprobs.token_logprobs,
                                             full.logprobs.top_logprobs, ref["logprobs"]):
        assert abs(given - logprob) < 1e-4
        values = list(top.values())
        assert values == sorted(values, reverse=True) and len(values) == 3
        assert all(abs(v - w) < 1e-4 for v, (_, w) in zip(values, ref_top))
        assert max(values) == given  # greedy: the token is the top one
    streamed = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)
                if c.choices and c.choices[0].logprobs]
    assert [lp for c in streamed for lp in c.logprobs.token_logprobs] == \
        full.logprobs.token_logprobs
    assert [t for c in streamed for t in c.logprobs.top_logprobs] == full.logprobs.top_logprobs

    chat = dict(model=model_name, messages=[{"role": "user", "content": "Uppercase: dllm"}],
                max_tokens=32, temperature=0, logprobs=True, top_logprobs=2,
                extra_body={"vllm_xargs": XARGS})
    content = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert content
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token in [t.token for t in entry.top_logprobs]
    chunks = [c.choices[0].logprobs.content for c in
              client.chat.completions.create(stream=True, **chat)
              if c.choices and c.choices[0].logprobs]
    assert [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
            for chunk in chunks for e in chunk] == \
        [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in content]


# The answer as one JSON string: the bundled model's answers have at most 9 characters.
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
                 "required": ["answer"], "additionalProperties": False}


def test_structured_outputs_on_held_out_prompts(client, model_name, reference):
    """100 held-out prompts (every family, word answers too) with the regex `[0-9]+` and
    with a JSON schema, on threshold decoding, all at once beside the same prompts
    unconstrained: every constrained answer matches, and the unconstrained ones are what
    the reference decodes."""
    import re

    import jsonschema
    from tokenizers import Tokenizer

    from dllm_reference import tasks
    from tests.helpers import reference_tokens

    xargs = {"gen_length": 32, "block_length": 8, "policy": "threshold", "threshold": 0.9}
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    problems = tasks.heldout(100)
    assert {p.family for p in problems} == set(tasks.SHORT)
    forms = {"regex": {"extra_body": {"vllm_xargs": xargs,
                                      "structured_outputs": {"regex": "[0-9]+"}}},
             "json": {"response_format": {"type": "json_schema", "json_schema": {
                 "name": "answer", "schema": ANSWER_SCHEMA}}, "extra_body": {"vllm_xargs": xargs}},
             "plain": {"extra_body": {"vllm_xargs": xargs}}}

    def ask(job: tuple[str, str]) -> str:
        form, prompt = job
        return client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": prompt}], max_tokens=32,
            temperature=0, **forms[form]).choices[0].message.content

    jobs = [(form, p.prompt) for p in problems for form in forms]
    with ThreadPoolExecutor(24) as pool:
        answers = dict(zip(jobs, pool.map(ask, jobs)))
    bad_regex = [a for (f, _), a in answers.items() if f == "regex"
                 and not re.fullmatch("[0-9]+", a)]
    assert bad_regex == []
    for (form, _), answer in answers.items():
        if form == "json":
            jsonschema.validate(json.loads(answer), ANSWER_SCHEMA)
    expected = [tokenizer.decode(reference_tokens(
        reference, MODEL, tokenizer.encode(tasks.render_chat(p.prompt)).ids, **xargs),
        skip_special_tokens=True) for p in problems]
    assert [answers[("plain", p.prompt)] for p in problems] == expected


def test_token_filters_through_the_openai_api(server, client, model_name):
    """`logit_bias`, and in extra_body `min_tokens`, `allowed_token_ids` and `bad_words`, on
    the completions endpoint: each answer keeps to its filter and differs from the
    unfiltered one; a token id outside the vocabulary gets a 400 naming logit_bias and
    the server serves on."""
    from tokenizers import Tokenizer

    from dllm_reference.tasks import render_chat

    ids = model_ids(MODEL)
    ends = {ids["eos"], ids["eot"]}
    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))

    def ask(logit_bias: dict | None = None, **extra) -> tuple[str, list[int]]:
        out = client.completions.create(
            model=model_name, prompt=render_chat("Uppercase: filters"), max_tokens=32,
            temperature=0, logit_bias=logit_bias,
            extra_body={"vllm_xargs": XARGS, "return_token_ids": True, **extra})
        return out.choices[0].text, out.choices[0].token_ids

    plain, _ = ask()
    digits = tokenizer.encode("0123456789").ids
    text, tokens = ask(allowed_token_ids=digits + sorted(ends))
    assert text != plain and set(tokens) <= set(digits) | ends
    word = plain.strip()[:2]
    text, _ = ask(bad_words=[word])
    assert text != plain and word not in text
    text, tokens = ask(logit_bias={str(ids["eos"]): 100}, min_tokens=5)
    assert not ends & set(tokens[:5]) and tokens[5] == ids["eos"]
    r = requests.post(f"{server[0]}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "logit_bias": {"104": 1}})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    assert ask(logit_bias={str(ids["eos"]): 100}, min_tokens=5)[1] == tokens


def scrape(base: str) -> dict[tuple, float]:
    """/metrics as {(sample name, labels other than model and engine): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(requests.get(f"{base}/metrics").text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items()
                                  if k not in ("model_name", "engine")))
            samples[(s.name, labels)] = s.value
    return samples


def histogram_delta(before: dict, after: dict, name: str) -> dict:
    """A histogram's growth: {"count", "sum", le: cumulative count}."""
    out = {"count": after[(f"{name}_count", ())] - before.get((f"{name}_count", ()), 0),
           "sum": after[(f"{name}_sum", ())] - before.get((f"{name}_sum", ()), 0)}
    for (sample, labels), value in after.items():
        if sample == f"{name}_bucket":
            out[float(dict(labels)["le"])] = value - before.get((sample, labels), 0)
    return out


def expected_histogram(values: list[float], buckets) -> dict:
    out = {"count": len(values), "sum": sum(values)}
    out.update({le: sum(v <= le for v in values) for le in buckets if le not in ("count", "sum")})
    return out


def complete(base: str, prompt, xargs: dict, **body) -> dict:
    r = requests.post(f"{base}/v1/completions", json={
        "model": NAME, "prompt": prompt, "max_tokens": xargs.get("gen_length", 32),
        "temperature": 0, "vllm_xargs": xargs, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def rows_of(cache: str, prompt_len: int, gen_length: int, block_length: int,
            commits: list[int]) -> list[int]:
    """Rows each iteration recomputes, given how many tokens each committed (a block ends
    when its commits add up to its length)."""
    rows, block, in_block, committed = [], 0, 0, 0
    for n in commits:
        start = prompt_len + block * block_length
        if cache == "none" or in_block == 0:
            rows.append(prompt_len + gen_length)
        elif cache == "prefix":
            rows.append(prompt_len + gen_length - start)
        else:
            rows.append(block_length)
        committed += n
        in_block += 1
        if committed == block_length:
            block, in_block, committed = block + 1, 0, 0
    return rows


def test_dllm_metrics_count_what_the_engine_did(server, reference):
    """Requests decoded alone, with ignore_eos so the whole canvas runs: the dLLM series grow
    by exactly the iterations, commits and recomputed rows of the reference decode, whose
    tokens the server returned."""
    from dllm_reference.generate import generate
    from tests.helpers import random_prompt

    base, _, log = server
    cases = [
        (random_prompt(1, 12), {"gen_length": 32, "block_length": 8, "policy": "threshold",
                                "threshold": 0.7, "cache": "none"}),
        (random_prompt(2, 20), {"gen_length": 32, "block_length": 8, "steps": 16,
                                "cache": "dual"}),
        (random_prompt(3, 7), {"gen_length": 32, "block_length": 16, "policy": "factor",
                               "cache": "prefix"}),
    ]
    before = scrape(base)
    iterations, commits, rows = [], [], []
    prompt_tokens = sum(len(prompt) for prompt, _ in cases)
    for prompt, xargs in cases:
        out = complete(base, prompt, xargs, ignore_eos=True, return_token_ids=True)
        params = {"steps": xargs["gen_length"], "policy": "fixed", "cache": "none", **xargs}
        decode = generate(reference, prompt, mask_id=model_ids(MODEL)["mask"], **params)
        assert out["token_ids"] == decode["tokens"]
        iterations.append(decode["forwards"])
        commits += decode["commits"]
        rows += rows_of(params["cache"], len(prompt), params["gen_length"],
                        params["block_length"], decode["commits"])
    after = scrape(base)
    for name, values in (("vllm:dllm_request_iterations", iterations),
                         ("vllm:dllm_iteration_committed_tokens", commits),
                         ("vllm:dllm_iteration_recomputed_rows", rows)):
        got = histogram_delta(before, after, name)
        assert got == expected_histogram(values, got), name
    assert all(v == 0 for (name, _), v in after.items() if name == "vllm:dllm_requests_by_block")
    # vLLM's token counters: each prompt once, every canvas token returned.
    for name, value in (("vllm:prompt_tokens_total", prompt_tokens),
                        ("vllm:generation_tokens_total", 32 * len(cases))):
        assert after[(name, ())] - before[(name, ())] == value, name
    # vLLM's periodic log (every second here) has counted the same iterations.
    total = after[("vllm:dllm_iteration_committed_tokens_count", ())]
    deadline = time.time() + 10
    while logged_iterations(log) != total and time.time() < deadline:
        time.sleep(0.5)
    assert logged_iterations(log) == total


def logged_iterations(log: Path) -> int:
    return sum(int(line.split("dLLM: ")[1].split()[0])
               for line in log.read_text().splitlines()
               if "dLLM: " in line and " request iterations" in line)


def test_lm_eval_task_scores_what_the_reference_decodes(server, reference, tmp_path):
    """The documented lm-eval command (README "Serving") on the first 8 held-out prompts:
    its answers are the reference's vanilla decodes and its accuracy is theirs."""
    from tokenizers import Tokenizer

    from dllm_reference import tasks
    from tests.helpers import reference_tokens

    base, _, _ = server
    limit = 8
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions",
         "--apply_chat_template", "--model_args",
         f"model={NAME},base_url={base}/v1/chat/completions,num_concurrent=4",
         "--include_path", "benchmarks/lm_eval", "--tasks", "llada_tasks",
         "--limit", str(limit), "--output_path", str(tmp_path), "--log_samples"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in
               next(tmp_path.rglob("samples_llada_tasks_*.jsonl")).read_text().splitlines()]
    answers = {s["doc_id"]: s["resps"][0][0] for s in samples}

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    problems = tasks.heldout(limit)
    expected = []
    for problem in problems:
        prompt = tokenizer.encode(tasks.render_chat(problem.prompt)).ids
        tokens = reference_tokens(reference, MODEL, prompt, **VANILLA)
        expected.append(tokenizer.decode(tokens, skip_special_tokens=True))
    assert [answers[i] for i in range(limit)] == expected
    accuracy = sum(tasks.score(a, p.answer) for a, p in zip(expected, problems)) / limit
    assert results["results"]["llada_tasks"]["exact_match,none"] == accuracy


def test_block_gauge_follows_a_running_request(server):
    base, _, _ = server
    xargs = {"gen_length": 128, "block_length": 8, "steps": 128}
    seen: set[tuple] = set()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (
        complete(base, [5] * 10, xargs, ignore_eos=True), done.set()))
    worker.start()
    while not done.is_set():
        gauge = {dict(labels)["block"]: v for (name, labels), v in scrape(base).items()
                 if name == "vllm:dllm_requests_by_block" and v}
        seen.add(tuple(sorted(gauge.items())))
    worker.join()
    # One request, moving through its 16 blocks: never more than one at a time.
    running = [s for s in seen if s]
    assert running and all(len(s) == 1 and s[0][1] == 1 for s in running)
    assert len({s[0][0] for s in running}) > 1


# (xargs, temperature) mixes: every policy and cache mode, R², random remasking, sampling,
# token skipping.
MIXES = [
    ({**VANILLA}, 0.0),
    ({"gen_length": 64, "block_length": 16, "policy": "threshold", "threshold": 0.7}, 0.0),
    ({"gen_length": 32, "block_length": 8, "policy": "frechet"}, 0.8),
    ({"gen_length": 32, "block_length": 8, "policy": "factor", "r2": True}, 0.0),
    ({"gen_length": 64, "block_length": 32, "steps": 32, "remasking": "random"}, 0.7),
    ({**VANILLA, "cache": "prefix"}, 0.0),
    ({"gen_length": 32, "block_length": 8, "policy": "threshold", "cache": "dual"}, 0.0),
    ({"gen_length": 32, "block_length": 8, "cache": "dual", "skip": "es"}, 0.0),
    ({**VANILLA, "skip": "dyllm", "dyllm_full_steps": 1}, 0.7),
]
# Values each parameter must refuse, by kind.
BAD_VALUES = {
    "gen_length": [0, -32, 7.5, "32", 4096],
    "block_length": [0, -8, "eight", 1.5],
    "steps": [0, -1, "x", 2.5],
    "threshold": [0, 1.5, -0.1, "high"],
    "factor": [0, -1, "big"],
    "frechet_delta": [0, -0.5, "d"],
    "cache": ["full", 1, ""],
    "policy": ["greedy", 3],
    "remasking": ["lowest", 0],
    "r2_window": [-3, "w", 1.5],  # 0 is valid: it turns the window rule off
    "r2_token_cluster": ["all", 2],
    "skip": ["early", 1],
    "es_alpha": [-0.1, 2, "a"],
    "dyllm_threshold": [0, 1.5],
    "gen_lenght": [32],
}
# Standard sampling options diffusion decoding refuses or vLLM itself checks.
BAD_OPTIONS = {"top_p": [0.5], "top_k": [5], "min_p": [0.1], "prompt_logprobs": [1],
               "logprobs": [50],  # above vLLM's max_logprobs (20)
               "temperature": [-1.0], "n": [0], "min_tokens": [64], "presence_penalty": [0.5],
               "logit_bias": [{"104": 1.0}], "allowed_token_ids": [[99]]}


def stream(base: str, body: dict, abort: bool) -> dict:
    """One streamed completion; with `abort`, the client hangs up after its first chunk."""
    pieces, finish = [], None
    with requests.post(f"{base}/v1/completions", json={**body, "stream": True}, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choice = json.loads(line[len(b"data: "):])["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
            if abort:
                break
    return {"text": "".join(pieces), "finish": finish}


def fuzz(base: str, rng: random.Random) -> tuple[str, int, str]:
    body = {"model": NAME, "prompt": "hello", "max_tokens": 8}
    if rng.random() < 0.7:
        name = rng.choice(sorted(BAD_VALUES))
        body["vllm_xargs"] = {name: rng.choice(BAD_VALUES[name])}
    else:
        name = rng.choice(sorted(BAD_OPTIONS))
        body[name] = rng.choice(BAD_OPTIONS[name])
    r = requests.post(f"{base}/v1/completions", json=body, timeout=60)
    return name, r.status_code, r.text


def engine_rss(proc) -> int:
    import psutil

    tree = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])


def wait_idle(base: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while True:
        m = scrape(base)
        if (m[("vllm:num_requests_running", ())] == 0 and m[("vllm:num_requests_waiting", ())] == 0
                and m[("vllm:kv_cache_usage_perc", ())] == 0) or time.time() > deadline:
            return m
        time.sleep(0.5)


def test_load_aborts_preemption_and_bad_input(server):
    """36 streaming clients over mixed configurations in two priority waves (the second
    preempts the first: KV room is ~8 sequences), every third hanging up after its first
    chunk, beside 32 requests with fuzzed parameter values. Every bad request gets a 400
    naming its parameter; every finished `cache=none` request without skipping equals its
    result alone; nothing is lost; the server serves on and returns to idle."""
    from dllm_reference.tasks import heldout, render_chat

    base, proc, _ = server
    wait_idle(base)
    idle_rss = engine_rss(proc)
    before = scrape(base)
    rng = random.Random(15)
    problems = heldout(36)
    clients = []
    for i, problem in enumerate(problems):
        xargs, temperature = MIXES[i % len(MIXES)]
        clients.append({"body": {
            "model": NAME, "prompt": render_chat(problem.prompt),
            "max_tokens": xargs["gen_length"], "temperature": temperature, "seed": i,
            # The first wave and every hang-up decode their whole canvas, so that they
            # are still running when the second wave arrives or the client leaves.
            "ignore_eos": i < 18 or i % 3 == 2, "priority": 1 if i < 18 else 0,
            "vllm_xargs": xargs}, "abort": i % 3 == 2})
    with ThreadPoolExecutor(64) as pool:
        first = [pool.submit(stream, base, c["body"], c["abort"]) for c in clients[:18]]
        # The second wave arrives while the first holds the KV cache.
        deadline = time.time() + 30
        while scrape(base)[("vllm:num_requests_running", ())] < 4 and time.time() < deadline:
            time.sleep(0.02)
        second = [pool.submit(stream, base, c["body"], c["abort"]) for c in clients[18:]]
        bad = [pool.submit(fuzz, base, rng) for _ in range(32)]
        results = [f.result(timeout=240) for f in first + second]
        for name, status, text in (f.result(timeout=60) for f in bad):
            assert status == 400 and name in json.loads(text)["error"]["message"], (name, text)

    after = wait_idle(base)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0)

    assert grew("vllm:num_preemptions_total") > 0
    # Every request, hung up on or not, left the engine; hung-up ones mostly unfinished.
    assert grew("vllm:dllm_request_iterations_count") == len(clients)
    finished = sum(grew("vllm:request_success_total", (("finished_reason", r),))
                   for r in ("stop", "length"))
    assert sum(not c["abort"] for c in clients) <= finished < len(clients)
    assert after[("vllm:kv_cache_usage_perc", ())] == 0
    assert all(v == 0 for (name, _), v in after.items() if name == "vllm:dllm_requests_by_block")
    solo_checked = 0
    for client, result in zip(clients, results):
        if client["abort"]:
            continue
        # Nothing lost: every client that stayed got to the end of its request.
        assert result["finish"] in ("stop", "length"), (client, result)
        xargs = client["body"]["vllm_xargs"]
        # Caches and skipping refresh fully after preemption, so only these must match.
        if xargs.get("cache", "none") == "none" and xargs.get("skip", "none") == "none":
            solo = complete(base, client["body"]["prompt"], client["body"]["vllm_xargs"],
                            **{k: client["body"][k] for k in ("temperature", "seed",
                                                              "ignore_eos")})
            assert result["text"] == solo["text"], client
            solo_checked += 1
    assert solo_checked >= 15
    # Back to idle: no page held, no request left, and the server's memory (about 3 GB
    # here, API server + engine + worker) within what allocator caches explain.
    after = wait_idle(base)
    assert after[("vllm:kv_cache_usage_perc", ())] == 0
    assert engine_rss(proc) < idle_rss * 1.15, (engine_rss(proc), idle_rss)
    assert requests.get(f"{base}/health").status_code == 200
