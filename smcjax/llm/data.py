"""Math-reasoning benchmarks as lists of :class:`Problem`.

Supported datasets (jsonl files, see ``smcjax/data/README.md`` and the project's
``../shared/data/README.md`` for sources and licences):

==========  ===================  ==========================================
name        file                 reference answer
==========  ===================  ==========================================
gsm8k       gsm8k_test.jsonl     text after ``####`` in ``answer``
math500     math500.jsonl        ``answer``
aime24      aime24.jsonl         ``answer``
amc23       amc23.jsonl          ``answer`` (a float such as ``27.0``)
==========  ===================  ==========================================

Files are looked for in ``$SMCJAX_DATA_DIR``, then in ``../shared/data`` next to a
source checkout; GSM8K falls back to the 100-question slice shipped in the package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from smcjax.llm.answers import gsm8k_reference

__all__ = ["DATASETS", "Problem", "data_dir", "load_dataset"]

DATASETS = {
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
}
_PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
_EMBEDDED = {"gsm8k": "gsm8k_test_100.jsonl"}


class Problem(NamedTuple):
    r"""One benchmark question.

    Attributes
    ----------
    question : str
    answer : str
        The reference final answer (e.g. ``"18"``, ``"\frac{1}{2}"``).
    solution : str
        The reference worked solution, when the dataset has one.
    id : str
    """

    question: str
    answer: str
    solution: str
    id: str


def data_dir() -> Path | None:
    """Return the directory holding the full benchmark files, or ``None``."""
    env = os.environ.get("SMCJAX_DATA_DIR")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    return shared if shared.is_dir() else None


def _find(name: str, path: str | Path | None) -> Path:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"path={str(path)!r} is not a file")
        return p
    d = data_dir()
    if d is not None and (d / DATASETS[name]).is_file():
        return d / DATASETS[name]
    if name in _EMBEDDED:
        return _PACKAGE_DATA / _EMBEDDED[name]
    raise FileNotFoundError(
        f"dataset {name!r}: {DATASETS[name]} not found; set SMCJAX_DATA_DIR to the "
        "directory holding it or pass path="
    )


def _row_to_problem(name: str, row: dict, i: int) -> Problem:
    if name == "gsm8k":
        return Problem(
            row["question"], gsm8k_reference(row["answer"]), row["answer"], str(i)
        )
    question = row.get("problem") or row.get("question")
    ans = row["answer"]
    if isinstance(ans, float) and ans.is_integer():
        ans = int(ans)
    pid = row.get("unique_id", row.get("id", i))
    return Problem(question, str(ans), row.get("solution", ""), str(pid))


def load_dataset(
    name: str = "gsm8k",
    *,
    limit: int | None = None,
    offset: int = 0,
    path: str | Path | None = None,
) -> list[Problem]:
    """Load a benchmark as a list of :class:`Problem` (file order).

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    limit : int, optional
        Keep at most this many problems (after ``offset``).
    offset : int
        Skip the first ``offset`` problems.
    path : str or Path, optional
        Read this jsonl file instead of locating the dataset.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset name={name!r}; expected one of {list(DATASETS)}"
        )
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    file = _find(key, path)
    out: list[Problem] = []
    with open(file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i < offset or not line.strip():
                continue
            if limit is not None and len(out) >= limit:
                break
            out.append(_row_to_problem(key, json.loads(line), i))
    return out
