"""Answer extraction and checking (data/answers.py): pure string functions, no files."""
from fractions import Fraction

import pytest

from latentreason.data import answers
from latentreason.data.answers import check, extract_flexible, extract_strict, normalize_number


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1,000.50", "1000.5"),
        ("$1,000", "1000"),
        ("+5", "5"),
        (" 7.00 ", "7"),
        ("7.", "7"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("25%", "25"),
        (".5", "0.5"),
        ("\u221212", "-12"),
        ("1200", "1200"),  # trailing zeros of integers stay
        ("3/4", "3/4"),
        ("forty", "forty"),
    ],
)
def test_normalize_number(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


def test_large_integer_normalises_to_its_exact_digits() -> None:
    # Decimal.normalize() rounded to 28 significant digits; an integer must keep every digit.
    big = "12345678901234567890123456789012"
    assert normalize_number(big) == big
    assert normalize_number("1,717,000,000") == "1717000000"
    assert normalize_number("1.5E3") == "1500"  # no exponent in the canonical text
    assert extract_flexible(f"so the total is {big}", "number") == big  # what prediction_flexible shows


def test_to_number_is_exact() -> None:
    assert answers.to_number("3/4") == Fraction(3, 4)
    assert answers.to_number("$1,000.50") == Fraction(2001, 2)
    assert answers.to_number("forty") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she pays $5. #### $1,234.50 dollars", "1234.5"),
        ("#### 3 and later #### 4", "4"),  # the LAST delimiter counts
        ("#### 7\nthen 9", "7"),  # only the rest of that line
        ("#### -12", "-12"),
        ("#### none", None),
        ("####", None),
        ("the answer is 72", None),
    ],
)
def test_extract_strict_number(text: str, expected: str | None) -> None:
    assert extract_strict(text, "number") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a 3 b 4.0", "4"),
        ("100 - 50 = 50.", "50"),
        ("2 apples\n#### 1,000", "1000"),
        ("1,2,3", "3"),  # not a thousands group: three numbers
        ("no digits here", None),
        ("#### 6-7", "7"),  # a hyphen after a digit is a dash, not a minus sign
        ("so 2023-10", "10"),
        ("(18-3)", "3"),
        ("the change is -2", "-2"),
        ("x = \u22123.5", "-3.5"),
    ],
)
def test_extract_flexible_number(text: str, expected: str | None) -> None:
    assert extract_flexible(text, "number") == expected


def test_extract_choice() -> None:
    assert extract_strict("reasoning #### B", "choice") == "B"
    assert extract_strict("#### (C) 21", "choice") == "C"
    assert extract_strict("#### Answer: D", "choice") == "D"  # "Answer" is a word, not a letter
    assert extract_strict("#### 21", "choice") == "21"  # a value, matched later by check()
    assert extract_strict("Answer: A", "choice") is None
    assert extract_strict("#### C or D", "choice") == "C or D"  # a hedge names no single option
    assert not check(extract_strict("#### C or D", "choice"), "C", "choice", AQUA_OPTIONS)
    assert extract_flexible("A train ... so the answer is D.", "choice") == "D"
    assert extract_flexible("a cat and an apple", "choice") is None  # lower-case never counts
    assert extract_flexible("it costs 21 dollars", "choice") == "21"


def test_extract_text() -> None:
    text = "Tom is a terpus.\nEvery terpus is a lempus. #### Tom is a lempus.\n"
    assert extract_strict(text, "text") == "Tom is a lempus."
    assert extract_flexible(text, "text") == "Tom is a lempus."
    assert extract_strict("Tom is a terpus.\nTom is a lempus.", "text") is None
    assert extract_flexible("Tom is a terpus.\nTom is a lempus.\n\n", "text") == "Tom is a lempus."
    assert extract_flexible("   \n", "text") is None


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="number, choice, text"):
        extract_strict("#### 1", "date")
    with pytest.raises(ValueError, match="unknown answer kind"):
        check("1", "1", "date")


def test_check_numbers() -> None:
    assert check("72", "72", "number")
    assert check("72.0", "72", "number")
    assert check("1,000.50", "1000.5", "number")
    assert check("0.30000000000000004", "0.3", "number")  # float printing noise
    assert check("0.75", "3/4", "number")
    assert not check("73", "72", "number")
    assert not check("72.01", "72", "number")
    assert not check(None, "72", "number")
    assert not check("seventy-two", "72", "number")


