"""Answer extraction and checking, as two separate named steps.

Extraction turns generated text into a canonical answer string (or ``None``); checking compares a
canonical prediction with the gold answer. Keeping them apart means a change to parsing shows up
as a change here, with tests, rather than as an unexplained accuracy shift.

Two extractors, reported side by side (as lm-eval's ``strict-match`` / ``flexible-extract``):

* strict: only the text after the LAST ``####`` counts (the format every method is trained on);
* flexible: a best guess from the whole text (last number / the last option letter named as the
  answer, else the last standalone A-E that is not the article "A" / last line).

Answer kinds: ``"number"`` (GSM8K, arithmetic), ``"choice"`` (AQuA letters A-E), ``"text"``
(ProsQA sentences, multiplication digit strings). Checkers live in :data:`ANSWER_CHECKERS`, so a
task or user code can register a new kind by name.

Number normalisation (:func:`normalize_number`): surrounding whitespace, a leading ``+``, ``$``,
thousands commas (in groups of three only: ``"12,5"`` is no number) and a trailing ``%`` are dropped, and the decimal is written in its shortest form
(``"1,000.50"`` -> ``"1000.5"``, ``"7.00"`` -> ``"7"``, ``"-0"`` -> ``"0"``); an integer is written as
all its digits, never with an exponent or rounded. ``%`` is dropped
rather than divided by 100 because GSM8K-style golds for "what percent" questions are the bare
number (``25``), so ``"25%"`` means 25. Fractions ``"3/4"`` stay text but compare numerically.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from latentreason.registry import Registry

DELIMITER = "####"  # same as base.ANSWER_DELIMITER (base imports this module, not the reverse)
KINDS = ("number", "choice", "text")
# A non-integral gold compares within this relative tolerance (float-printed decimals such as
# "0.30000000000000004"); an integer gold exactly, so a near-miss of a large answer is wrong.
REL_TOL = 1e-6

# Thousands separators only in groups of three ("1,000,000"), so "1,2,3" stays three numbers.
# A sign only where nothing word-like precedes it: "6-7" and "2023-10" hold 7 and 10, not -7 and -10.
_NUMBER = re.compile(
    r"(?:(?<![\w.])[-+\u2212])?(?:\$\s?)?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|\.\d+)%?(?![\d])"
)
_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-E])(?![A-Za-z0-9])")
# An option named as the answer: "answer is (C)", "Answer: C", "option C", "(C)", "C)"; the last one wins.
_CUED_LETTER = re.compile(r"(?i:answer|option|choice)\W{0,3}(?:is\W{0,3})?\(?([A-E])(?![A-Za-z0-9])"
                          r"|\(([A-E])\)|(?<![A-Za-z0-9(])([A-E])\)")
_OPTION = re.compile(r"^\s*\(?([A-Ea-e])\s*[\)\.:]\s*(.*)$", re.S)


# -- numbers -------------------------------------------------------------------------------------
def normalize_number(text: str) -> str:
    """Canonical text of a number; text that is not a number comes back stripped, unchanged."""
    s = re.sub(r"(?<=[$+\-\u2212])\s+", "", text.strip()).replace("\u2212", "-").replace("$", "")  # "$ 5", "- 3"
    s = s.removesuffix("%").removeprefix("+")
    if "," in s:  # thousands commas only in groups of three: "12,5" or "1,0000" is no number to guess at
        if not re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
            return text.strip()
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+/\d+", s):
        return s
    try:
        value = Decimal(s)
    except InvalidOperation:
        return text.strip()
    if not value.is_finite():
        return text.strip()
    # Not value.normalize(): it rounds to the context's 28 significant digits, so a long integer
    # came out with its low digits zeroed. int() and format(, "f") are exact and never use exponents.
    if value == value.to_integral_value():
        return str(int(value))  # "7.00" -> "7", "1E+3" -> "1000", "-0" -> "0"
    return format(value, "f").rstrip("0")  # non-integral, so a "." precedes the stripped zeros


def to_number(text: str) -> Fraction | None:
    """The exact value of a (normalisable) number, or ``None``."""
    s = normalize_number(text)
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers(text: str) -> list[str]:
    return [normalize_number(m.group(0)) for m in _NUMBER.finditer(text)]


# -- extraction ----------------------------------------------------------------------------------
def _after_delimiter(text: str) -> str | None:
    """The rest of the line after the last ``####``, or ``None`` if there is none."""
    at = text.rfind(DELIMITER)
    if at < 0:
        return None
    return text[at + len(DELIMITER):].split("\n", 1)[0].strip()


