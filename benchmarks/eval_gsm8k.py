"""Accuracy on GSM8K test questions: greedy vs particle filtering per CPU reward.

    python benchmarks/eval_gsm8k.py --limit 50                       # the full table
    python benchmarks/eval_gsm8k.py --limit 10 --configs greedy,pf4:self-certainty
    python benchmarks/eval_gsm8k.py --quick                          # 3 questions

Configurations are ``greedy`` or ``pf<N>:<reward>`` (rewards: self-certainty,
arithmetic, judge). Every finished question is appended to ``--out`` (jsonl), so a
long run can be interrupted and resumed (``--resume`` skips what is already there).
Prints a markdown table with 95 % Wilson intervals, tokens and wall time per question.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax

DEFAULT_CONFIGS = (
    "greedy,pf4:self-certainty,pf8:self-certainty,pf4:arithmetic,pf8:arithmetic,"
    "pf4:judge,pf8:judge"
)


def run_one(cfg: str, lm, i: int, prob, opts, seed, out: Path):
    from smcjax.llm.answers import grade
    from smcjax.llm.its import greedy, particle_filter

    key = jax.random.fold_in(jax.random.key(seed), i)
    if cfg == "greedy":
        r = greedy(key, lm, prob.question, **opts)
    else:
        n, reward = cfg[2:].split(":")
        r = particle_filter(key, lm, reward, prob.question, int(n), **opts)
    rec = dict(
        config=cfg,
        id=prob.id,
        gold=prob.answer,
        answer=r.answer,
        correct=bool(grade(r.answer, prob.answer)),
        tokens=r.tokens_generated,
        wall=r.wall_time,
        compile=r.compile_time,
        answers=r.answers,
        text=r.text,
    )
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(
        f"{cfg} q{prob.id}: {r.answer!s:>10} vs {prob.answer:>8} "
        f"{'ok' if rec['correct'] else '--'} ({r.wall_time:.0f}s)",
        flush=True,
    )


def table(out: Path, configs) -> str:
    from smcjax.cli import wilson_interval

    recs = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    lines = [
        "| method | questions | correct | accuracy [95% CI] | tokens/question | "
        "s/question |",
        "|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        rs = [r for r in recs if r["config"] == cfg]
        if not rs:
            continue
        k, m = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson_interval(k, m)
        tok = sum(r["tokens"] for r in rs) / m
        wall = sum(r["wall"] - r["compile"] for r in rs) / m
        lines.append(
            f"| {cfg} | {m} | {k} | {k / m:.2f} [{lo:.2f}, {hi:.2f}] | "
            f"{tok:.0f} | {wall:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--out", default="benchmarks/eval_gsm8k.jsonl")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--step-cap", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    from smcjax.llm import load
    from smcjax.llm.data import load_dataset

    if a.quick:
        a.limit, a.configs = 3, "greedy,pf4:self-certainty"
    configs = a.configs.split(",")
    out = Path(a.out)
    done = set()
    if a.resume and out.exists():
        done = {
            (json.loads(x)["config"], json.loads(x)["id"])
            for x in out.read_text().splitlines()
            if x.strip()
        }
    elif out.exists():
        out.unlink()
    problems = load_dataset("gsm8k", limit=a.limit)
    t0 = time.perf_counter()
    lm = load(a.model)
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    opts = dict(
        max_steps=a.max_steps, step_cap=a.step_cap, max_new_tokens=a.max_new_tokens
    )
    # question-major, so that an interrupted run still compares configs on the same
    # questions
    for i, prob in enumerate(problems):
        for cfg in configs:
            if (cfg, prob.id) not in done:
                run_one(cfg, lm, i, prob, opts, a.seed, out)
    print()
    print(f"GSM8K test, first {a.limit} questions, caps {opts}, seed {a.seed}")
    print(table(out, configs))


if __name__ == "__main__":
    main()
