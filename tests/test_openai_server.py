"""`vllm serve examples/llada-tasks` (what `make serve` serves), driven by the openai client.

The bundled model's generation_config.json sets its canvas (gen_length 32, one block);
the server overrides the block length with `--additional-config`.
"""

from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow

MODEL = Path(__file__).resolve().parents[1] / "examples" / "llada-tasks"
# The bundled model's held-out accuracy (examples/llada-tasks/README.md) makes more
# than this many right answers out of 8 all but certain.
MIN_RIGHT_OF_8 = 5


@pytest.fixture(scope="module")
def server(tasks_server):
    return tasks_server[0]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="none")


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
    r = requests.post(f"{server}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "vllm_xargs": xargs})
    assert r.status_code == 400, r.text
    assert parameter in r.json()["error"]["message"]
    ok = requests.post(f"{server}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_unsupported_sampling_option_gets_400(server, model_name):
    r = requests.post(f"{server}/v1/completions", json={
        "model": model_name, "prompt": "hello", "max_tokens": 8, "top_p": 0.5})
    assert r.status_code == 400
    assert "top_p" in r.json()["error"]["message"]
