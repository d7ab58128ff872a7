"""The held-out prompts of `dllm_reference/tasks.py` as an lm-eval dataset (see
llada_tasks.yaml)."""

import datasets

from dllm_reference import tasks


def dataset(num_prompts: int = 1000, **_) -> datasets.DatasetDict:
    """`tasks.heldout(num_prompts)`, in order, as the task's test split."""
    rows = [{"family": p.family, "prompt": p.prompt, "answer": p.answer}
            for p in tasks.heldout(num_prompts)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
