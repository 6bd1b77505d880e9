"""The README's examples run as written (keeps the README true).

All ``python`` blocks except the LLM one run in order in one namespace, in a
subprocess. The LLM block needs the embedded 0.5B model and minutes of CPU: it is
parsed, and every ``smcjax.llm`` name it uses must exist; the model itself is exercised
by the ``demo_model`` tests and by ``smcjax demo``.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run():
    blocks = [b for b in _blocks() if "smcjax.llm" not in b]
    assert len(blocks) >= 5
    # Shrink the two longest loops so the test stays cheap; semantics unchanged.
    code = "\n".join(blocks).replace("num_iterations=500", "num_iterations=50")
    code = code.replace("num_steps=5000", "num_steps=1000")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_readme_llm_example_names_exist():
    import smcjax.llm as llm

    (block,) = [b for b in _blocks() if "smcjax.llm" in b]
    ast.parse(block)
    used = set(re.findall(r"\bllm\.([A-Za-z_][\w.]*)", block))
    assert used, block
    for dotted in used:
        obj = llm
        for part in dotted.split("."):
            obj = getattr(obj, part)  # AttributeError names the missing function
