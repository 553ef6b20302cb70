"""A deterministic suite of synthetic instruction tasks with exact answers.

Each task is a seeded generator of Alpaca-format examples (``{"instruction", "input",
"output"}``) whose answer follows from the input by a fixed rule, so a model's output
can be scored by exact match. They serve as an offline continual-learning benchmark:
train on one task after another and watch the earlier ones.

``TASKS`` maps a task name to a :class:`Task`; ``make_split(name, n_train, n_eval, seed)``
returns disjoint train and eval examples (no (instruction, input) pair appears in both);
the eval set depends only on ``(name, seed, n_eval)``, so it stays fixed when ``n_train``
changes. ``export_tasks(out_dir)`` writes ``out_dir/<task>/{train,eval}.jsonl``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nn_core.errors import NNError
from nn_core.io import atomic_write_text

# Short, common, lowercase words: every task input is built from them.
_WORD_TEXT = """
apple river stone cloud green house light table water music paper garden window yellow
bread chair dream eagle field glass honey island jacket kettle lemon market night ocean
pencil queen rabbit silver tiger umbrella violin winter yard zebra anchor basket candle
desert engine forest guitar harbor igloo jungle kitten ladder mirror needle orange parrot
quilt rocket saddle tunnel valley wagon button camera dinner feather hammer insect jelly
kingdom lantern magnet nectar onion pepper ribbon sugar thunder velvet walnut bridge
castle dragon falcon ginger hollow marble planet shadow summer timber meadow copper
butter circle pillow puzzle rain snow moon star tree bird fish wolf bear lion horse
mouse frog duck goat sheep cow pig owl fox deer seed leaf root bark rose lily fern moss
"""
WORDS = tuple(_WORD_TEXT.split())

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999999, e.g. 342 -> ``three hundred forty-two``."""
    if not 0 <= n <= 999_999:
        raise ValueError(f"number_words supports 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    return f"{number_words(thousands)} thousand" + (f" {number_words(rest)}" if rest else "")


def normalize_answer(text: str) -> str:
    """Surrounding whitespace stripped and inner runs of whitespace collapsed to one space."""
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class Task:
    """One synthetic task: ``make(rng) -> (instruction, input, output)``."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, str]]

    def example(self, rng: random.Random) -> dict:
        instruction, inp, out = self.make(rng)
        return {"instruction": instruction, "input": inp, "output": out}

    def score(self, prediction: str, reference: str) -> bool:
        """Exact match after :func:`normalize_answer` on both sides."""
        return normalize_answer(prediction) == normalize_answer(reference)

    def accuracy(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        if len(predictions) != len(references) or not references:
            raise NNError(f"{len(predictions)} predictions for {len(references)} references: "
                          "give one prediction per example")
        return sum(self.score(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


TASKS: dict[str, Task] = {}


def _task(name: str):
    def register(fn: Callable[[random.Random], tuple[str, str, str]]):
        TASKS[name] = Task(name, " ".join((fn.__doc__ or "").split()), fn)
        return fn
    return register


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


@_task("reverse_words")
def _reverse_words(rng):
    """Reverse the order of 3-7 words: 'a b c' -> 'c b a'."""
    w = _words(rng, 3, 7)
    return "Reverse the order of the words.", " ".join(w), " ".join(reversed(w))


@_task("uppercase")
def _uppercase(rng):
    """Write 2-6 words in capital letters: 'a b' -> 'A B'."""
    w = " ".join(_words(rng, 2, 6))
    return "Write the text in capital letters.", w, w.upper()


@_task("sort_numbers")
def _sort_numbers(rng):
    """Sort 3-8 integers in 0..99 ascending, comma-separated: '5, 2, 9' -> '2, 5, 9'."""
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    return ("Sort the numbers from smallest to largest.", ", ".join(map(str, xs)),
            ", ".join(map(str, sorted(xs))))


@_task("add")
def _add(rng):
    """Add two integers in 0..999: '17 and 25' -> '42'."""
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return "Add the two numbers.", f"{a} and {b}", str(a + b)


@_task("count_letter")
def _count_letter(rng):
    """Count occurrences of a named letter in 3-6 words (the letter is in the instruction)."""
    text = " ".join(_words(rng, 3, 6))
    letter = rng.choice([*sorted(set(text.replace(" ", ""))), "z", "q", "x"])
    return (f"Count how many times the letter '{letter}' appears in the text.", text,
            str(text.count(letter)))


@_task("copy")
def _copy(rng):
    """Repeat 2-8 words exactly."""
    w = " ".join(_words(rng, 2, 8))
    return "Repeat the text exactly.", w, w


@_task("spell_number")
def _spell_number(rng):
    """Write an integer in 0..99999 in English words: 342 -> 'three hundred forty-two'."""
    n = rng.randint(0, 99_999)
    return "Write the number in English words.", str(n), number_words(n)


@_task("kth_word")
def _kth_word(rng):
    """Give the k-th word (k named in the instruction, 1-based) of 4-8 words."""
    w = _words(rng, 4, 8)
    k = rng.randint(1, len(w))
    return f"Give the {_ORDINAL.get(k, f'{k}th')} word of the text.", " ".join(w), w[k - 1]


@_task("first_letters")
def _first_letters(rng):
    """Join the first letter of each of 3-7 words: 'red old ant' -> 'roa'."""
    w = _words(rng, 3, 7)
    return "Write the first letter of each word, joined together.", " ".join(w), "".join(x[0] for x in w)


@_task("max_number")
def _max_number(rng):
    """Give the largest of 3-8 integers in 0..999."""
    xs = [rng.randint(0, 999) for _ in range(rng.randint(3, 8))]
    return "Give the largest number in the list.", ", ".join(map(str, xs)), str(max(xs))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise NNError(f"unknown task '{name}': use one of {', '.join(TASKS)}")
    return TASKS[name]


def _draw(task: Task, rng: random.Random, n: int, exclude: set, what: str) -> list[dict]:
    out: list[dict] = []
    seen = set(exclude)
    misses = 0
    while len(out) < n:
        ex = task.example(rng)
        key = (ex["instruction"], ex["input"])
        if key in seen:
            # Many repeats in a row mean the task's input space is (nearly) used up.
            misses += 1
            if misses > 2000:
                raise NNError(f"task '{task.name}' found only {len(out)} distinct {what} examples "
                              f"of {n} asked: ask for fewer examples")
            continue
        misses = 0
        seen.add(key)
        out.append(ex)
    return out


def make_split(name: str, n_train: int, n_eval: int, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": [...], "eval": [...]}`` of distinct examples, disjoint between splits."""
    task = get_task(name)
    if n_train < 0 or n_eval < 0:
        raise NNError(f"example counts must be non-negative, got n_train={n_train}, n_eval={n_eval}")
    # String seeds are hashed (SHA-512) by random.Random: stable across runs and platforms.
    evals = _draw(task, random.Random(f"{name}:{seed}:eval"), n_eval, set(), "eval")
    taken = {(e["instruction"], e["input"]) for e in evals}
    train = _draw(task, random.Random(f"{name}:{seed}:train"), n_train, taken, "train")
    return {"train": train, "eval": evals}


def export_tasks(out_dir: str | Path, names: Sequence[str] | None = None, *, n_train: int = 1000,
                 n_eval: int = 100, seed: int = 0) -> list[Path]:
    """Write ``out_dir/<task>/train.jsonl`` and ``eval.jsonl`` per task; returns the paths."""
    names = list(TASKS) if names is None else list(names)
    for n in names:
        get_task(n)
    written: list[Path] = []
    for name in names:
        split = make_split(name, n_train, n_eval, seed)
        for part in ("train", "eval"):
            path = Path(out_dir) / name / f"{part}.jsonl"
            atomic_write_text(path, "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in split[part]))
            written.append(path)
    return written
