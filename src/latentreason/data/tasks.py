"""The built-in tasks, registered in :data:`TASKS` by the names users type.

Each task turns raw rows (:mod:`loaders`) or generated rows (:mod:`generators`) into
:class:`Example` objects and fixes its split policy. Held-out guarantees are enforced here: a
train split never contains a question (whitespace-normalised) of the same task's valid/test split.

Split decisions (see each class for details):

* ``gsm8k`` / ``gsm8k-aug`` share one held-out set: the 500 GSM8K-Aug validation questions, all of
  which occur in GSM8K's train.jsonl (GSM8K-Aug carved its validation split from GSM8K train).
  Both tasks' ``train`` exclude them, so neither trains on the other's validation questions.
* ``aqua`` ships only ``valid`` (alias ``dev``); it is an evaluation task.
* ``prosqa``, ``multiplication-*``: ``valid`` from the shipped file, ``train`` generated with the
  same recipe and format, minus the valid questions. ``prosqa`` also has a generated ``dev``
  split (excluded from ``train``) to select models on, leaving ``valid`` to report on.
* ``arith``: every split generated from disjoint seeds; ``train`` excludes valid and test.

Tasks meant for pretrained LMs (GSM8K, GSM8K-Aug, AQuA, ProsQA) carry a one-line instruction that
names the ``####`` answer format (zero-shot evaluation depends on it); the tasks for small models
trained from scratch (multiplication, arith) have none, to keep prompts short.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from latentreason.data import answers, generators
from latentreason.data.base import SHARED_DATA, TASKS, DataError, Example, Score, Task
from latentreason.data.loaders import Row, field, locate, memo, read_rows, source_key

log = logging.getLogger(__name__)
T = TypeVar("T")


def norm_question(text: str) -> str:
    """Whitespace-normalised question text: the key for overlap checks between splits."""
    return " ".join(text.split())


def _count(limit: int | None, total: int) -> int:
    """How many rows a ``limit`` keeps out of ``total``."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}, must be >= 0 (or None for all rows)")
    return total if limit is None else min(limit, total)


def _take(items: list[Example], limit: int | None) -> list[Example]:
    return items[: _count(limit, len(items))]


def _parsed(tag: str, source: Path | str, fmt: str, parse: Callable[[int, Row], T],
            hub_split: str = "validation", hub_config: str | None = None) -> list[T]:
    """``parse(index, row)`` over every row of a file (or hub split), cached with the file."""

    def make() -> list[T]:
        return [parse(i, row) for i, row in enumerate(read_rows(source, fmt, hub_split, hub_config))]

    return memo((tag, *source_key(source)), make)


def _number(where: str, name: str, text: str) -> str:
    value = answers.normalize_number(text)
    if answers.to_number(value) is None:
        raise DataError(f"{where}: field {name!r}: answer {text.strip()!r} is not a number")
    return value


def _generated(task: Task, split: str, rows: list[dict[str, Any]], chain_name: str) -> list[Example]:
    """Examples from ``{"question", "chain", "answer"}`` rows (generated or iCoT text files)."""
    return [
        Example(f"{task.name}-{split}-{i}", r["question"], r["answer"], r["chain"], {chain_name: r["chain"]})
        for i, r in enumerate(rows)
    ]


# -- GSM8K ---------------------------------------------------------------------------------------
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL_LINE = re.compile(r"^#### ?(.*)$", re.M)
_EQUATION_CHAIN = re.compile(r"<<[^<>]*>>(?: <<[^<>]*>>)*")
GSM8K_FALLBACK_VALID = 500  # valid = the last 500 rows when no GSM8K-Aug valid file is found


def parse_gsm8k(index: int, row: Row) -> tuple[str, str, str, str, tuple[str, ...]]:
    """``(question, natural chain, equation chain, answer, natural steps)`` from a GSM8K
    ``{"question","answer"}`` row.

    The natural chain is the worked solution without its ``<<...>>`` calculator annotations and
    ``####`` line, lines joined by single spaces; its steps are those lines (46% of GSM8K's lines
    end without a full stop, so sentences would merge them); the equation chain is the annotations
    alone (``<<48/2=24>> <<48+24=72>>``), which is exactly the GSM8K-Aug chain format.
    """
    where = row[0]
    question, solution = field(row, "question"), field(row, "answer")
    finals = list(_FINAL_LINE.finditer(solution))
    if not finals:
        raise DataError(f"{where}: field 'answer' has no '#### ' line")
    body = solution[: finals[-1].start()]
    equations = _ANNOTATION.findall(body)
    if body.count("<<") != len(equations) or body.count(">>") != len(equations):
        raise DataError(f"{where}: field 'answer' has an unbalanced '<<...>>' annotation")
    lines = tuple(line.strip() for line in _ANNOTATION.sub("", body).splitlines() if line.strip())
    equation_chain = " ".join(f"<<{e}>>" for e in equations)
    return question.strip(), " ".join(lines), equation_chain, _number(where, "answer", finals[-1].group(1)), lines


