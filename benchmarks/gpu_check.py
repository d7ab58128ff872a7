"""The plugin's GPU path checked piece by piece on a machine with torch, triton and a GPU but
without vLLM: only the vLLM-free parts are imported (`vllm_dllm.sampling`,
`vllm_dllm.skipping`, `attention_backends/paged_attention.py`, `dllm_reference`).

    python -m benchmarks.gpu_check                  # on the GPU machine, from the repository root
    python -m benchmarks.gpu_check --smoke          # small shapes, seconds (the suite, on CPU)

(a) attention: `paged_attention_triton` (CUDA) and `paged_attention_torch` over shuffled
    pages against `scaled_dot_product_attention` (its flash backend on CUDA) on the same
    K/V laid out contiguously, at LLaDA-8B's shapes (32 heads, head_dim 128, pages of 16,
    bf16), 16 and 64 requests of 512 positions, passes of every row (cache=none) and of a
    32-row block (dual cache): largest error and time of each;
(b) `DenoiseBatch.step` at 16 and 64 requests of 32 masked positions, LLaDA's vocabulary
    (126,464), temperature 0 and 0.7, under torch.cuda.set_sync_debug_mode("error") (a
    host synchronisation inside the step raises), timed, its packed result against the
    same step on the CPU;
(c) a tiny random LLaDA: the decoding core (`CoreDriver`) with model and core on the GPU
    against both on the CPU for every policy and cache mode, and the reference decoder
    (`generate`, which also runs ES-dLLM's and DyLLM's skipping) likewise: equal tokens;
(d) the skipping controllers' math (ES importance and keep sets, DyLLM's salient rows)
    on the GPU against the CPU.

Prints one Markdown table and writes gpu_check.json and gpu_check.md to --out; exits 1 if
a check failed. Without a GPU every "device" run is on the CPU (the smoke test's case).
"""

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dllm_reference.core_driver import CoreDriver
from dllm_reference.generate import generate
from dllm_reference.modeling import ReferenceLLaDA
from dllm_reference.tiny_llada import build_vocab, llada_config, random_state_dict
from vllm_dllm.attention_backends.paged_attention import (
    paged_attention_torch,
    paged_attention_triton,
    triton_serves,
    write_kv,
)
from vllm_dllm.params import DllmParams
from vllm_dllm.sampling.batch import SpecialTokens, full_blocks
from vllm_dllm.skipping import dyllm, es

LLADA_VOCAB = 126464
LLADA_MASK, LLADA_EOS, LLADA_EOT = 126336, 126081, 126348


@dataclass
class Shapes:
    heads: int
    head_dim: int
    page: int
    requests: tuple[int, ...]
    seq_len: int
    query_lens: tuple[int, ...]
    block: int
    vocab: int
    repeats: int
    gen_length: int
    # Which of `CORE_CASES` and `REFERENCE_CASES` run.
    core_cases: slice
    reference_cases: slice


FULL = Shapes(heads=32, head_dim=128, page=16, requests=(16, 64), seq_len=512,
              query_lens=(512, 32), block=32, vocab=LLADA_VOCAB, repeats=5, gen_length=32,
              core_cases=slice(None), reference_cases=slice(None))
SMOKE = Shapes(heads=2, head_dim=16, page=16, requests=(2,), seq_len=40, query_lens=(40, 8),
               block=8, vocab=512, repeats=1, gen_length=16, core_cases=slice(1, 2),
               reference_cases=slice(-2, -1))


@dataclass
class Row:
    section: str
    case: str
    ok: bool | None  # None: a measurement only
    detail: str
    ms: float | None = None


def _elapsed_ms(fn: Callable[[], object], device: torch.device, repeats: int,
                setup: Callable[[], object] | None = None) -> tuple[float, object]:
    """Median wall time of `fn(setup())` (or `fn()`) in ms over `repeats` runs after one
    warm-up, the device synchronised around each; returns it with the last result."""
    times, result = [], None
    for i in range(repeats + 1):
        arg = setup() if setup is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(arg) if setup is not None else fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, result


