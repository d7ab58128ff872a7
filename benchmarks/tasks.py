"""Synthetic tasks with exact answers, for training and scoring small LLaDA checkpoints.

Four families, each a user message with a short multi-token answer:

* arithmetic: two-digit addition or subtraction, with carries ("What is 47+38?" -> "85").
* word_problem: two-step templated story arithmetic ("... How many pens now?" -> "31 pens").
* sort: a short list of digits in ascending order ("Sort: 7 2 9 4" -> "2 4 7 9").
* uppercase: a lowercase string transformed to capitals ("Uppercase: kqzmt" -> "KQZMT").

The sizes are what a ~1M-parameter model learns in an hour on one CPU thread: answers
are at most 9 characters, because a bidirectional model has no absolute positions and
learns to place long answers slowly.

Every prompt falls into exactly one split by a hash of its text, so the training stream
and the held-out set can never share a prompt, whatever seeds are used to draw them.
Answers fit in 24 characters, so with this character-level tokenizer a 32-token canvas
holds the answer plus `<|eot_id|>`.
"""

import hashlib
import itertools
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

FAMILIES = ("arithmetic", "word_problem", "sort", "uppercase")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10
HELDOUT_SEED = 1234

CHAT_PREFIX = "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n"
CHAT_SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str  # the user message, without chat markup
    answer: str


def split_of(prompt: str) -> str:
    digest = hashlib.sha256(prompt.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT else "train"


def _arithmetic(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return Problem("arithmetic", f"What is {a}+{b}?", str(a + b))
    a, b = max(a, b), min(a, b)
    return Problem("arithmetic", f"What is {a}-{b}?", str(a - b))


_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo")
_ITEMS = ("apples", "pens", "books", "cards", "coins", "eggs", "shells", "stamps")


def _word_problem(rng: random.Random) -> Problem:
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        text, value = f"{name} has {a} {items}, buys {b} and gives away {c}.", a + b - c
    elif kind == 1:
        a = rng.randint(2, 20)
        b, c = rng.randint(1, a - 1), rng.randint(2, 20)
        text, value = f"{name} had {a} {items}, lost {b} and found {c}.", a - b + c
    else:
        a, b = rng.randint(2, 5), rng.randint(2, 6)
        c = rng.randint(1, a * b - 1)
        text, value = f"{name} buys {a} packs of {b} {items} and gives away {c}.", a * b - c
    return Problem("word_problem", f"{text} How many {items} now?", f"{value} {items}")


def _sort(rng: random.Random) -> Problem:
    digits = rng.sample(range(10), rng.randint(3, 5))
    return Problem("sort", "Sort: " + " ".join(map(str, digits)),
                   " ".join(map(str, sorted(digits))))


def _uppercase(rng: random.Random) -> Problem:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return Problem("uppercase", f"Uppercase: {word}", word.upper())


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic, "word_problem": _word_problem, "sort": _sort, "uppercase": _uppercase,
}


def sample(rng: random.Random, family: str, split: str) -> Problem:
    """Draws problems of `family` until one belongs to `split`."""
    assert split in SPLITS
    while True:
        problem = _GENERATORS[family](rng)
        if split_of(problem.prompt) == split:
            return problem


def stream(split: str, seed: int) -> Iterator[Problem]:
    """Endless problems cycling through the families, so any window is balanced."""
    rng = random.Random(seed)
    for family in itertools.cycle(FAMILIES):
        yield sample(rng, family, split)


def heldout(n: int = 1000, seed: int = HELDOUT_SEED) -> list[Problem]:
    """`n` distinct held-out problems, families interleaved so that any prefix is balanced."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    for i in range(n):
        problem = sample(rng, FAMILIES[i % len(FAMILIES)], "heldout")
        while problem.prompt in seen:
            problem = sample(rng, problem.family, "heldout")
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def render_chat(prompt: str) -> str:
    """The user message in LLaDA's chat template, ending with the assistant header."""
    return CHAT_PREFIX + prompt.strip() + CHAT_SUFFIX


def score(prediction: str, gold: str) -> bool:
    return prediction.strip() == gold.strip()
