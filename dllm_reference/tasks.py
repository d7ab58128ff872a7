"""Synthetic tasks with exact answers, for training and scoring small LLaDA checkpoints.

Two suites. The short suite (`SHORT`, the bundled examples/llada-tasks) has four
families, each a user message with a short multi-token answer:

* arithmetic: a three-digit number plus or minus a digit, with carries and borrows
  that may ripple ("What is 297+8?" -> "305", "What is 402-7?" -> "395").
* word_problem: two-step templated stories: find the person asked about, then apply a
  transfer to their count ("Ann has 5 pens and Ben has 3. Ann gives 2 to Ben. How many
  pens does Ben have?" -> "5 pens").
* sort: a short list of digits in ascending order ("Sort: 7 2 9 4" -> "2 4 7 9").
* uppercase: a lowercase string transformed to capitals ("Uppercase: kqzmt" -> "KQZMT").

The sizes are what a ~1M-parameter model learns in an hour on this CPU. Two-digit plus
two-digit sums and three-operand stories with numbers up to 20 stayed below 15% after
an hour (the model has to learn the answer's length before its first digit); a digit
as the second operand and single-digit stories keep carries and two steps while
leaving the model only single-digit facts to learn.

Every prompt falls into exactly one split by a hash of its text, so the training stream
and the held-out set can never share a prompt, whatever seeds are used to draw them.
Answers fit in 24 characters, so with this character-level tokenizer a 32-token canvas
holds the answer plus `<|eot_id|>`.

The long suite (`LONG`, examples/llada-long) has answers of 40-120 characters, the shape
of work the accelerations are about (later tokens depending on earlier ones, long spans
predictable from their neighbours) on a 128-token canvas:

* running_sum: a start and 5-10 digits added one at a time with the working written out
  ("Add step by step: 23 4 8 ..." -> "23+4=27, 27+8=35, ..."); each step's first operand
  is the previous step's result, so the tail cannot be right unless the head is.
* count: every integer from a to b ("Count from 97 to 112" -> "97 98 99 100 ... 112");
  long spans follow from their neighbours, and where it ends follows from the prompt.
"""

import hashlib
import itertools
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

SHORT = ("arithmetic", "word_problem", "sort", "uppercase")
LONG = ("running_sum", "count")
SUITES = {"short": SHORT, "long": LONG}
FAMILIES = SHORT + LONG
LONG_ANSWER = (40, 120)  # characters, = tokens with the character vocabulary
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
    a, b = rng.randint(100, 999), rng.randint(1, 9)
    if rng.random() < 0.5:
        return Problem("arithmetic", f"What is {a}+{b}?", str(a + b))
    return Problem("arithmetic", f"What is {a}-{b}?", str(a - b))


_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo")
_ITEMS = ("apples", "pens", "books", "cards", "coins", "eggs", "shells", "stamps")


def _word_problem(rng: random.Random) -> Problem:
    first, second = rng.sample(_NAMES, 2)
    items = rng.choice(_ITEMS)
    x, y = rng.randint(2, 9), rng.randint(1, 9)
    z = rng.randint(1, x)
    # Two steps: find who is asked about, then apply the transfer to their count.
    if rng.random() < 0.5:
        asked, value = first, x - z
    else:
        asked, value = second, y + z
    text = (f"{first} has {x} {items} and {second} has {y}. {first} gives {z} to {second}. "
            f"How many {items} does {asked} have?")
    return Problem("word_problem", text, f"{value} {items}")


def _sort(rng: random.Random) -> Problem:
    digits = rng.sample(range(10), rng.randint(3, 5))
    return Problem("sort", "Sort: " + " ".join(map(str, digits)),
                   " ".join(map(str, sorted(digits))))


def _uppercase(rng: random.Random) -> Problem:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    return Problem("uppercase", f"Uppercase: {word}", word.upper())


def _running_sum(rng: random.Random) -> Problem:
    while True:
        total = rng.randint(10, 49)
        addends = [rng.randint(1, 9) for _ in range(rng.randint(5, 10))]
        steps = []
        for a in addends:
            steps.append(f"{total}+{a}={total + a}")
            total += a
        answer = ", ".join(steps)
        if LONG_ANSWER[0] <= len(answer) <= LONG_ANSWER[1]:
            break
    start = steps[0].split("+")[0]
    return Problem("running_sum", f"Add step by step: {start} " + " ".join(map(str, addends)),
                   answer)


def _count(rng: random.Random) -> Problem:
    while True:
        a = rng.randint(10, 960)
        b = a + rng.randint(9, 39)
        answer = " ".join(map(str, range(a, b + 1)))
        if b <= 999 and LONG_ANSWER[0] <= len(answer) <= LONG_ANSWER[1]:
            return Problem("count", f"Count from {a} to {b}", answer)


_GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic, "word_problem": _word_problem, "sort": _sort, "uppercase": _uppercase,
    "running_sum": _running_sum, "count": _count,
}


def sample(rng: random.Random, family: str, split: str) -> Problem:
    """Draws problems of `family` until one belongs to `split`."""
    assert split in SPLITS
    while True:
        problem = _GENERATORS[family](rng)
        if split_of(problem.prompt) == split:
            return problem


def stream(split: str, seed: int, mix: tuple[str, ...] = SHORT) -> Iterator[Problem]:
    """Endless problems cycling through `mix` (family names, repeated to weight them)."""
    rng = random.Random(seed)
    for family in itertools.cycle(mix):
        yield sample(rng, family, split)


def heldout(n: int = 1000, seed: int = HELDOUT_SEED,
            families: tuple[str, ...] = SHORT) -> list[Problem]:
    """`n` distinct held-out problems, families interleaved so that any prefix is balanced."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems = []
    for i in range(n):
        problem = sample(rng, families[i % len(families)], "heldout")
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
