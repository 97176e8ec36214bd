"""The task contract: what every task (file-backed or generated) provides.

A task turns raw rows into :class:`Example` objects and owns its text formats (prompt, chain,
answer line) and its answer extraction and checking. It knows nothing of models or tokenizers:
turning text into token ids is :mod:`latentreason.data.collate`'s job.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from latentreason.data import answers
from latentreason.registry import Registry

# Project root's sibling ``shared/data`` (the layout CI and developers have); users pass paths.
SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"

ANSWER_DELIMITER = "####"


class DataError(ValueError):
    """A malformed input row; the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Example:
    """One question with its gold chain(s) and canonical answer.

    ``chain`` is the task's default explicit chain of thought; ``chains`` maps other chain
    formats to their text (e.g. ``{"natural": ..., "equations": ...}`` for GSM8K), and
    ``alt_chains`` holds further distinct solutions where a task has them (for N_eff).
    """

    id: str
    question: str
    answer: str
    chain: str = ""
    chains: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    alt_chains: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    prediction: str | None  # strict extraction
    prediction_flexible: str | None
    correct: bool
    correct_flexible: bool


class Task:
    """Base class; subclasses set ``name``/``version`` and implement :meth:`load`.

    ``version`` changes whenever prompts, chains or checking change, so old scores are stale.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    splits: ClassVar[tuple[str, ...]] = ("train", "valid")
    #: Instruction placed before the question (empty for the tiny-model tasks).
    instruction: ClassVar[str] = ""
    #: Answer kind for extraction: "number" or "choice" (A-E) or "text".
    answer_kind: ClassVar[str] = "number"

    #: Words a tiny model's tokenizer may keep as one token each (``model.tiny_words=task``): a
    #: task written in a small closed vocabulary then costs one position per word, not per letter.
    vocabulary: ClassVar[tuple[str, ...]] = ()

    #: Task-specific options and their defaults; ``build_task(name, **options)`` overrides them.
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, path: str | None = None, chain_format: str | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(sorted(self.option_defaults)) or "none"
            raise ValueError(f"task {self.name!r}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
        for key, value in options.items():
            default = self.option_defaults[key]
            if default is not None and value is not None and not _same_type(value, default):
                raise TypeError(
                    f"task {self.name!r}: option {key}={value!r} is a {type(value).__name__}, "
                    f"expected {type(default).__name__} (default {default!r})"
                )
            if default is None and value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"task {self.name!r}: option {key}={value!r} is a {type(value).__name__}, "
                                "expected a path (a file or folder)")
            if isinstance(default, int) and not isinstance(default, bool) and value < 0:
                raise ValueError(f"task {self.name!r}: option {key}={value} must be >= 0")
        self.path = path
        self.chain_format = chain_format
        self.options = {**self.option_defaults, **options}

    # -- data -------------------------------------------------------------------------------
    def load(self, split: str, limit: int | None = None) -> list[Example]:
        raise NotImplementedError(f"task {self.name!r} does not implement load()")

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(
                f"task {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}"
                " (the real datasets' test splits are not shipped; select models on 'valid')"
            )

    # -- text formats -----------------------------------------------------------------------
    def prompt(self, ex: Example, instruction: bool = True) -> str:
        """The user-facing question text (a chat template, if any, is applied by the collator).

        ``instruction=False`` gives the bare question (zero-shot baselines of chat models).
        """
        return f"{self.instruction}\n{ex.question}" if self.instruction and instruction else ex.question

    def chain_text(self, ex: Example) -> str:
        if self.chain_format:
            if self.chain_format not in ex.chains:
                raise ValueError(
                    f"task {self.name!r}: chain_format {self.chain_format!r} unknown; "
                    f"available: {', '.join(sorted(ex.chains)) or 'none'}"
                )
            return ex.chains[self.chain_format]
        return ex.chain

    def chain_steps(self, ex: Example) -> list[str]:
        """The chain as reasoning steps (Coconut's curriculum replaces them one by one).

        Default: whitespace-separated units, which is a step in ``arith`` (``3+4=7``), GSM8K-Aug
        (``<<48/2=24>>``) and iCoT multiplication; tasks whose steps are sentences override it.
        """
        return self.chain_text(ex).split()

    def solutions(self, ex: Example) -> list[str]:
        """Distinct explicit solutions of ``ex`` (Latent-SFT's N_eff needs several); default: the
        gold chain and any ``alt_chains`` (``eval.solutions``), so with neither N_eff is not reported."""
        return list(dict.fromkeys([self.chain_text(ex), *ex.alt_chains]))

    def answer_text(self, ex: Example) -> str:
        """The answer line every method is trained to write: ``#### <answer>``."""
        return f"{ANSWER_DELIMITER} {ex.answer}"

    # -- scoring (extraction and checking are separate steps) ------------------------------
    def extract(self, text: str, *, flexible: bool = False) -> str | None:
        if flexible:
            return answers.extract_flexible(text, self.answer_kind)
        return answers.extract_strict(text, self.answer_kind)

    def check(self, prediction: str | None, ex: Example) -> bool:
        return answers.check(prediction, ex.answer, self.answer_kind, options=ex.options)

    def score(self, text: str, ex: Example) -> Score:
        strict = self.extract(text)
        flexible = self.extract(text, flexible=True)
        return Score(strict, flexible, self.check(strict, ex), self.check(flexible, ex))


def _same_type(value: Any, default: Any) -> bool:
    """Type check for options: an int may stand for a float, a bool never for an int."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


TASKS: Registry[type[Task]] = Registry("task", base=Task)


def build_task(name: str, path: str | None = None, chain_format: str | None = None, **options: Any) -> Task:
    """Instantiate a registered task (or a ``module:Class`` path)."""
    from latentreason.data import tasks  # noqa: F401  (registers the built-in tasks)

    return TASKS.get(name)(path=path, chain_format=chain_format, **options)


def attach_solutions(examples: list[Example], path: str | Path) -> list[Example]:
    """``examples`` with the further solutions of a JSONL file (``{"id", "solutions": [str, ...]}``
    per line) appended to their ``alt_chains``; ids absent from the file keep their own."""
    from dataclasses import replace

    from latentreason.io import numbered_jsonl

    extra: dict[str, list[str]] = {}
    try:
        rows = list(numbered_jsonl(path))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"eval.solutions: {exc}") from None
    for line, row in rows:
        if not isinstance(row.get("id"), str):
            raise DataError(f"{path}: line {line}: field 'id' must be a string (the question's id)")
        sols = row.get("solutions")
        if not isinstance(sols, list) or not all(isinstance(s, str) for s in sols):
            raise DataError(f"{path}: line {line}: field 'solutions' must be a list of strings")
        extra.setdefault(row["id"], []).extend(sols)
    if extra and examples and not extra.keys() & {ex.id for ex in examples}:  # a wrong id scheme: N_eff would vanish unsaid
        raise DataError(f"{path}: none of its {len(extra)} ids is a question evaluated here (its first: "
                        f"{next(iter(extra))!r}; the questions': {examples[0].id!r} ...)")
    return [replace(ex, alt_chains=tuple(dict.fromkeys([*ex.alt_chains, *extra[ex.id]]))) if ex.id in extra else ex
            for ex in examples]