def _check_kind(kind: str) -> None:
    if kind not in KINDS and kind not in ANSWER_CHECKERS:
        raise ValueError(f"unknown answer kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def extract_strict(text: str, kind: str) -> str | None:
    """The answer written after the last ``####``: first number / first letter / the line.

    For ``"choice"`` without a standalone letter the line itself is returned, so that a written
    option value (``"#### 21"``) can still be matched by :func:`check`.
    """
    _check_kind(kind)
    rest = _after_delimiter(text)
    if not rest:
        return None
    if kind == "number":
        found = _numbers(rest)
        return found[0] if found else None
    if kind == "choice":  # one letter named: it; two ("C or D": a hedge) or none: the line, matched by value
        letters = set(_LETTER.findall(rest))
        return letters.pop() if len(letters) == 1 else rest
    return rest


def extract_flexible(text: str, kind: str) -> str | None:
    """A lenient guess from the whole text: last number / last letter A-E / last line.

    For ``"text"`` the last non-empty line is used, minus anything up to a ``####`` on it.
    """
    _check_kind(kind)
    if kind == "number":
        found = _numbers(text)
        return found[-1] if found else None
    if kind == "choice":
        letter = _flexible_letter(text)
        if letter:
            return letter
        found = _numbers(text)
        return found[-1] if found else None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1].rsplit(DELIMITER, 1)[-1].strip()
    return last or None


def _flexible_letter(text: str) -> str | None:
    """The last option letter named as an answer; else the last standalone capital A-E that is not
    the article "A" ("A quick check confirms it" after "The answer is C" names no option)."""
    cued = [g for m in _CUED_LETTER.finditer(text) for g in m.groups() if g]
    if cued:
        return cued[-1]
    letters = [m.group(1) for m in _LETTER.finditer(text)
               if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]))]
    return letters[-1] if letters else None


# -- checking ------------------------------------------------------------------------------------
Checker = Callable[[str, str, Sequence[str]], bool]
ANSWER_CHECKERS: Registry[Checker] = Registry("answer checker")


def _same_number(a: str, b: str) -> bool:
    x, y = to_number(a), to_number(b)
    if x is None or y is None:
        return normalize_number(a) == normalize_number(b)
    if y.denominator == 1:
        return x == y  # an integer gold: exact, or 1234568 (or 999999.5 for 1000000) would pass
    return abs(x - y) <= REL_TOL * max(1, abs(y))


def normalize_text(text: str) -> str:
    """Casefold, collapse whitespace and drop trailing full stops (sentence answers)."""
    return " ".join(text.split()).casefold().rstrip(". ")


def split_option(option: str) -> tuple[str, str]:
    """``"A)21"`` -> ``("A", "21")``; an option without a letter prefix gets letter ``""``."""
    m = _OPTION.match(option)
    return (m.group(1).upper(), m.group(2).strip()) if m else ("", option.strip())


def _choice_letter(prediction: str, options: Sequence[str]) -> str | None:
    """The option letter a prediction names: the letter itself, or a unique option value."""
    p = prediction.strip()
    m = re.fullmatch(r"\(?([A-Ea-e])\)?[.:]?", p) or re.match(r"\(?([A-E])\s*\)", p)
    if m:
        return m.group(1).upper()
    exact, hits = set(), set()
    for letter, value in map(split_option, options):
        if normalize_text(p) == normalize_text(value):
            exact.add(letter)
            continue
        value_numbers, p_numbers = _numbers(value), _numbers(p)
        if len(value_numbers) == 1 and len(p_numbers) == 1 and _same_number(p_numbers[0], value_numbers[0]):
            hits.add(letter)
    if len(exact) == 1:  # an option's exact text wins over options that merely share its number
        return exact.pop()
    return hits.pop() if len(hits) == 1 and not exact else None  # ambiguous values name no option


def _named_option(text: str, options: Sequence[str]) -> str | None:
    """The one option named as a whole word in ``text``; ``None`` if none or several are."""
    named = [o for o in options if re.search(rf"(?<!\w){re.escape(o)}(?!\w)", text, re.I)]
    return named[0] if len(named) == 1 else None


@ANSWER_CHECKERS.register("number")
def check_number(prediction: str, gold: str, options: Sequence[str] = ()) -> bool:
    return _same_number(prediction, gold)


@ANSWER_CHECKERS.register("choice")
def check_choice(prediction: str, gold: str, options: Sequence[str] = ()) -> bool:
    letter = _choice_letter(prediction, options)
    gold_letter = _choice_letter(gold, options) or gold.strip().upper()
    return letter is not None and letter == gold_letter


@ANSWER_CHECKERS.register("text")
def check_text(prediction: str, gold: str, options: Sequence[str] = ()) -> bool:
    """Normalised equality; with ``options``, both sides reduce to the single option they name.

    Why: ProsQA answers are "Tom is a lempus." with options (lempus, scrompus); naming the right
    concept is what is being tested, not the exact sentence.
    """
    if options:
        named = _named_option(prediction, options)
        return named is not None and named == _named_option(gold, options)
    return normalize_text(prediction) == normalize_text(gold)


def check(prediction: str | None, gold: str, kind: str, options: Sequence[str] = ()) -> bool:
    """Whether an extracted prediction matches the gold answer (``None`` never does)."""
    _check_kind(kind)
    if prediction is None:
        return False
    return bool(ANSWER_CHECKERS.get(kind)(prediction, gold, tuple(options)))