def test_check_integers_exactly() -> None:
    # A relative tolerance on integers scored a near-miss of a large answer as correct.
    assert not check("1234568", "1234567", "number")
    assert not check("12345678901234567890123456789013", "12345678901234567890123456789012", "number")
    assert check("1234567", "1,234,567.0", "number")  # same integer, different formats
    assert check("$1,234,567", "1234567.00", "number")
    assert check("0.3333333", "1/3", "number")  # non-integral gold: tolerance still applies
    assert not check("999999.5", "1000000", "number")  # an integer gold is exact: no tolerance growing with it
    assert check("6/2", "3", "number")


AQUA_OPTIONS = ("A)21", "B)22 m", "C)1/2", "D)0.5", "E)none of these")


@pytest.mark.parametrize(
    ("prediction", "gold", "correct"),
    [
        ("A", "A", True),
        ("(A)", "A", True),
        ("a", "A", True),
        ("A)21", "A", True),
        ("B", "A", False),
        ("21", "A", True),  # the option's value, not its letter
        ("22", "B", True),  # value with a unit: its single number counts
        ("22 m", "B", True),
        ("23", "B", False),
        ("None of these", "E", True),
        ("0.5", "D", True),  # D's exact text wins, though C (1/2) holds the same value
        ("0.50", "D", False),  # the value of C (1/2) and D (0.5), the text of neither: ambiguous, no option
    ],
)
def test_check_choice_letter_or_value(prediction: str, gold: str, correct: bool) -> None:
    assert check(prediction, gold, "choice", AQUA_OPTIONS) is correct


def test_an_options_exact_text_wins_over_a_shared_number() -> None:
    """AQuA valid 23: "once every 15 years" is option B's text; D ("15 times a year") shares its number.
    The number match made the answer ambiguous, so the right option could not be named."""
    options = ("A)every 10 years", "B)once every 15 years", "C)twice a year", "D)15 times a year")
    assert check("once every 15 years", "B", "choice", options)
    assert not check("15", "B", "choice", options)  # a bare 15 is ambiguous: B and D both hold it


def test_check_text_with_and_without_options() -> None:
    options = ("lempus", "scrompus")
    gold = "Tom is a lempus."
    assert check("Tom is a lempus", gold, "text", options)
    assert check("lempus", gold, "text", options)
    assert not check("Tom is a scrompus.", gold, "text", options)
    assert not check("Tom is a lempus or scrompus.", gold, "text", options)  # hedging names both
    assert not check("Tom is a brimpus.", gold, "text", options)  # names neither
    assert not check("Tom is a xlempus.", gold, "text", options)  # whole words only
    assert check("5 5 6  0", "5 5 6 0", "text")
    assert not check("5560", "5 5 6 0", "text")


def test_checkers_are_registered_by_kind() -> None:
    assert set(answers.KINDS) <= set(answers.ANSWER_CHECKERS.names())


def test_flexible_choice_prefers_the_named_answer_to_a_later_article() -> None:
    """"The answer is C.\\nA quick check confirms it." was scored as A."""
    assert extract_flexible("The answer is C.\nA quick check confirms it.", "choice") == "C"
    assert extract_flexible("Answer: (D). A cat agrees.", "choice") == "D"
    assert extract_flexible("Between (B) and (E), I pick (E)", "choice") == "E"
    assert extract_flexible("A train leaves... so B.", "choice") == "B"  # no cue: the last letter, not the article
    assert extract_flexible("the answer is a bit unclear: C", "choice") == "C"  # lower-case "a" names nothing
    assert extract_flexible("A", "choice") == "A"  # a bare letter is an answer


@pytest.mark.parametrize(("raw", "expected"), [
    ("12,5", "12,5"), ("1,0000", "1,0000"), ("3 4", "3 4"),  # not numbers: left for the caller to refuse
    ("$ 5", "5"), ("- 3", "-3"), ("1,000,000", "1000000"), ("-1,234.5", "-1234.5"),
])
def test_commas_and_spaces_count_only_where_a_number_allows_them(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected
