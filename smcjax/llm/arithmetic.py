r"""Exact checking of the arithmetic claims ``a op b = c`` in a reasoning step.

A *claim* is an arithmetic expression over numbers with ``+ - * / × ÷ x ( )`` followed
by ``=`` and a number, e.g. ``16 - 3 - 4 = 9``, ``$1,200 × 0.25 = $300``,
``(3 + 4) * 2 = 14`` or GSM8K's calculator annotations ``<<9*2=18>>``. Each claim is
evaluated exactly with :class:`fractions.Fraction` by a small recursive-descent parser
(no ``eval``) and compared with the stated result. A result written with ``d`` decimals
is accepted when it is the value rounded to ``d`` decimals (``10 / 3 = 3.33`` is right,
``10 / 3 = 3.4`` is wrong).

This is host-side Python by nature: it needs the tokenizer's ``decode`` and regular
expressions. :mod:`smcjax.llm.rewards` calls it through :func:`jax.pure_callback`.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["Claim", "check_arithmetic", "find_claims"]

_RHS_RE = re.compile(
    r"=\s*(-?\$?\s?\d(?:[\d,]*\d)?(?:\.\d+)?)(?![\d.]*\d)(?!\s*[+\-*/×÷^])"
)
_LHS_CHARS = set("0123456789.,$ +-*/×÷x()")


class Claim(tuple):
    """``(expression, stated, correct)`` of one arithmetic claim."""

    __slots__ = ()

    def __new__(cls, expression: str, stated: str, correct: bool):  # noqa: D102
        return super().__new__(cls, (expression, stated, correct))

    @property
    def expression(self) -> str:  # noqa: D102
        return self[0]

    @property
    def stated(self) -> str:  # noqa: D102
        return self[1]

    @property
    def correct(self) -> bool:  # noqa: D102
        return self[2]


class _Parser:
    """Recursive descent over tokens: ``expr := term ((+|-) term)*`` etc."""

    def __init__(self, tokens: list[str]):
        self.toks = tokens
        self.i = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        val = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            val = val + rhs if op == "+" else val - rhs
        return val

    def term(self) -> Fraction:
        val = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                val = val * rhs
            else:
                if rhs == 0:
                    raise ZeroDivisionError
                val = val / rhs
        return val

    def factor(self) -> Fraction:
        tok = self.peek()
        if tok == "-":
            self.take()
            return -self.factor()
        if tok == "(":
            self.take()
            val = self.expr()
            if self.peek() != ")":
                raise ValueError("unbalanced parenthesis")
            self.take()
            return val
        if tok is None or not re.fullmatch(r"\d+(?:\.\d+)?", tok):
            raise ValueError(f"unexpected token {tok!r}")
        self.take()
        return Fraction(tok)


def _tokenize(expr: str) -> list[str]:
    s = expr.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    s = s.replace("×", "*").replace("÷", "/").replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    # "x" is multiplication only between numbers/parentheses
    s = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])", "*", s)
    toks = re.findall(r"\d+(?:\.\d+)?|[+\-*/()]|\S", s)
    return toks


def _left_expression(text: str, eq: int) -> str:
    """Return the arithmetic expression just before the ``=`` at ``eq``."""
    i = eq
    while i > 0 and text[i - 1] in _LHS_CHARS:
        c = text[i - 1]
        # a comma is a thousands separator only between digits ("1,200"), else prose
        if c == "," and not (
            i >= 2 and text[i - 2].isdigit() and text[i : i + 1].isdigit()
        ):
            break
        i -= 1
    lhs = text[i:eq]
    # trim prose at the front: stray separators, operators, a word ending in "x"
    lhs = re.sub(r"^[\s,.x*/+)]+", "", lhs)
    # drop unmatched closing parentheses from the front
    while lhs.count(")") > lhs.count("(") and ")" in lhs:
        lhs = lhs[lhs.index(")") + 1 :].lstrip()
    return lhs.strip()


def find_claims(text: str) -> list[Claim]:
    """Every arithmetic claim in ``text``, with whether it holds exactly.

    Chains ``a = b + c = d`` are split: each ``=`` with an expression on its left and
    a number on its right is a claim.
    """
    claims = []
    text = text.replace("\\times", "×").replace("\\cdot", "×").replace("\\div", "÷")
    text = text.replace("<<", " ").replace(">>", " ")
    for m in _RHS_RE.finditer(text):
        expr = _left_expression(text, m.start())
        toks = _tokenize(expr)
        ops = [t for t in toks if t in ("+", "-", "*", "/")]
        if not ops or (len(ops) == 1 and toks[0] == "-"):
            continue  # a bare number ("x = 5", "= -3") is not a calculation
        try:
            p = _Parser(toks)
            value = p.expr()
            if p.i != len(toks):
                continue
        except (ValueError, ZeroDivisionError, IndexError):
            continue
        stated_s = re.sub(r"[$,\s]", "", m.group(1))
        stated = Fraction(stated_s)
        decimals = len(stated_s.split(".")[1]) if "." in stated_s else 0
        if value == stated:
            ok = True
        elif decimals > 0:
            ok = abs(value - stated) <= Fraction(1, 2 * 10**decimals)
        else:
            ok = False
        claims.append(Claim(" ".join(toks), stated_s, ok))
    return claims


def check_arithmetic(text: str) -> tuple[int, int]:
    """Count ``(correct claims, claims)`` in ``text``."""
    claims = find_claims(text)
    return sum(c.correct for c in claims), len(claims)
