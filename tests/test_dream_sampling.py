"""Dream's reference model and samplers: the reference against itself, the plugin's
batched samplers (`vllm_dllm.sampling.dream`) against the reference's pieces."""

import math

import pytest
import torch

from dllm_reference import dream as ref
from dllm_reference.tiny_dream import dream_files, write_random_model
from vllm_dllm.sampling import dream, noise, truncation

MASK_ID = 151666

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if dream_files() is None:
        pytest.skip("Dream's tokenizer files are not available")
    path = write_random_model(tmp_path_factory.mktemp("dream-tiny"), seed=1)
    return ref.ReferenceDream.from_pretrained(path)


def canvas(prompt_len: int, gen_length: int, committed: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 151643, (prompt_len + gen_length,), generator=g)
    x[prompt_len + committed :] = MASK_ID
    return x


def test_partial_forward_matches_full(model):
    x = canvas(11, 16, 5, seed=0)
    full = model(x)
    logits, kv = model.forward_partial(x, torch.arange(len(x)))
    torch.testing.assert_close(logits, full)
    # A window against the K/V of the same canvas sees what the full pass saw.
    window, _ = model.forward_partial(x, torch.arange(15, 22), kv)
    torch.testing.assert_close(window, full[15:22])
    # Batched, right-padded rows are the unpadded rows.
    y = canvas(7, 8, 2, seed=1)
    batch = torch.full((2, len(x)), MASK_ID)
    batch[0], batch[1, : len(y)] = x, y
    mask = torch.zeros(2, len(x), dtype=torch.long)
    mask[0], mask[1, : len(y)] = 1, 1
    out = model(batch, attention_mask=mask)
    # (a masked attention kernel: float32 rounding differs)
    torch.testing.assert_close(out[0], full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1, : len(y)], model(y), atol=1e-4, rtol=1e-4)


def test_partial_window_reads_the_cache(model):
    """Rows outside the window keep the cached K/V: changing a token there does not
    change the window, changing it inside does."""
    x = canvas(9, 16, 0, seed=2)
    _, kv = model.forward_partial(x, torch.arange(len(x)))
    window = torch.arange(8, 17)
    before, _ = model.forward_partial(x, window, kv)
    outside, inside = x.clone(), x.clone()
    outside[20], inside[12] = 5, 5
    torch.testing.assert_close(model.forward_partial(outside, window, kv)[0], before)
    assert not torch.allclose(model.forward_partial(inside, window, kv)[0], before)


def test_shift_first_canvas_token_is_the_prompts_next_token(model):
    prompt = canvas(6, 0, 0, seed=3).tolist()
    for cache in ("none", "prefix", "dual"):
        out = ref.diffusion_generate(model, prompt, mask_id=MASK_ID, gen_length=1, steps=1,
                                     alg="maskgit_plus", cache=cache)
        logits = model(torch.tensor(prompt + [MASK_ID]))[len(prompt) - 1]
        logits[MASK_ID] = float("-inf")
        assert out["tokens"] == [int(logits.argmax())]


@pytest.mark.parametrize("alg, cache", [("origin", "none"), ("maskgit_plus", "prefix"),
                                        ("topk_margin", "dual"), ("entropy", "none")])
def test_reference_schedule(model, alg, cache):
    """Counted algorithms commit exactly the linspace schedule's counts; every run fills
    its canvas in `steps` forwards, block by block."""
    prompt = canvas(5, 0, 0, seed=4).tolist()
    out = ref.diffusion_generate(model, prompt, mask_id=MASK_ID, gen_length=16,
                                 block_length=8, steps=8, alg=alg, temperature=0.5,
                                 top_p=0.9, seed=7, cache=cache)
    assert MASK_ID not in out["tokens"]
    assert out["forwards"] == 8 and sum(out["commits"]) == 16
    if alg != "origin":
        ratios = ref.schedule_ratios(4, 1e-3)
        for block in (out["commits"][:4], out["commits"][4:]):
            left, want = 8, []
            for r in ratios:
                want.append(int(torch.tensor(float(left)) * torch.tensor(r)))
                left -= want[-1]
            assert block == want


def test_cached_windows_read_the_shifted_rows(model):
    """Two iterations per 2-token block: the refresh reveals nothing (int(2 * 0.4995) = 0),
    so the window iteration runs on an exact cache and must decode what `none` decodes;
    with the window's rows off by one it would not."""
    prompt = canvas(5, 0, 0, seed=5).tolist()
    runs = [ref.diffusion_generate(model, prompt, mask_id=MASK_ID, gen_length=8,
                                   block_length=2, steps=8, alg="entropy", cache=c)
            for c in ("none", "prefix", "dual")]
    assert all(r["commits"] == [0, 2] * 4 for r in runs)
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"]


def test_schedule_matches_reference():
    for steps in (1, 2, 3, 8, 64, 512):
        for eps in (1e-3, 0.05):
            want = ref.schedule_ratios(steps, eps)
            got = dream.schedule_ratios(steps, eps)
            assert got.dtype == torch.float32 and got.tolist() == want
            n = torch.arange(0, 300, 7)
            for i in range(0, steps, max(1, steps // 16)):
                counts = dream.reveal_counts(n, got[i].expand(len(n)))
                assert counts.tolist() == [
                    int(torch.tensor(float(m)) * torch.tensor(want[i])) for m in n.tolist()]
    assert dream.reveal_counts(torch.tensor([37]), torch.tensor([1.0])).tolist() == [37]


def random_rows(m: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, vocab, generator=g) * 3
    logits[:, 3] = float("-inf")  # the mask id, as the caller hands rows over
    return logits


def test_filter_matches_reference():
    logits = random_rows(40, 50, seed=0).double()
    g = torch.Generator().manual_seed(1)
    top_p = torch.where(torch.rand(40, generator=g) < 0.3, 1.0,
                        torch.rand(40, generator=g, dtype=torch.float64))
    top_k = torch.randint(0, 12, (40,), generator=g)
    got = truncation.top_p_top_k(logits, top_p, top_k)
    for i in range(40):
        want = ref.filter_logits(logits[i], float(top_p[i]) if top_p[i] < 1 else None,
                                 int(top_k[i]) or None)
        assert torch.equal(got[i], want), i
    assert torch.equal(truncation.top_p_top_k(logits, torch.ones(40), torch.zeros(40)), logits)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sample_tokens_matches_reference(temperature):
    m = 60
    logits = random_rows(m, 80, seed=2)
    g = torch.Generator().manual_seed(3)
    alg = torch.randint(0, len(dream.ALGS), (m,), generator=g)
    top_p = torch.where(torch.rand(m, generator=g) < 0.5, 1.0, 0.9)
    top_k = torch.where(torch.rand(m, generator=g) < 0.5, 0, 5)
    u = noise.uniforms(torch.tensor(11), torch.tensor(0), torch.arange(m), noise.STREAM_SAMPLE)
    # Greedy rows between the sampled ones, as a batch of mixed requests has them.
    temp = torch.where(torch.arange(m) % 3 == 0, 0.0,
                       torch.full((m,), temperature, dtype=torch.float64))
    sampled = torch.nonzero(temp > 0).flatten()
    filtered = torch.nonzero((top_p < 1) | (top_k > 0)).flatten()
    x0, conf = dream.sample_tokens(logits, alg, temp, top_p, top_k, u, sampled, filtered)
    for i in range(m):
        want_x0, want_conf = ref.sample_row(
            logits[i], dream.ALGS[int(alg[i])], float(temp[i]),
            float(top_p[i]) if top_p[i] < 1 else None, int(top_k[i]) or None, float(u[i]))
        assert int(x0[i]) == want_x0, i
        assert math.isclose(float(conf[i]), want_conf, rel_tol=1e-12, abs_tol=1e-12), i
    if temperature > 0:  # the draws do vary with the uniforms
        assert len(set(x0.tolist())) > 10


def test_selection_keys():
    conf = torch.tensor([[0.2, 0.9, float("-inf"), 0.5]], dtype=torch.float64)
    u = torch.full((1, 4), 0.5, dtype=torch.float64)
    assert torch.equal(dream.selection_keys(conf, torch.zeros(1), u), conf)
    # With alg_temp the first pick follows softmax(conf / alg_temp).
    n, alg_temp = 20000, 0.25
    u = noise.uniforms(torch.tensor(5), torch.arange(n)[:, None], torch.arange(4)[None],
                       noise.STREAM_REMASK)
    keys = dream.selection_keys(conf.expand(n, 4), torch.full((n,), alg_temp), u)
    first = torch.bincount(keys.argmax(-1), minlength=4).double() / n
    want = torch.softmax(conf[0] / alg_temp, -1)
    assert first[2] == 0
    torch.testing.assert_close(first, want, atol=0.015, rtol=0)
    assert torch.equal(dream.origin_reveal(torch.tensor([0.1, 0.5, 0.9]),
                                           torch.tensor(0.5)),
                       torch.tensor([True, False, False]))


def test_select_matches_reference():
    b, k = 48, 12
    g = torch.Generator().manual_seed(4)
    conf = torch.rand(b, k, generator=g, dtype=torch.float64)
    conf[torch.rand(b, k, generator=g) < 0.4] = float("-inf")  # committed or outside
    conf[5] = float("-inf")  # a block with no mask left
    alg = torch.randint(0, len(dream.ALGS), (b,), generator=g)
    alg_temp = torch.where(torch.rand(b, generator=g) < 0.5, 0.0, 0.3)
    ratios = dream.schedule_ratios(6, 1e-3)
    step = torch.randint(0, 6, (b,), generator=g)
    u = noise.uniforms(torch.tensor(3), step[:, None], torch.arange(k)[None], noise.STREAM_REMASK)
    got = dream.select(conf, alg, alg_temp, ratios[step], u)
    for i in range(b):
        masked = [p for p in range(k) if conf[i, p] > float("-inf")]
        want = ref.choose(dream.ALGS[int(alg[i])], masked, {p: float(conf[i, p]) for p in masked},
                          float(ratios[step[i]]), int(step[i]) == 5, float(alg_temp[i]) or None,
                          u[i].tolist())
        assert sorted(want) == torch.nonzero(got[i]).flatten().tolist(), i
    assert got[step == 5].sum() == (conf[step == 5] > float("-inf")).sum()  # last step: all
