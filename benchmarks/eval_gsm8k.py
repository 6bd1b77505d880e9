"""Accuracy on GSM8K test questions: greedy vs particle filtering per CPU reward.

    python benchmarks/eval_gsm8k.py --limit 50                       # the full table
    python benchmarks/eval_gsm8k.py --limit 10 --configs greedy,pf4:self-certainty
    python benchmarks/eval_gsm8k.py --quick                          # 3 questions

Questions are batched: ``--rows`` LM rows (questions x particles) run in one vmapped
program, and question ``i`` always gets the key ``fold_in(key(seed), i)``.

Configurations are ``greedy`` or ``pf<N>:<reward>`` (rewards: self-certainty,
arithmetic, judge), optionally with filter switches: ``pf8:self-certainty:compact``
runs the same filter with ``compact=True`` (its own rows in the table). Every
finished question is appended to ``--out`` (jsonl), so a long run can be interrupted
and resumed (``--resume`` skips what is already there).
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


def run_batch(cfg: str, lm, idx, probs, opts, seed, out: Path, rows: int):
    """Run ``cfg`` on several questions in one vmapped program (``rows`` LM rows).

    Question ``i`` (its index in the dataset) always gets the key
    ``fold_in(key(seed), i)``, whatever batch it lands in.
    """
    from smcjax.llm.answers import grade
    from smcjax.llm.its import particle_filter_batch

    if cfg == "greedy":
        n, reward = 1, "self-certainty"
        extra = dict(temperature=0.0, ess_threshold=0.0, weights="fk")
    else:
        # pfN:reward, optionally with PF switches: pfN:reward:compact[:speculate]
        n_s, reward, *flags = cfg[2:].split(":")
        bad = set(flags) - {"compact", "speculate"}
        if bad:
            raise ValueError(f"unknown switch(es) {sorted(bad)} in config {cfg!r}")
        n, extra = int(n_s), {f: True for f in flags}
    per = max(1, rows // n)
    for s in range(0, len(idx), per):
        ii, pp = idx[s : s + per], probs[s : s + per]
        keys = jax.numpy.stack(
            [jax.random.fold_in(jax.random.key(seed), i) for i in ii]
        )
        rs = particle_filter_batch(
            keys, lm, reward, [p.question for p in pp], n, **opts, **extra
        )
        for prob, r in zip(pp, rs, strict=True):
            rec = dict(
                config=cfg,
                id=prob.id,
                gold=prob.answer,
                answer=r.answer,
                correct=bool(grade(r.answer, prob.answer)),
                tokens=r.tokens_generated,
                wall=r.wall_time / len(pp),
                compile=r.compile_time / len(pp),
                batch=len(pp),
                answers=r.answers,
                text=r.text,
            )
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(
                f"{cfg} q{prob.id}: {r.answer!s:>10} vs {prob.answer:>8} "
                f"{'ok' if rec['correct'] else '--'} ({rec['wall']:.0f}s/question)",
                flush=True,
            )


def _sign_test(b: int, c: int) -> float:
    """Exact two-sided sign (McNemar) test p-value for ``b`` wins, ``c`` losses."""
    from math import comb

    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def table(out: Path, configs) -> str:
    """Markdown accuracy table, with a paired comparison to greedy.

    "vs greedy" counts, on the questions both were run on, the questions this method
    solves and greedy does not (wins) and the reverse (losses), with the exact
    two-sided sign-test p-value of that split.

    Two columns separate generation from selection, from each record's final
    particles' answers ``answers`` (after the last resampling, so repeated answers
    carry their weight):

    * "any particle correct": questions where at least one final particle's answer
      grades correct, an upper bound for any rule that picks one particle;
    * "majority of particles": accuracy of the most frequent final answer (ties go to
      the answer seen first), the weighted-vote alternative to the paper's
      best-final-reward choice.
    """
    from collections import Counter

    from smcjax.cli import wilson_interval
    from smcjax.llm.answers import grade

    recs = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    greedy = {r["id"]: r["correct"] for r in recs if r["config"] == "greedy"}
    lines = [
        "| method | questions | correct | accuracy [95% CI] | vs greedy: wins/losses "
        "(sign-test p) | any particle correct | majority of particles "
        "| tokens/question | s/question |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        rs = [r for r in recs if r["config"] == cfg]
        if not rs:
            continue
        k, m = sum(r["correct"] for r in rs), len(rs)
        lo, hi = wilson_interval(k, m)
        tok = sum(r["tokens"] for r in rs) / m
        wall = sum(r["wall"] - r["compile"] for r in rs) / m
        paired = "–"
        if cfg != "greedy":
            both = [r for r in rs if r["id"] in greedy]
            b = sum(r["correct"] and not greedy[r["id"]] for r in both)
            c = sum(greedy[r["id"]] and not r["correct"] for r in both)
            if both:
                paired = f"{b}/{c} (p = {_sign_test(b, c):.2f})"
        anyc = vote = 0
        for r in rs:
            got = [a for a in r.get("answers") or [] if a is not None]
            anyc += any(grade(a, r["gold"]) for a in got)
            if got:
                vote += bool(grade(Counter(got).most_common(1)[0][0], r["gold"]))
        lines.append(
            f"| {cfg} | {m} | {k} | {k / m:.2f} [{lo:.2f}, {hi:.2f}] | {paired} | "
            f"{anyc} ({anyc / m:.2f}) | {vote} ({vote / m:.2f}) | "
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
    ap.add_argument(
        "--table-only", action="store_true", help="print the table of --out and exit"
    )
    ap.add_argument(
        "--rows", type=int, default=16, help="LM rows per batch (questions x N)"
    )
    ap.add_argument(
        "--order",
        choices=("chunk", "config"),
        default="chunk",
        help="chunk: every config on 16 questions before the next 16 (an interrupted "
        "run compares configs on the same questions); config: each config on all "
        "questions before the next config (the first configs reach --limit first)",
    )
    a = ap.parse_args()
    from smcjax.llm import load
    from smcjax.llm.data import load_dataset

    if a.quick:
        a.limit, a.configs = 3, "greedy,pf4:self-certainty"
    configs = a.configs.split(",")
    out = Path(a.out)
    if a.table_only:
        print(table(out, configs))
        return
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
    # chunk-major (every config on a chunk of questions before the next chunk) keeps
    # an interrupted run comparing configs on the same questions; config-major brings
    # the first configs to --limit first
    chunks = range(0, len(problems), a.rows)
    if a.order == "chunk":
        plan = [(c, cfg) for c in chunks for cfg in configs]
    else:
        plan = [(c, cfg) for cfg in configs for c in chunks]
    for c, cfg in plan:
        idx = [
            i
            for i in range(c, min(c + a.rows, len(problems)))
            if (cfg, problems[i].id) not in done
        ]
        if idx:
            probs = [problems[i] for i in idx]
            run_batch(cfg, lm, idx, probs, opts, a.seed, out, a.rows)
    print()
    print(f"GSM8K test, first {a.limit} questions, caps {opts}, seed {a.seed}")
    print(table(out, configs))


if __name__ == "__main__":
    main()
