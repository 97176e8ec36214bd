"""Seeded generators (data/generators.py): determinism, exclusion, and each recipe's semantics."""
import re
import string
from collections import deque

import pytest

from tests.conftest import needs_data

from latentreason.data import generators as gen
from latentreason.data.base import SHARED_DATA

GENERATORS = {
    "arith": lambda n, seed, exclude=(): gen.generate_arith(n, seed=seed, exclude=exclude),
    "multiplication": lambda n, seed, exclude=(): gen.generate_multiplication(n, digits=4, seed=seed, exclude=exclude),
    "prosqa": lambda n, seed, exclude=(): gen.generate_prosqa(n, seed=seed, exclude=exclude),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_prefix_stable_and_excluding(name: str) -> None:
    make = GENERATORS[name]
    rows = make(12, "s")
    assert rows == make(12, "s")
    assert rows[:5] == make(5, "s")  # a limit only truncates
    assert [r["question"] for r in rows] != [r["question"] for r in make(12, "t")]
    assert len({r["question"] for r in rows}) == 12
    held = {r["question"] for r in rows[:4]}
    again = make(12, "s", exclude=held)
    assert not held & {r["question"] for r in again}
    assert again[:8] == rows[4:]  # excluded rows are skipped, the rest keep their order


def _eval_left_to_right(question: str, modulus: int) -> int:
    tokens = re.findall(r"\d+|[-+*]", question)
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op] % modulus
    return value


def test_arith_semantics_and_alphabet() -> None:
    rows = gen.generate_arith(300, seed=1, num_steps=4)
    for row in rows:
        assert re.fullmatch(r"\d+(?:[-+*]\d+){4}", row["question"])
        assert int(row["answer"]) == _eval_left_to_right(row["question"], 100)
        steps = row["chain"].split(" ")
        assert len(steps) == 4
        for step, nxt in zip(steps, steps[1:]):
            assert step.split("=")[1] == re.match(r"\d+", nxt).group(0)  # results chain on
        assert steps[-1].endswith(f"={row['answer']}")
        assert set("".join(row.values())) <= set(string.printable)
    assert {op for r in rows for op in re.findall(r"[-+*]", r["question"])} == {"+", "-", "*"}


def test_arith_knobs() -> None:
    row = gen.generate_arith(1, seed=0, num_steps=7, modulus=10, max_operand=9)[0]
    assert len(row["chain"].split(" ")) == 7 and int(row["answer"]) < 10
    with pytest.raises(ValueError, match="num_steps=0"):
        gen.generate_arith(1, seed=0, num_steps=0)
    with pytest.raises(ValueError, match="question space is too small"):
        gen.generate_arith(100, seed=0, num_steps=1, max_operand=2)  # only 3*3*3 = 27 questions


def test_multiplication_row_matches_worked_example() -> None:
    row = gen.multiplication_row(2365, 4347, 4)  # first row of the shipped 4x4 valid file
    assert row == {
        "question": "5 6 3 2 * 7 4 3 4",
        "chain": "5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 ) + 0 0 0 0 6 4 9 0",
        "answer": "5 5 6 0 8 2 0 1",
    }


@needs_data
@pytest.mark.parametrize("digits", [4, 5])
def test_multiplication_generator_reproduces_shipped_rows(digits: int) -> None:
    lines = (SHARED_DATA / "multiplication" / f"{digits}x{digits}" / "valid.txt").read_text().splitlines()
    for line in lines:
        question = line.split("||")[0]
        a, b = (int("".join(reversed(x.split()))) for x in question.split(" * "))
        row = gen.multiplication_row(a, b, digits)
        assert f"{row['question']}||{row['chain']} #### {row['answer']}" == line


def test_multiplication_operands_have_no_leading_zero() -> None:
    for row in gen.generate_multiplication(200, digits=5, seed=3):
        a, b = row["question"].split(" * ")
        assert len(a.split()) == len(b.split()) == 5
        assert a.split()[-1] != "0" and b.split()[-1] != "0"


def _distances(start: int, edges: list[list[int]]) -> dict[int, int]:
    out: dict[int, list[int]] = {}
    for u, v in edges:
        out.setdefault(u, []).append(v)
    dist, queue = {start: 0}, deque([start])
    while queue:
        u = queue.popleft()
        for v in out.get(u, []):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def test_prosqa_rows_are_well_posed() -> None:
    for row in gen.generate_prosqa(60, seed=5):
        sym, edges, root = row["idx_to_symbol"], row["edges"], row["root"]
        target, neg = row["target"], row["neg_target"]
        from_root, from_other = _distances(root, edges), _distances(1 - root, edges)
        assert from_root[target] == len(row["steps"])  # the chain is a shortest path
        assert neg not in from_root and target not in from_other and neg in from_other
        assert not any(u in (target, neg) for u, _ in edges)  # both are leaves
        assert all(u < v for u, v in edges)
        statements = set(re.findall(r"[^.?]+[.]", row["question"].rsplit(" Is ", 1)[0]))
        assert len(statements) == len(edges)
        assert row["question"].endswith("?") and f"Is {sym[root]} a " in row["question"]
        assert row["answer"] == f"{sym[root]} is a {sym[target]}."
        assert row["steps"][0] == f"{sym[root]} is a {row['steps'][1].split()[1]}."
        assert set(sym) <= set(gen.NAMES) | set(gen.CONCEPTS)
        assert 3 <= len(row["steps"]) <= 6
