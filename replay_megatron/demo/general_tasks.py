"""The demo's "general" corpus: short instruction tasks a tiny model can learn (issue 7, item 1).

Four families, each a handful of templates with short, exactly checkable answers: arithmetic, string
manipulation, fact lookup over a small table given in the prompt, and list operations. Prompts are single
lines (the sentencepiece pre-tokenizer splits on spaces, not newlines). Every generator draws only from
the `random.Random` it is given, so a seed fixes the corpus byte for byte.
"""
from __future__ import annotations

import random
from typing import Callable

WORDS = (
    "apple bread chair cloud dance eagle field glass horse island jacket kettle lemon magnet night ocean "
    "pencil queen river stone tiger umbrella valley window yellow zebra anchor basket candle desert engine "
    "forest garden harbor insect jungle kitchen ladder mirror needle orange planet rabbit silver tunnel "
    "violin wagon bottle butter circle copper dragon feather guitar hammer jewel lantern marble pepper"
).split()
NAMES = "ann bob cara dan eve finn gina hugo iris jack kate leo mia noah olga paul rosa sam tina ugo vera will".split()
CITIES = "paris rome oslo lima cairo delhi tokyo quito dakar hanoi vienna madrid".split()
JOBS = "baker nurse pilot chef judge miner tailor farmer".split()

Task = Callable[[random.Random], tuple[str, str]]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} + {b}?", str(a + b)


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 999), rng.randint(0, 999)), reverse=True)
    return f"What is {a} - {b}?", str(a - b)


def _mul(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return f"What is {a} * {b}?", str(a * b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word {w}.", w[::-1]


def _upper(rng: random.Random) -> tuple[str, str]:
    ws = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return f"Write in uppercase: {ws}", ws.upper()


def _count_letter(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    letter = rng.choice(sorted(set(w)) + ["a", "e", "o"])
    return f"How many times does the letter {letter} appear in {w}?", str(w.count(letter))


def _sort_words(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(2, 4))
    return f"Sort these words: {' '.join(ws)}", " ".join(sorted(ws))


def _lookup(rng: random.Random) -> tuple[str, str]:
    """A 3-4 row table of people in the prompt; the question asks one cell of one row."""
    people = rng.sample(NAMES, rng.randint(3, 4))
    rows = [(p, rng.choice(CITIES), str(rng.randint(18, 80)), rng.choice(JOBS)) for p in people]
    table = " ; ".join(", ".join(r) for r in [("name", "city", "age", "job"), *rows])
    row = rng.choice(rows)
    column = rng.randint(1, 3)
    return f"Table: {table} . What is the {('city', 'age', 'job')[column - 1]} of {row[0]}?", row[column]


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]


def _list_max(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng)
    return f"What is the largest of {', '.join(map(str, xs))}?", str(max(xs))


def _list_min(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng)
    return f"What is the smallest of {', '.join(map(str, xs))}?", str(min(xs))


def _list_sum(rng: random.Random) -> tuple[str, str]:
    xs = _numbers(rng)[:4]
    return f"What is the sum of {', '.join(map(str, xs))}?", str(sum(xs))


def _list_last(rng: random.Random) -> tuple[str, str]:
    ws = rng.sample(WORDS, rng.randint(3, 5))
    return f"What is the last item in: {', '.join(ws)}?", ws[-1]


FAMILIES: dict[str, tuple[Task, ...]] = {
    "arithmetic": (_add, _sub, _mul),
    "string": (_reverse, _upper, _count_letter, _sort_words),
    "lookup": (_lookup,),
    "list": (_list_max, _list_min, _list_sum, _list_last),
}


def general_sample(rng: random.Random) -> tuple[str, str, str]:
    """One (family, prompt, response): a family uniformly, then one of its templates uniformly."""
    family = rng.choice(sorted(FAMILIES))
    prompt, response = rng.choice(FAMILIES[family])(rng)
    return family, prompt, response
