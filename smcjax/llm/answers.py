r"""Final answers: extraction from a solution, and grading against a reference.

Extraction (:func:`extract_answer`) follows the conventions of the math-reasoning
literature (Puri et al. 2025; Qwen2.5-Math evaluation):

1. the content of the **last** ``\boxed{...}`` (or ``\fbox{...}``), with nested braces
   matched, e.g. ``\boxed{\frac{1}{2}}`` → ``\frac{1}{2}``;
2. otherwise a GSM8K-style ``#### N`` line;
3. otherwise "the answer is X";
4. otherwise the last number in the text (``-1,234.5``, ``3/4``).

Grading (:func:`grade`) uses ``math-verify`` (symbolic equivalence of LaTeX or plain
expressions: ``\dfrac{3}{4} = 0.75``, ``10\% = 0.1``, ``1{,}000 = 1000``), after an
exact numeric comparison when both sides are numbers, and falls back to a normalised
string comparison. Everything here is host-side Python.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "extract_answer",
    "extract_boxed",
    "grade",
    "gsm8k_reference",
    "normalize_answer",
    "parse_number",
    "weighted_vote",
]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last ``\boxed{...}`` in ``text`` (nested braces).

    ``\boxed 5`` (no braces) returns ``"5"``. An unclosed box returns the text up to
    the end, stripped, since a generation may be cut by a token cap.
    """
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\" and j + 1 < len(text):
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
            inner = text[i + 1 :].strip()
            return inner or None
        tail = re.match(r"[^\s$]+", text[i:])
        if tail:
            return tail.group(0).rstrip(".")
    return None


_NUMBER_RE = re.compile(
    r"(?<![\w.])-?\$? ?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?: ?/ ?\d+)?"
)
_ANSWER_IS_RE = re.compile(
    r"answer\s*(?:is|:)\s*:?\s*\$?\s*([^\n]*?)(?:\.\s|\.?$|\n)", re.IGNORECASE
)


def extract_answer(text: str) -> str | None:
    r"""Extract the final answer of a solution (see the module docstring for the order).

    Returns ``None`` when the text holds no box, no ``####`` line and no number.
    """
    if text is None:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    hashes = re.findall(r"####\s*([^\n]+)", text)
    if hashes:
        return hashes[-1].strip()
    said = _ANSWER_IS_RE.findall(text)
    if said and said[-1].strip():
        return said[-1].strip().rstrip(".")
    nums = _NUMBER_RE.findall(text)
    if nums:
        return nums[-1].replace("$", "").replace(" ", "")
    return None


def gsm8k_reference(answer_field: str) -> str:
    """Return the GSM8K reference answer: the text after ``####``, no commas."""
    if "####" not in answer_field:
        raise ValueError("a GSM8K answer field must contain '#### N'")
    return answer_field.split("####")[-1].strip().replace(",", "")


_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"\b(?:dollars?|cents?|units?|meters?|metres?|miles?|km|cm|mm|kg|g|hours?|"
    r"minutes?|seconds?|days?|weeks?|years?|feet|foot|inches|inch|pounds?|"
    r"degrees?|percent|mph|people|students|apples|eggs|points?)\b",
    re.IGNORECASE,
)


def normalize_answer(ans: str) -> str:
    r"""Normalise an answer string for the fallback comparisons.

    Drops ``$``, ``\$``, ``\left``/``\right``, ``\!``, ``\,``, ``{,}`` thousands
    separators, ``\text{...}`` wrappers, common unit words and trailing dots;
    rewrites ``\dfrac``/``\tfrac`` as ``\frac``.
    """
    s = ans.strip()
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("{,}", ",")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = _TEXT_RE.sub(r"\1", s)
    s = _UNIT_WORDS.sub("", s)
    s = s.replace("\\%", "%")
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").strip()


_FRAC_RE = re.compile(r"^(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}$")
_FRAC_SHORT_RE = re.compile(r"^(-?)\\frac(\d)(\d)$")


