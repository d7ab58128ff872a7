"""What structured outputs cost: the same held-out prompts decoded without a grammar,
with the regex `[0-9]+` and with a JSON schema, side by side on one engine, each
batch also holding the prompts unconstrained (whose answers must not change).

    python -m benchmarks.structured [--model examples/llada-tasks] [-n 100]

Prints one Markdown table (tokens per iteration: returned tokens over the requests'
iterations) and, with --out, writes it with the raw numbers as JSON.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The answer as one JSON string: the bundled model's answers have at most 9 characters.
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
          "required": ["answer"], "additionalProperties": False}
REGEX = "[0-9]+"
# The bundled model's policy table shape (README): gen_length 32, blocks of 8.
BASE = {"gen_length": 32, "block_length": 8}
POLICIES = {"fixed": {"steps": 32}, "threshold 0.9": {"policy": "threshold", "threshold": 0.9}}


def valid(kind: str, text: str) -> bool:
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "json":
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "examples" / "llada-tasks"))
    parser.add_argument("-n", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from benchmarks.instrumented import Engine
    from dllm_reference import tasks
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    # A model that never saw JSON fills the canvas with the whitespace JSON allows
    # between tokens; vLLM's option allows none.
    engine = Engine(args.model, max_model_len=256, max_num_seqs=64,
                    structured_outputs_config={"backend": "xgrammar",
                                               "disable_any_whitespace": True})
    tokenizer = engine.llm.get_tokenizer()
    problems = tasks.heldout(args.n)
    prompts = [tokenizer.encode(tasks.render_chat(p.prompt)) for p in problems]
    grammars = {"none": None, "regex": StructuredOutputsParams(regex=REGEX),
                "json": StructuredOutputsParams(json=SCHEMA)}
    rows = []
    for policy, settings in POLICIES.items():
        extra = dict(BASE, **settings)
        plain_answers = None
        for kind, grammar in grammars.items():
            params = SamplingParams(temperature=0, max_tokens=32, extra_args=extra,
                                    structured_outputs=grammar)
            plain = SamplingParams(temperature=0, max_tokens=32, extra_args=extra)
            # Request ids are unique over the run: the engine counts iterations by id.
            tag = f"{policy}-{kind}"
            batch = [(f"{tag}{i}", p, params) for i, p in enumerate(prompts)]
            if grammar is not None:
                batch += [(f"{tag}-plain{i}", p, plain) for i, p in enumerate(prompts)]
            result = engine.run(batch)
            assert result.status == "ok", result.error
            ours = [result.requests[f"{tag}{i}"] for i in range(len(prompts))]
            texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in ours]
            if grammar is None:
                plain_answers = texts
            else:
                beside = [tokenizer.decode(result.requests[f"{tag}-plain{i}"].token_ids,
                                           skip_special_tokens=True)
                          for i in range(len(prompts))]
                assert beside == plain_answers, "unconstrained answers changed"
            tokens = sum(len(r.token_ids) for r in ours)
            iterations = sum(r.iterations for r in ours)
            rows.append(dict(
                policy=policy, grammar=kind, n=len(ours),
                valid=sum(valid(kind, t) for t in texts),
                right=sum(tasks.score(t, p.answer) for t, p in zip(texts, problems)),
                iterations_per_request=iterations / len(ours),
                tokens_per_iteration=tokens / iterations,
                examples=texts[:4]))
            print(rows[-1], file=sys.stderr, flush=True)
    table = ["| policy | grammar | valid | exact answer | iterations / request | "
             "tokens / iteration |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['policy']} | {r['grammar']} | {r['valid']}/{r['n']} | "
                     f"{r['right']}/{r['n']} | {r['iterations_per_request']:.2f} | "
                     f"{r['tokens_per_iteration']:.2f} |")
    print("\n".join(table))
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
