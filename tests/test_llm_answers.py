"""Answer extraction and grading on a table of tricky cases."""

from fractions import Fraction

import pytest

from smcjax.llm.answers import (
    extract_answer,
    extract_boxed,
    grade,
    gsm8k_reference,
    parse_number,
    weighted_vote,
)

EXTRACT = [
    # nested braces
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    # the last box wins
    (r"first \boxed{3} then \boxed{4}", "4"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5.", "5"),
    # a box cut by a token cap
    (r"\boxed{12", "12"),
    # GSM8K reference format
    ("She makes 9 * 2 = $18.\n#### 18", "18"),
    ("#### 1,000", "1,000"),
    # "the answer is"
    ("Thus, the answer is 42.", "42"),
    # last number, with commas, negatives and decimals
    ("He has 3 apples and pays $1,250 total", "1,250"),
    ("The temperature dropped to -7 degrees", "-7"),
    ("x = 2.50 and so 3/4", "3/4"),
    ("no numbers here", None),
    ("Step 3 gives\n4.", "4"),
    ("costs $ 12 in total", "12"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT)
def test_extract(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_none():
    assert extract_boxed("nothing boxed") is None


GRADE = [
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", r"\frac34", True),
    (r"\tfrac{3}{4}", "0.75", True),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("-5", "-5", True),
    ("-5", "5", False),
    (r"18 \text{ dollars}", "18", True),
    ("18 dollars", "18", True),
    (r"\$18.00", "18", True),
    ("50\\%", "50", False),  # 50% = 1/2 numerically, not 50
    (r"\frac{\sqrt 3}{2}", r"\frac{\sqrt{3}}{2}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True),
    ("27", 27.0, True),
    ("x = 3", "3", True),
    ("17", "18", False),
    (None, "18", False),
    (r"\frac{1}{3}", "0.333", False),
]


@pytest.mark.parametrize(("pred", "gold", "ok"), GRADE)
def test_grade(pred, gold, ok):
    assert grade(pred, gold) is ok


def test_parse_number():
    assert parse_number("-1,234.5") == Fraction(-2469, 2)
    assert parse_number(r"-\frac{2}{4}") == Fraction(-1, 2)
    assert parse_number("25%") == Fraction(1, 4)
    assert parse_number(r"\sqrt{2}") is None
    assert parse_number("1/0") is None


def test_gsm8k_reference():
    assert gsm8k_reference("a\nb\n#### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no marker")


def test_weighted_vote_groups_equivalent_answers():
    answers = ["0.5", r"\frac{1}{2}", "3", None]
    assert weighted_vote(answers, [0.2, 0.2, 0.3, 5.0]) == "0.5"
    assert weighted_vote(answers) == "0.5"
    assert weighted_vote([None, None]) is None
    with pytest.raises(ValueError, match="same length"):
        weighted_vote(["1"], [1.0, 2.0])