def parse_gsm8k_aug(index: int, row: Row) -> tuple[str, str, str]:
    """``(question, equation chain, answer)`` from a ``question||<<eq>> <<eq>> #### answer`` row.

    The chain may be empty: 6 shipped valid rows have none (their GSM8K solutions have no
    annotations either).
    """
    where = row[0]
    question, chain, answer = field(row, "question"), field(row, "chain", empty_ok=True), field(row, "answer")
    if chain.strip() and not _EQUATION_CHAIN.fullmatch(chain.strip()):
        raise DataError(f"{where}: field 'chain' must be '<<eq>>' annotations separated by spaces, got {chain:.60}")
    return question.strip(), chain.strip(), _number(where, "answer", answer)


def gsm8k_rows(source: Path | str) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    return _parsed("gsm8k", source, "jsonl", parse_gsm8k, hub_split="train", hub_config="main")


def gsm8k_aug_rows(source: Path | str) -> list[tuple[str, str, str]]:
    return _parsed("gsm8k-aug", source, "pipes", parse_gsm8k_aug)


def _default_aug_valid() -> Path | None:
    file = SHARED_DATA / "gsm8k_aug" / "valid.txt"
    return file if file.is_file() else None


@TASKS.register("gsm8k")
class GSM8K(Task):
    """Grade-school math (Cobbe et al. 2021) with natural (default) and equation-only chains.

    ``valid`` = the rows of train.jsonl whose questions are GSM8K-Aug's validation questions
    (option ``holdout``: a GSM8K-Aug valid.txt or its folder; default the shared copy), in that
    file's order, so ``gsm8k`` and ``gsm8k-aug`` validate on the same 500 questions. Without such
    a file, the last 500 rows are the valid split (logged). ``train`` = every other row.
    """

    name = "gsm8k"
    version = 1
    instruction = "Solve the math word problem step by step. End with the final answer as '#### <number>'."
    option_defaults: ClassVar[dict[str, Any]] = {"holdout": None}

    def chain_steps(self, ex: Example) -> list[str]:
        """Equation chains step by annotation; natural chains by the solution's lines."""
        if self.chain_format == "equations":
            return self.chain_text(ex).split()
        return list(ex.meta.get("steps") or _sentences(self.chain_text(ex)))

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        source = locate(self.path, SHARED_DATA / "gsm8k", "train.jsonl")
        holdout = self.options["holdout"]
        held_file = locate(holdout, SHARED_DATA / "gsm8k_aug", "valid.txt") if holdout else _default_aug_valid()
        rows = list(enumerate(gsm8k_rows(source)))
        if held_file is None:
            log.warning("gsm8k: no GSM8K-Aug valid file found; using the last %d rows as valid", GSM8K_FALLBACK_VALID)
            cut = max(0, len(rows) - GSM8K_FALLBACK_VALID)
            chosen = rows[cut:] if split == "valid" else rows[:cut]
        else:
            held = [norm_question(q) for q, _, _ in gsm8k_aug_rows(held_file)]
            if split == "valid":
                by_question = {norm_question(r[1][0]): r for r in rows}
                chosen = [by_question[q] for q in held if q in by_question]
                if len(chosen) < len(held):  # valid = the held-out questions found in the train file
                    log.warning("gsm8k: %d of the %d held-out questions of %s are not in %s: valid keeps %d",
                                len(held) - len(chosen), len(held), held_file, source, len(chosen))
            else:
                held_set = set(held)
                chosen = [r for r in rows if norm_question(r[1][0]) not in held_set]
        return _take([self._example(split, i, row) for i, row in chosen], limit)

    def _example(self, split: str, index: int, row: tuple[str, str, str, str, tuple[str, ...]]) -> Example:
        question, natural, equations, answer, steps = row
        chains = {"natural": natural, "equations": equations}
        return Example(f"{self.name}-{split}-{index}", question, answer, natural, chains, meta={"steps": list(steps)})


@TASKS.register("gsm8k-aug")
class GSM8KAug(Task):
    """GSM8K with equation-only chains, the format of iCoT / Coconut / CODI (Deng et al. 2023).

    ``valid`` = gsm8k_aug/valid.txt. The 385k-row augmented train file is not shipped, so
    ``train`` is derived from GSM8K's train.jsonl (option ``train_path``): its annotation chains,
    minus the valid questions. Rows without annotations keep an empty chain, as in valid.txt.
    """

    name = "gsm8k-aug"
    version = 1
    instruction = ("Solve the math word problem. Write each calculation as <<expression=result>>, "
                   "then end with the final answer as '#### <number>'.")
    option_defaults: ClassVar[dict[str, Any]] = {"train_path": None}

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        valid = gsm8k_aug_rows(locate(self.path, SHARED_DATA / "gsm8k_aug", "valid.txt"))
        if split == "valid":
            rows = [{"question": q, "chain": c, "answer": a} for q, c, a in valid]
            return _take(_generated(self, split, rows, "equations"), limit)
        held = {norm_question(q) for q, _, _ in valid}
        source = locate(self.options["train_path"], SHARED_DATA / "gsm8k", "train.jsonl")
        examples = [
            Example(f"{self.name}-train-{i}", q, a, eq, {"equations": eq})
            for i, (q, _, eq, a, _) in enumerate(gsm8k_rows(source))
            if norm_question(q) not in held
        ]
        return _take(examples, limit)


# -- AQuA ----------------------------------------------------------------------------------------
@TASKS.register("aqua")
class AQuA(Task):
    """AQuA-RAT multiple choice (Ling et al. 2017): gold = the letter; chain = the rationale.

    Only the dev file is shipped, so the task has one split, ``valid`` (alias ``dev``).
    """

    name = "aqua"
    version = 1
    instruction = "Answer the multiple-choice question step by step. End with the correct option as '#### <letter>'."
    splits: ClassVar[tuple[str, ...]] = ("valid",)
    answer_kind = "choice"

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        split = "valid" if split == "dev" else split
        self.check_split(split)
        source = locate(self.path, SHARED_DATA / "aqua", "dev.json")
        return _take(_parsed("aqua", source, "jsonl", self.parse, hub_config="raw"), limit)

    @classmethod
    def parse(cls, index: int, row: Row) -> Example:
        where = row[0]
        question, rationale, correct = field(row, "question"), field(row, "rationale"), field(row, "correct")
        options = field(row, "options", list)
        letters = [answers.split_option(o)[0] if isinstance(o, str) else "" for o in options]
        if letters != list("ABCDE"[: len(options)]) or len(options) < 2:
            raise DataError(f"{where}: field 'options' must be strings 'A)...', 'B)...' in order; got {options!r:.60}")
        if correct.strip() not in letters:
            raise DataError(f"{where}: field 'correct' must be one of {', '.join(letters)}, got {correct!r}")
        chain = " ".join(line.strip() for line in rationale.splitlines() if line.strip())
        return Example(f"{cls.name}-valid-{index}", question.strip(), correct.strip(), chain,
                       {"rationale": chain}, options=tuple(o.strip() for o in options))

    def prompt(self, ex: Example, instruction: bool = True) -> str:
        text = f"{ex.question}\nOptions: {' '.join(ex.options)}"
        return f"{self.instruction}\n{text}" if self.instruction and instruction else text


# -- ProsQA --------------------------------------------------------------------------------------
_PROSQA_QUESTION = re.compile(r"Is (\S+) an? (\S+) or (\S+)\?\s*$")


def parse_prosqa(index: int, row: Row, split: str = "valid") -> Example:
    """A ProsQA row (the shipped JSON, or a generated one) as an Example.

    The gold answer stays the sentence ("Tom is a lempus."); ``options`` = the two concepts the
    question offers, so the text checker scores which one a prediction names (see
    :func:`answers.check_text`): robust to phrasing, strict about hedging between both.
    """
    where = row[0]
    question, answer, steps = field(row, "question"), field(row, "answer"), field(row, "steps", list)
    symbols, edges = field(row, "idx_to_symbol", list), field(row, "edges", list)
    if not all(isinstance(s, str) and s.strip() for s in symbols):
        raise DataError(f"{where}: field 'idx_to_symbol' must be a list of non-empty strings")
    nodes = {key: field(row, key, int) for key in ("root", "target", "neg_target")}
    for key, value in nodes.items():
        if not 0 <= value < len(symbols):
            raise DataError(f"{where}: field {key!r}={value} is not an index into 'idx_to_symbol'")
    if not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError(f"{where}: field 'steps' must be a list of non-empty strings")
    if not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and 0 <= x < len(symbols) for x in e)
               for e in edges):
        raise DataError(f"{where}: field 'edges' must be a list of [from, to] node indices")
    m = _PROSQA_QUESTION.search(question)
    offered = (symbols[nodes["target"]], symbols[nodes["neg_target"]])
    if not m or sorted(m.group(2, 3)) != sorted(offered):
        raise DataError(f"{where}: field 'question' must end 'Is <name> a {offered[0]} or {offered[1]}?'")
    options = m.group(2, 3)
    if not answers.check(answer, offered[0], "text", options):
        raise DataError(f"{where}: field 'answer' {answer!r} does not name the target {offered[0]!r}")
    chain = " ".join(s.strip() for s in steps)
    meta = {"idx_to_symbol": symbols, "edges": edges, **nodes}
    return Example(f"prosqa-{split}-{index}", question.strip(), answer.strip(), chain, {"steps": chain},
                   options=options, meta=meta)


@TASKS.register("prosqa")
class ProsQA(Task):
    """ProsQA graph reachability (Coconut, Hao et al. 2024): "Is Tom a lempus or scrompus?".

    ``valid`` = prosqa/valid.json; ``train`` = ``train_size`` rows (default 17886, the size of
    Coconut's train split) from :func:`generators.generate_prosqa`, seeded by ``seed``.
    """

    name = "prosqa"
    # v2: a generated ``dev`` split for model selection (train excludes it), so that the shipped
    # valid.json can be the report split that selection never sees.
    version = 2
    splits: ClassVar[tuple[str, ...]] = ("train", "dev", "valid")
    instruction = ("Answer the question by chaining the given facts. "
                   "End with the answer as '#### <name> is a <concept>.'")
    answer_kind = "text"
    vocabulary = (*generators.NAMES, *generators.CONCEPTS, "Every", "is", "a", "an", "Is", "or",
                  *re.findall(r"[A-Za-z]+", instruction))
    option_defaults: ClassVar[dict[str, Any]] = {"train_size": 17886, "dev_size": 500, "seed": 0}

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        source = locate(self.path, SHARED_DATA / "prosqa", "valid.json")
        valid = _parsed("prosqa", source, "json", parse_prosqa)
        if split == "valid":
            return _take(valid, limit)
        shipped = {e.question for e in valid}
        dev_seed, dev_n = f"prosqa-dev-{self.options['seed']}", self.options["dev_size"]

        def make(seed: str, n: int, exclude: set[str], name: str) -> list[Example]:
            rows = generators.generate_prosqa(n, seed=seed, exclude=exclude)
            return [parse_prosqa(i, (f"{seed} row {i}", row), name) for i, row in enumerate(rows)]

        dev = memo(("prosqa-dev", *source_key(source), dev_seed, dev_n), lambda: make(dev_seed, dev_n, shipped, "dev"))
        if split == "dev":
            return _take(list(dev), limit)
        n, seed = _count(limit, self.options["train_size"]), f"prosqa-train-{self.options['seed']}"
        held = shipped | {e.question for e in dev}
        return list(memo(("prosqa-train", *source_key(source), seed, n, dev_seed, dev_n),
                         lambda: make(seed, n, held, "train")))

    def chain_steps(self, ex: Example) -> list[str]:
        """One sentence per step ("Tom is a terpus.", "Every terpus is a gerpus.")."""
        return _sentences(self.chain_text(ex))

    def solutions(self, ex: Example, limit: int = 16) -> list[str]:
        """Every path of the question's graph from the person to the answer concept (up to
        ``limit``, shortest first), written as the gold chain is: the facts it uses, in order."""
        facts = {}
        for sentence in _sentences(ex.question):
            m = re.fullmatch(r"(?:Every )?(\w+) is an? (\w+)\.", sentence)
            if m:
                facts.setdefault(m.group(1), {})[m.group(2)] = sentence
        symbols = ex.meta.get("idx_to_symbol")
        if not symbols:
            return [self.chain_text(ex)]
        start, goal = symbols[ex.meta["root"]], symbols[ex.meta["target"]]
        paths: list[list[str]] = []
        stack: list[tuple[str, list[str]]] = [(start, [])]
        while stack:
            node, used = stack.pop()
            if node == goal:
                paths.append(used)
                continue
            for nxt, sentence in sorted(facts.get(node, {}).items(), reverse=True):
                if sentence not in used and len(used) < 32:
                    stack.append((nxt, used + [sentence]))
        paths.sort(key=len)
        out = list(dict.fromkeys(" ".join(p) for p in paths))[:limit]
        return out or [self.chain_text(ex)]


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# -- multiplication ------------------------------------------------------------------------------
class Multiplication(Task):
    """N-by-N digit multiplication in iCoT's format (Deng et al. 2023), digits least-significant first.

    ``valid`` = multiplication/NxN/valid.txt; ``train`` = ``train_size`` rows generated in the
    same format (iCoT trained on 808k; default 100k keeps loading around a second), minus valid.
    """

    digits: ClassVar[int] = 4
    version = 1
    answer_kind = "text"
    option_defaults: ClassVar[dict[str, Any]] = {"train_size": 100_000, "seed": 0}

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        d = self.digits
        source = locate(self.path, SHARED_DATA / "multiplication" / f"{d}x{d}", "valid.txt")
        rows = valid = _parsed(self.name, source, "pipes", self.parse)
        if split == "train":
            n, seed = _count(limit, self.options["train_size"]), f"{self.name}-train-{self.options['seed']}"
            exclude = {r["question"] for r in valid}

            def make_train() -> list[dict[str, str]]:
                return generators.generate_multiplication(n, digits=d, seed=seed, exclude=exclude)

            rows = memo((self.name, "train", *source_key(source), seed, n), make_train)
        return _take(_generated(self, split, rows, "partial-products"), limit)

    @classmethod
    def parse(cls, index: int, row: Row) -> dict[str, str]:
        where, d = row[0], cls.digits
        question, chain, answer = field(row, "question"), field(row, "chain"), field(row, "answer")
        operand = rf"\d(?: \d){{{d - 1}}}"
        if not re.fullmatch(rf"{operand} \* {operand}", question):
            raise DataError(f"{where}: field 'question' must be two {d}-digit operands; got {question!r:.60}")
        a, b = (int("".join(reversed(x.split()))) for x in question.split(" * "))
        if answer != generators.multiplication_row(a, b, d)["answer"]:
            raise DataError(f"{where}: field 'answer' {answer!r} is not the product of the question's operands")
        return {"question": question, "chain": chain, "answer": answer}


for _d in (4, 5):
    _name = f"multiplication-{_d}x{_d}"
    TASKS.register(_name, type(f"Multiplication{_d}x{_d}", (Multiplication,), {"name": _name, "digits": _d}))


# -- arith ---------------------------------------------------------------------------------------
@TASKS.register("arith")
class Arith(Task):
    """Left-to-right modular arithmetic (``37+12*3-45+8``) for tiny char-level models.

    All splits are generated from disjoint seeds; ``test`` excludes ``valid``'s questions and
    ``train`` excludes both, so held-out scores are on unseen questions. ASCII only, no
    instruction: a char-level tokenizer spends one token per character.
    """

    name = "arith"
    # v2: calibrated defaults (mod 10, single-digit operands, 6 steps): a 4-layer, 128-wide model
    # learns each step as a lookup (CoT-SFT 100% after 500 steps) but not their composition
    # without a chain (no-CoT 25%). v1 (mod 100) needed far more steps than a demo can spend.
    version = 2
    splits: ClassVar[tuple[str, ...]] = ("train", "valid", "test")
    option_defaults: ClassVar[dict[str, Any]] = {
        "num_steps": 6, "modulus": 10, "max_operand": 9,
        "train_size": 20_000, "valid_size": 500, "test_size": 500, "seed": 0,
    }

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        o = self.options
        knobs = {k: o[k] for k in ("num_steps", "modulus", "max_operand")}
        size = _count(limit, o[f"{split}_size"])

        def generate(name: str, n: int, exclude: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
            key = ("arith", name, n, *sorted(o.items()))
            seed = f"arith-{name}-{o['seed']}"
            return memo(key, lambda: generators.generate_arith(n, seed=seed, exclude=exclude, **knobs))

        held: frozenset[str] = frozenset()
        for name in ("valid", "test"):
            rows = generate(name, o[f"{name}_size"], held)
            if name == split:
                return _take(_generated(self, split, rows, "steps"), limit)
            held |= {r["question"] for r in rows}
        return _generated(self, split, generate("train", size, held), "steps")


# -- mix -----------------------------------------------------------------------------------------
def _option_value(text: str) -> Any:
    """``6`` -> 6, ``0.5`` -> 0.5, ``true`` -> True, anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@TASKS.register("mix")
class Mix(Task):
    """Several tasks as one: a model trained on all of them, then measured on one part alone
    (forgetting: RL on one part, accuracy on another before and after).

    ``parts`` lists tasks with their options, ``;`` between tasks and ``:`` before each option:
    ``arith:num_steps=6;arith:num_steps=3:modulus=7``. Every split interleaves the parts' own
    splits (a limit keeps both parts represented); prompts, chains and scoring are each part's
    own, so the trained model is evaluated on a part with ``data.task=<that part>``.
    """

    name = "mix"
    #: default: the forgetting test bed of benchmarks/bench_dlr.py (two arith skills; the number of
    #: operators tells which modulus applies)
    option_defaults: ClassVar[dict[str, Any]] = {"parts": "arith:num_steps=6;arith:num_steps=3:modulus=7:seed=1"}

    def __init__(self, path: str | None = None, chain_format: str | None = None, **options: Any) -> None:
        super().__init__(path, chain_format, **options)
        specs = [s.strip() for s in str(self.options["parts"]).split(";") if s.strip()]
        if len(specs) < 2:
            raise ValueError(f"task 'mix': option parts={self.options['parts']!r} must list two or more tasks, "
                             "e.g. parts='arith:num_steps=6;arith:num_steps=3:modulus=7'")
        from latentreason.data.base import build_task

        self.parts: list[Task] = []
        for spec in specs:
            name, *pairs = spec.split(":")
            opts = {}
            for pair in pairs:
                key, eq, value = pair.partition("=")
                if not eq:
                    raise ValueError(f"task 'mix': {pair!r} in part {spec!r} is not key=value")
                opts[key.strip()] = _option_value(value.strip())
            if name.strip() == "mix":
                raise ValueError("task 'mix': a part cannot be a mix")
            self.parts.append(build_task(name.strip(), path=path, chain_format=chain_format, **opts))
        self.splits = tuple(s for s in self.parts[0].splits if all(s in p.splits for p in self.parts))  # type: ignore[misc]
        self.vocabulary = tuple(dict.fromkeys(w for p in self.parts for w in p.vocabulary))  # type: ignore[misc]
        self.version = sum(p.version for p in self.parts)  # type: ignore[misc]

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        self.check_split(split)
        loaded = [[dataclasses.replace(ex, id=f"mix-{split}-{i}:{ex.id}", meta={**ex.meta, "part": i}) for ex in p.load(split)]
                  for i, p in enumerate(self.parts)]
        if split == "train":  # each part keeps its own held-out questions out; parts of one format must keep each other's out too
            held = {ex.question for p in self.parts for s in p.splits if s != "train" for ex in p.load(s)}
            loaded = [[ex for ex in part if ex.question not in held] for part in loaded]
        else:  # parts of one format may draw the same question: each held-out question once, and none of
            earlier = {ex.question for p in self.parts for s in p.splits[:p.splits.index(split)]  # an earlier
                       if s != "train" for ex in p.load(s)}                                        # split in a later one
            for i, part in enumerate(loaded):
                loaded[i] = [ex for ex in part if ex.question not in earlier]
                earlier |= {ex.question for ex in loaded[i]}
        mixed = [ex for row in itertools.zip_longest(*loaded) for ex in row if ex is not None]
        return _take(mixed, limit)

    def _part(self, ex: Example) -> Task:
        return self.parts[ex.meta["part"]]

    def prompt(self, ex: Example, instruction: bool = True) -> str:
        return self._part(ex).prompt(ex, instruction)

    def chain_text(self, ex: Example) -> str:
        return self._part(ex).chain_text(ex)

    def chain_steps(self, ex: Example) -> list[str]:
        return self._part(ex).chain_steps(ex)

    def solutions(self, ex: Example) -> list[str]:
        return self._part(ex).solutions(ex)

    def answer_text(self, ex: Example) -> str:
        return self._part(ex).answer_text(ex)

    def check(self, prediction: str | None, ex: Example) -> bool:
        return self._part(ex).check(prediction, ex)

    def score(self, text: str, ex: Example) -> Score:
        return self._part(ex).score(text, ex)