def parse_number(ans: str) -> Fraction | None:
    r"""Parse a normalised answer as an exact rational, or return ``None``.

    Accepts ``1,234``, ``-3.5``, ``3/4``, ``\frac{3}{4}``, ``\frac34``, ``50%``
    (→ ``1/2``) and a trailing ``x = 5`` style assignment.
    """
    s = normalize_answer(ans)
    if "=" in s:
        s = s.split("=")[-1]
    pct = s.endswith("%")
    s = s.rstrip("%")
    if re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?", s):
        val = Fraction(s.replace(",", ""))
    elif re.fullmatch(r"-?\d+(?:\.\d+)?/-?\d+(?:\.\d+)?", s):
        num, den = s.split("/")
        if Fraction(den) == 0:
            return None
        val = Fraction(num) / Fraction(den)
    elif m := (_FRAC_RE.match(s) or _FRAC_SHORT_RE.match(s)):
        sign, num, den = m.groups()
        if Fraction(den) == 0:
            return None
        val = Fraction(num) / Fraction(den) * (-1 if sign else 1)
    else:
        return None
    return val / 100 if pct else val


def _math_verify(pred: str, gold: str) -> bool | None:
    """``True``/``False`` from math-verify, ``None`` if unavailable or unparsable."""
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - optional dependency
        return None
    try:
        g = parse("$" + gold + "$")
        p = parse("\\boxed{" + pred + "}")
        if not g or not p:
            return None
        return bool(verify(g, p))
    except Exception:  # math-verify raises on exotic input / timeouts off-main-thread
        return None


def grade(pred: str | None, gold: str | float | int | None) -> bool:
    r"""Whether a predicted answer equals the reference answer.

    Parameters
    ----------
    pred
        An extracted answer (e.g. from :func:`extract_answer`), or ``None``.
    gold
        The reference answer (string, or a number as in AMC23's ``27.0``).

    Notes
    -----
    Order: (1) exact rational equality when both sides parse as numbers (``1,000``
    = ``1000``, ``\dfrac{3}{4}`` = ``0.75``, ``18 dollars`` = ``18``); (2)
    ``math-verify`` symbolic equivalence; (3) equality of normalised strings.
    The numeric test comes first because it is exact and fast; ``math-verify`` handles
    the rest (radicals, tuples, intervals, ``\pi``).
    """
    if pred is None or gold is None:
        return False
    gold_s = _gold_str(gold)
    pred_s = str(pred)
    a, b = parse_number(pred_s), parse_number(gold_s)
    if a is not None and b is not None:
        return a == b
    mv = _math_verify(pred_s, gold_s)
    if mv is not None and mv:
        return True
    return normalize_answer(pred_s) == normalize_answer(gold_s)


def _gold_str(gold: str | float | int) -> str:
    if isinstance(gold, float):
        return str(int(gold)) if gold.is_integer() else repr(gold)
    return str(gold)


def weighted_vote(
    answers: list[str | None], weights: list[float] | None = None
) -> str | None:
    """Weighted majority vote over answers, grouping equivalent ones with :func:`grade`.

    Each answer gets the total weight of the answers equal to it; ``None`` answers
    never win unless all are ``None``. Ties go to the first answer seen.
    """
    if weights is None:
        weights = [1.0] * len(answers)
    if len(weights) != len(answers):
        raise ValueError("answers and weights must have the same length")
    reps: list[str] = []
    totals: list[float] = []
    for ans, w in zip(answers, weights, strict=True):
        if ans is None:
            continue
        for k, r in enumerate(reps):
            if ans == r or grade(ans, r):
                totals[k] += float(w)
                break
        else:
            reps.append(ans)
            totals.append(float(w))
    if not reps:
        return None
    best = max(range(len(reps)), key=lambda k: totals[k])
    return reps[best]