@dataclass
class PagedRows:
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def check_attention(shapes: Shapes, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    h, d, page, length = shapes.heads, shapes.head_dim, shapes.page, shapes.seq_len
    scale = d ** -0.5
    for requests in shapes.requests:
        g = torch.Generator().manual_seed(requests)
        k, v = (torch.randn(requests, h, length, d, generator=g).to(device, dtype)
                for _ in range(2))
        pages = math.ceil(length / page)
        num_blocks = requests * pages + 1  # page 0: the null page, never given out
        table = (torch.randperm(num_blocks - 1, generator=g) + 1).view(requests, pages)
        table = table.to(device, torch.int32)
        kv_cache = torch.zeros(num_blocks, h, page, 2 * d, dtype=dtype, device=device)
        position = torch.arange(length, device=device)
        slots = table[:, position // page].long() * page + position % page  # [B, L]
        write_kv(kv_cache, slots.flatten(), k.transpose(1, 2).reshape(-1, h, d),
                 v.transpose(1, 2).reshape(-1, h, d))
        for query_len in shapes.query_lens:
            q = torch.randn(requests, h, query_len, d, generator=g).to(device, dtype)
            query = q.transpose(1, 2).reshape(-1, h, d).contiguous()
            paged = PagedRows(
                query_start_loc=torch.arange(0, requests * query_len + 1, query_len,
                                             dtype=torch.int32, device=device),
                seq_lens=torch.full((requests,), length, dtype=torch.int32, device=device),
                block_table=table, max_query_len=query_len, max_seq_len=length)
            case = f"{requests} requests x {query_len} query rows, {length} keys"
            ms, want = _elapsed_ms(lambda: _sdpa(q, k, v, scale), device, shapes.repeats)
            want = want.transpose(1, 2).reshape(-1, h, d).float()
            sdpa_name = "sdpa flash, contiguous K/V" if device.type == "cuda" else "sdpa, contiguous K/V"
            rows.append(Row("a attention", f"{sdpa_name}: {case}", None, "baseline", ms))
            kernels = [("paged_attention_torch", paged_attention_torch)]
            if triton_serves(device.type, d):
                kernels.insert(0, ("paged_attention_triton", paged_attention_triton))
            for name, kernel in kernels:
                out = torch.empty(len(query), h * d, dtype=dtype, device=device)
                ms, _ = _elapsed_ms(lambda: kernel(query, kv_cache, paged, scale, out), device,
                                    shapes.repeats)
                err = float((out.view(-1, h, d).float() - want).abs().max())
                rows.append(Row("a attention", f"{name}: {case}", err <= tolerance,
                                f"max abs err {err:.2e} ({dtype}, tol {tolerance:g})", ms))
    return rows


def check_step(shapes: Shapes, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    special = SpecialTokens(min(LLADA_MASK, shapes.vocab - 3), min(LLADA_EOS, shapes.vocab - 2),
                            min(LLADA_EOT, shapes.vocab - 1))
    cpu = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for requests in shapes.requests:
        g = torch.Generator().manual_seed(requests)
        logits = (torch.randn(requests * shapes.block, shapes.vocab, generator=g) * 4).to(dtype)
        on_device = logits.to(device)
        for temperature in (0.0, 0.7):
            case = (f"{requests} requests x {shapes.block} masked, V={shapes.vocab}, "
                    f"T={temperature}")

            def fresh(dev: torch.device = device):
                return full_blocks(requests, shapes.block, temperature, special, dev)

            def step(made, x: torch.Tensor = on_device) -> torch.Tensor:
                batch, plan = made
                if x.is_cuda:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    return batch.step(plan, x)
                finally:
                    if x.is_cuda:
                        torch.cuda.set_sync_debug_mode(0)

            try:
                ms, packed = _elapsed_ms(step, device, shapes.repeats, setup=fresh)
            except RuntimeError as e:  # a host synchronisation inside the step
                traceback.print_exc()
                rows.append(Row("b DenoiseBatch.step", case, False, str(e)[:300]))
                continue
            want = step(fresh(cpu), logits)
            differ = int((packed.cpu() != want).sum())
            sync = ", no host synchronisation" if device.type == "cuda" else ""
            rows.append(Row("b DenoiseBatch.step", case, differ == 0,
                            f"{differ} packed entries differ from the CPU{sync}", ms))
    return rows


# (name, DllmParams fields, temperature): every policy and cache mode through the core.
CORE_CASES = [
    ("fixed, none", dict(), 0.0),
    ("threshold, dual", dict(policy="threshold", threshold=0.05, cache="dual"), 0.0),
    ("fixed, none, sampled", dict(), 0.7),
    ("threshold, none", dict(policy="threshold", threshold=0.05), 0.0),
    ("factor, none", dict(policy="factor", factor=3.0), 0.0),
    ("frechet, none", dict(policy="frechet", frechet_delta=0.01), 0.0),
    ("threshold + r2, none", dict(policy="threshold", threshold=0.05, r2=True,
                                  r2_spatial_threshold=0.05, r2_temporal_threshold=0.05), 0.7),
    ("fixed, prefix", dict(cache="prefix"), 0.0),
    ("fixed, dual, refresh 3", dict(cache="dual", refresh_period=3), 0.7),
]
# The reference decoder adds what runs inside the model, ES-dLLM and DyLLM skipping (R² has
# its own reference, `tests/test_r2.py`).
REFERENCE_CASES = [c for c in CORE_CASES if not c[1].get("r2")] + [
    ("es, dual", dict(cache="dual", skip="es"), 0.0),
    ("es, dual, refresh 4", dict(cache="dual", refresh_period=4, skip="es"), 0.0),
    ("dyllm, none", dict(skip="dyllm", dyllm_attention="approximate"), 0.0),
    ("dyllm exact, dual", dict(cache="dual", skip="dyllm", dyllm_attention="exact"), 0.7),
]


def tiny_llada(device: torch.device) -> tuple[ReferenceLLaDA, dict]:
    config = llada_config(build_vocab(), d_model=64, n_layers=4, n_heads=2, mlp_hidden_size=128,
                          max_sequence_length=256)
    model = ReferenceLLaDA(config, random_state_dict(config, seed=0)).to(device)
    return model, config


def check_tokens(shapes: Shapes, device: torch.device) -> list[Row]:
    if device.type == "cuda":
        # float32 on both sides; TF32 would change the GPU's rounding, not its maths.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows: list[Row] = []
    (cpu_model, config), (dev_model, _) = tiny_llada(torch.device("cpu")), tiny_llada(device)
    mask = config["mask_token_id"]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 90, (5 + 7 * i,), generator=g).tolist() for i in range(3)]
    shape = dict(gen_length=shapes.gen_length, block_length=8, steps=shapes.gen_length // 2)

    def core(name: str, fields: dict, temperature: float) -> int:
        params = DllmParams(**shape, **fields)
        runs = [CoreDriver(model, mask, dev, max_rows=3).run(
                    {0: [(str(i), p, params, temperature, 30 + i) for i, p in enumerate(prompts)]})
                for model, dev in ((cpu_model, "cpu"), (dev_model, device))]
        return sum(a != b for key in runs[0] for a, b in zip(runs[0][key], runs[1][key]))

    def reference(name: str, fields: dict, temperature: float) -> int:
        canvases = []
        for model, dev in ((cpu_model, torch.device("cpu")), (dev_model, device)):
            # The reference makes its tensors where torch's default device says.
            with dev:
                canvases.append([generate(model, p, mask_id=mask, temperature=temperature,
                                          seed=40 + i, **shape, **fields)["tokens"]
                                 for i, p in enumerate(prompts)])
        return sum(a != b for x, y in zip(*canvases) for a, b in zip(x, y))

    for section, run, cases in (("c core tokens", core, CORE_CASES[shapes.core_cases]),
                                ("c reference tokens", reference,
                                 REFERENCE_CASES[shapes.reference_cases])):
        for case in cases:
            try:
                differ = run(*case)
            except Exception as e:  # one case's failure must not hide the others'
                traceback.print_exc()
                rows.append(Row(section, case[0], False, f"{type(e).__name__}: {e}"[:300]))
                continue
            rows.append(Row(section, case[0], differ == 0,
                            f"{differ} of {3 * shape['gen_length']} tokens differ from the CPU"))
    return rows


def check_skipping(device: torch.device) -> list[Row]:
    g = torch.Generator().manual_seed(0)
    batch, width, hidden = 6, 48, 64
    inputs = dict(hidden=torch.randn(batch, width, hidden, generator=g),
                  previous=torch.randn(batch, width, hidden, generator=g),
                  last_conf=torch.rand(batch, width, generator=g),
                  leftmost=torch.rand(batch, width, generator=g) < 0.05,
                  fresh=torch.rand(batch, width, generator=g) < 0.2,
                  valid=torch.arange(width)[None, :] < torch.randint(8, width + 1, (batch, 1),
                                                                     generator=g),
                  alpha=torch.tensor([0.0, 0.25, 0.5, 0.5, 0.75, 1.0]))
    counts = torch.randint(1, 9, (batch,), generator=g)
    context, cached = torch.randn(200, 96, generator=g), torch.randn(200, 96, generator=g)
    cached[::3] = context[::3] * 1.5 + 1e-3  # rows whose context barely moved
    tau = torch.full((200,), 0.99)

    def run(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        score = es.importance(**{k: v.to(dev) for k, v in inputs.items()})
        return (score.cpu(), es.keep_mask(score, counts.to(dev)).cpu(),
                dyllm.salient(context.to(dev), cached.to(dev), tau.to(dev)).cpu())

    (score_c, keep_c, sal_c), (score_d, keep_d, sal_d) = run(torch.device("cpu")), run(device)
    finite = torch.isfinite(score_c)
    err = float((score_c[finite] - score_d[finite]).abs().max())
    same_padding = bool((finite == torch.isfinite(score_d)).all())
    return [
        Row("d skipping", "ES importance", err < 1e-5 and same_padding, f"max abs err {err:.1e}"),
        Row("d skipping", "ES keep sets", bool(torch.equal(keep_c, keep_d)),
            f"{int(keep_c.sum())} rows kept of {int(inputs['valid'].sum())}"),
        Row("d skipping", "DyLLM salient rows", bool(torch.equal(sal_c, sal_d)),
            f"{int(sal_c.sum())} of {len(sal_c)} salient"),
    ]


SECTIONS: list[tuple[str, Callable[[Shapes, torch.device], list[Row]]]] = [
    ("a attention", check_attention),
    ("b DenoiseBatch.step", check_step),
    ("c tokens", check_tokens),
    ("d skipping", lambda shapes, device: check_skipping(device)),
]


def markdown(rows: list[Row], header: str) -> str:
    mark = {True: "ok", False: "FAIL", None: ""}
    lines = [header, "", "| check | case | result | detail | ms |", "|---|---|---|---|---:|"]
    for r in rows:
        ms = "" if r.ms is None else f"{r.ms:.2f}"
        lines.append(f"| {r.section} | {r.case} | {mark[r.ok]} | {r.detail} | {ms} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check"))
    parser.add_argument("--smoke", action="store_true", help="small shapes (the CPU suite's run)")
    args = parser.parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    if args.smoke:
        # Tiny shapes: OpenMP threads waiting for each other on a shared CPU cost more
        # than they bring (the suite's `one_thread`).
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[Row] = []
    for section, check in SECTIONS:
        try:
            rows += check(shapes, device)
        except Exception as e:  # one broken section must not hide the others' results
            traceback.print_exc()
            rows.append(Row(section, "raised", False, f"{type(e).__name__}: {e}"[:300]))
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {
        "device": name, "torch": torch.__version__, "triton": triton_version,
        "smoke": args.smoke,
        "vllm_imported": any(module is not None and (m == "vllm" or m.startswith("vllm."))
                             for m, module in sys.modules.items()),
        "rows": [vars(r) for r in rows],
    }
    header = (f"# gpu_check on {name} (torch {torch.__version__}, triton {triton_version}"
              f"{', smoke shapes' if args.smoke else ''})")
    table = markdown(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
