"""Seeded generators for the synthetic tasks: ``arith``, ProsQA-style graphs, multiplication.

Each ``generate_*`` function is pure: the same arguments give the same rows, in the same order, on
any machine (``random.Random`` seeded with a string, never the global RNG or ``hash()``). Rows are
plain dicts in the shipped files' own formats, so generated and file-backed rows go through the
same parser in :mod:`latentreason.data.tasks`.

Every generator yields DISTINCT questions and skips any in ``exclude``; that is how a train split
is guaranteed to hold out its validation/test questions. Because rows are drawn one at a time from
one stream, the first ``k`` rows of ``generate_x(n)`` equal ``generate_x(k)``, so a ``limit``
costs only what it keeps.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Any

Row = dict[str, Any]


def _distinct(make: Callable[[random.Random], Row], n: int, seed: int | str, exclude: Collection[str]) -> list[Row]:
    """Draw rows until ``n`` have questions that are new and not in ``exclude``."""
    rng = random.Random(str(seed))
    seen = set(exclude)
    rows: list[Row] = []
    budget = 20 * n + 1000
    while len(rows) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(
                f"could only generate {len(rows)} distinct questions of the {n} asked for (seed "
                f"{seed!r}); the question space is too small for these options: ask for fewer rows"
            )
        row = make(rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


# -- arith ---------------------------------------------------------------------------------------
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


def arith_row(rng: random.Random, num_steps: int = 4, modulus: int = 100, max_operand: int = 99) -> Row:
    """``37+12*3-45+8`` evaluated LEFT TO RIGHT modulo ``modulus``; chain ``37+12=49 49*3=47 ...``.

    Why this recipe: every intermediate value depends on all earlier ones and there is no
    precedence to exploit, so a small model cannot shortcut to the answer without the chain.
    """
    value = rng.randint(0, max_operand)
    question, steps = str(value), []
    for _ in range(num_steps):
        op, operand = rng.choice("+-*"), rng.randint(0, max_operand)
        result = _OPS[op](value, operand) % modulus
        question += f"{op}{operand}"
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return {"question": question, "chain": " ".join(steps), "answer": str(value)}


def generate_arith(
    n: int, *, seed: int | str, num_steps: int = 4, modulus: int = 100, max_operand: int = 99,
    exclude: Collection[str] = (),
) -> list[Row]:
    for key, value, low in (("num_steps", num_steps, 1), ("modulus", modulus, 2), ("max_operand", max_operand, 1)):
        if value < low:
            raise ValueError(f"arith: {key}={value}, must be >= {low}")
    return _distinct(lambda rng: arith_row(rng, num_steps, modulus, max_operand), n, seed, exclude)


# -- multiplication (iCoT format) ----------------------------------------------------------------
def _lsb_digits(value: int, width: int) -> str:
    """``820655`` at width 7 -> ``"5 5 6 0 2 8 0"`` (least significant digit first, zero-padded)."""
    return " ".join(reversed(str(value).zfill(width)))


def multiplication_row(a: int, b: int, digits: int) -> Row:
    """The iCoT row for ``a * b``: partial products of ``a`` by each digit of ``b`` (shifted), each
    followed by the running sum in parentheses except after the last; all digit strings LSB first.

    Widths (from the shipped files): partial ``i`` has ``digits + 1 + i`` digits, the running sum
    after partial ``i`` the same, the product ``2 * digits``.
    """
    b_digits = [int(c) for c in reversed(str(b).zfill(digits))]
    parts, total = [], 0
    for i, d in enumerate(b_digits):
        partial = a * d * 10**i
        total += partial
        parts.append(_lsb_digits(partial, digits + 1 + i))
        if 0 < i < digits - 1:
            parts[-1] += f" ( {_lsb_digits(total, digits + 1 + i)} )"
    question = f"{_lsb_digits(a, digits)} * {_lsb_digits(b, digits)}"
    return {"question": question, "chain": " + ".join(parts), "answer": _lsb_digits(a * b, 2 * digits)}


def generate_multiplication(n: int, *, digits: int, seed: int | str, exclude: Collection[str] = ()) -> list[Row]:
    """Random ``digits``-digit operands without leading zeros (as in the shipped valid files)."""
    if digits < 2:
        raise ValueError(f"multiplication: digits={digits}, must be >= 2")
    low, high = 10 ** (digits - 1), 10**digits - 1

    def make(rng: random.Random) -> Row:
        return multiplication_row(rng.randint(low, high), rng.randint(low, high), digits)

    return _distinct(make, n, seed, exclude)


# -- ProsQA --------------------------------------------------------------------------------------
# Vocabulary of the ProsQA validation split (Coconut, Hao et al. 2024): 17 names, 38 concepts.
NAMES = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly",
         "Rex", "Sally", "Sam", "Stella", "Tom", "Wren")
CONCEPTS = ("bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus",
            "grimpus", "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus",
            "numpus", "quimpus", "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus",
            "terpus", "timpus", "tumpus", "vumpus", "worpus", "wumpus", "yerpus", "yimpus", "yumpus",
            "zhorpus", "zumpus")


CROSS_EDGE_RATE = 0.05  # share of random edges allowed between the two people's subgraphs


class _Dag:
    """A DAG under construction that keeps ProsQA's answer well defined while edges are added.

    ``level``: 0 for the two main people, -1 for distractor people, else the concept's layer.
    ``part``: which main person's subgraph a node belongs to (-1: distractor person).
    """

    def __init__(self, level: list[int], part: list[int], root: int, target: int, neg_target: int) -> None:
        self.level, self.part, self.n = level, part, len(level)
        self.root, self.other, self.target, self.neg_target = root, 1 - root, target, neg_target
        self.desc = [1 << i for i in range(self.n)]  # bitmask of the nodes each node reaches
        self.edges: set[tuple[int, int]] = set()
        self.has_parent: set[int] = set()

    def allowed(self, u: int, v: int) -> bool:
        """Edge ``u -> v`` keeps: index order, leaves as leaves, the gold path a shortest path
        (at most one layer up), the target unreachable from the other person and the negative
        target unreachable from the person asked about."""
        lv, desc = self.level, self.desc
        if (u, v) in self.edges or u >= v or u in (self.target, self.neg_target) or lv[v] < 1:
            return False
        if lv[u] >= 0 and lv[v] > lv[u] + 1:
            return False
        if desc[self.root] >> u & 1 and desc[v] >> self.neg_target & 1:
            return False
        return not (desc[self.other] >> u & 1 and desc[v] >> self.target & 1)

    def add(self, u: int, v: int) -> None:
        self.edges.add((u, v))
        self.has_parent.add(v)
        for a in range(self.n):
            if self.desc[a] >> u & 1:
                self.desc[a] |= self.desc[v]

    def grow(self, rng: random.Random, wanted: int) -> None:
        """Give every concept a parent and every distractor person a child, then add random edges
        (mostly within one person's subgraph: the shipped graphs rarely share nodes)."""
        lv, part = self.level, self.part
        heads = [[v for v in range(u + 1, self.n) if lv[v] >= 1 and (lv[u] < 0 or lv[v] <= lv[u] + 1)]
                 for u in range(self.n)]
        same_side = [[v for v in vs if part[u] < 0 or part[v] == part[u]] for u, vs in enumerate(heads)]
        tails: list[list[int]] = [[] for _ in range(self.n)]
        for u, vs in enumerate(same_side):
            for v in vs:
                tails[v].append(u)
        for v in range(2, self.n):
            if lv[v] >= 1 and v not in self.has_parent:
                parents = [u for u in tails[v] if self.allowed(u, v)]
                self.add(rng.choice(parents or [u for u in range(v) if self.allowed(u, v)]), v)
            elif lv[v] < 0:
                self.add(v, rng.choice(heads[v]))
        for _ in range(20 * self.n):
            if len(self.edges) >= wanted:
                break
            u = rng.randrange(self.n)
            pool = heads[u] if rng.random() < CROSS_EDGE_RATE else same_side[u]
            if pool:
                v = rng.choice(pool)
                if self.allowed(u, v):
                    self.add(u, v)


def prosqa_row(rng: random.Random) -> Row:
    """One ProsQA-style row: a random concept DAG, "Is <person> a <target> or <neg_target>?".

    Recipe, mirroring the statistics of the shipped valid split (300 rows): two main people
    (node ids 0 and 1, one is asked about), 0-4 distractor people, 15-25 concepts, about 1.6 edges
    per node, edges only from lower to higher id. Concepts get layers; the gold path puts its
    k-th concept in layer k (3-6 steps) and no edge climbs more than one layer, so the gold path is
    a shortest path. The target is reachable only from the person asked about, the negative target
    (1-4 steps) only from the other; both are leaves. The chain is the gold path, one statement per
    edge; the question states every edge, in random order.
    """
    depth = rng.choices((3, 4, 5, 6), weights=(124, 133, 36, 7))[0]
    neg_depth = min(depth, rng.choices((1, 2, 3, 4), weights=(63, 158, 72, 7))[0])
    n_concepts = max(depth + neg_depth, round(rng.triangular(15, 25, 20.5)))
    n_extra = rng.choices((0, 1, 2, 3, 4), weights=(180, 93, 21, 5, 1))[0]
    words, names = rng.sample(CONCEPTS, n_concepts), rng.sample(NAMES, 2 + n_extra)
    # concepts 0..depth-1: gold path; then the negative path; then distractors
    layer = [*range(1, depth + 1), *range(1, neg_depth + 1)]
    layer += [rng.randint(1, depth) for _ in range(n_concepts - len(layer))]
    side = [0] * depth + [1] * neg_depth + [int(rng.random() < 0.45) for _ in range(n_concepts - depth - neg_depth)]
    order: list[int] = sorted(range(n_concepts), key=lambda c: (layer[c], rng.random()))
    for person in range(2, 2 + n_extra):  # distractor people (as -person) go before some concept
        order.insert(rng.randrange(len(order)), -person)
    node = {c: i + 2 for i, c in enumerate(order)}
    symbol, level, part = names[:2] + [""] * len(order), [0] * (2 + len(order)), [-1] * (2 + len(order))
    for c, i in node.items():
        symbol[i], level[i], part[i] = (names[-c], -1, -1) if c < 0 else (words[c], layer[c], side[c])
    root = rng.randrange(2)
    part[root], part[1 - root] = 0, 1
    gold = [root] + [node[c] for c in range(depth)]
    negative = [1 - root] + [node[c] for c in range(depth, depth + neg_depth)]
    dag = _Dag(level, part, root, gold[-1], negative[-1])
    for path in (gold, negative):
        for u, v in zip(path, path[1:]):
            dag.add(u, v)
    dag.grow(rng, wanted=round(dag.n * rng.uniform(1.3, 1.9)))

    def say(u: int, v: int) -> str:
        return f"{symbol[u]} is a {symbol[v]}." if level[u] <= 0 else f"Every {symbol[u]} is a {symbol[v]}."

    statements = [say(u, v) for u, v in sorted(dag.edges)]
    rng.shuffle(statements)
    asked = [symbol[dag.target], symbol[dag.neg_target]]
    rng.shuffle(asked)
    return {
        "question": " ".join(statements) + f" Is {symbol[root]} a {asked[0]} or {asked[1]}?",
        "steps": [say(u, v) for u, v in zip(gold, gold[1:])],
        "answer": f"{symbol[root]} is a {symbol[dag.target]}.",
        "idx_to_symbol": symbol,
        "edges": [list(e) for e in sorted(dag.edges, key=lambda e: (e[1], e[0]))],
        "root": root,
        "target": dag.target,
        "neg_target": dag.neg_target,
    }


def generate_prosqa(n: int, *, seed: int | str, exclude: Collection[str] = ()) -> list[Row]:
    return _distinct(prosqa_row, n, seed, exclude)
