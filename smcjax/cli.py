"""The ``smcjax`` command: ``solve``, ``eval`` and ``demo``.

::

    smcjax solve "Natalia sold clips to 48 of her friends ..." --particles 8
    smcjax eval --dataset gsm8k --limit 50 --particles 4 --reward self-certainty
    smcjax demo

``solve`` runs the step-level particle filter (:func:`smcjax.llm.particle_filter`) on
one question and prints the selected particle's steps, its answer and a per-step trace;
``eval`` grades a method on a benchmark and reports the accuracy with a 95 % (Wilson)
interval; ``demo`` compares one greedy sample with a particle filter on a few GSM8K
questions with the embedded model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "wilson_interval"]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_REWARD = "self-certainty"
REWARDS = ("self-certainty", "judge", "arithmetic", "prm")


def wilson_interval(
    correct: int, total: int, z: float = 1.959964
) -> tuple[float, float]:
    r"""Wilson score interval for a binomial proportion (95 % by default).

    .. math::

        \frac{\hat p + z^2/2n \pm z\sqrt{\hat p(1-\hat p)/n + z^2/4n^2}}{1 + z^2/n}
    """
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    den = 1 + z * z / total
    mid = (p + z * z / (2 * total)) / den
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


# ----------------------------------------------------------------------- options


def _add_pf_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint dir, .gguf or name"
    )
    p.add_argument("--reward", default=DEFAULT_REWARD, choices=REWARDS)
    p.add_argument("--prm", default=None, help="PRM checkpoint (implies --reward prm)")
    p.add_argument("--particles", "-n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--step-cap", type=int, default=96, help="tokens per step")
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="tokens per particle"
    )
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument(
        "--aggregation", default="model", choices=("model", "last", "min", "prod")
    )
    p.add_argument("--weights", default="paper", choices=("paper", "fk", "entropic"))
    p.add_argument(
        "--resampling",
        default="multinomial",
        choices=("multinomial", "stratified", "systematic", "residual"),
    )
    p.add_argument("--softmax-temperature", type=float, default=1.0)
    p.add_argument("--select", default="argmax", choices=("argmax", "vote"))
    p.add_argument(
        "--iterations", type=int, default=4, help="particle Gibbs / tempering sweeps"
    )
    p.add_argument("--chains", type=int, default=4, help="parallel tempering chains")


def _pf_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_steps=a.max_steps,
        step_cap=a.step_cap,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        aggregation=a.aggregation,
        weights=a.weights,
        resampling=a.resampling,
        softmax_temperature=a.softmax_temperature,
        select=a.select,
    )


def _load(a: argparse.Namespace):
    from smcjax.llm import load
    from smcjax.llm.rewards import get_reward

    t0 = time.perf_counter()
    lm = load(a.model)
    prm = None
    name = a.reward
    if a.prm is not None:
        from smcjax.llm import load_prm  # provided by the LLM-port module

        prm = load_prm(a.prm)
        name = "prm"
    reward = get_reward(name, lm, prm=prm)
    _err(f"loaded {a.model} in {time.perf_counter() - t0:.1f}s; reward: {reward.name}")
    return lm, reward


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- solve


def _print_solution(r: Any, out: Any = None) -> None:
    out = out or sys.stdout
    i = r.selected
    print(
        f"Selected particle {i} of {len(r.texts)} (reward {r.rewards[i]:.3f})", file=out
    )
    print("-" * 72, file=out)
    for k, (step, s) in enumerate(zip(r.steps[i], r.step_scores[i], strict=False), 1):
        print(f"[step {k} | score {s:.3f}]", file=out)
        print(step.strip(), file=out)
    print("-" * 72, file=out)
    print(f"Answer: {r.answer}", file=out)


def _print_trace(r: Any, out: Any = None) -> None:
    out = out or sys.stdout
    print("Trace (per filter step):", file=out)
    print(f"{'t':>3} {'tokens':>7} {'ESS':>6} {'resampled':>9} {'max w':>6}", file=out)
    for t in range(1, len(r.ess)):
        w = math.exp(float(r.weight_history[t].max()))
        print(
            f"{t:>3} {int(r.tokens_per_step[t]):>7} {float(r.ess[t]):>6.2f} "
            f"{bool(r.resampled[t])!s:>9} {w:>6.2f}",
            file=out,
        )
    print(
        f"{r.tokens_generated} tokens generated by {len(r.texts)} particles in "
        f"{r.wall_time:.1f}s (compile {r.compile_time:.1f}s); "
        f"answers: {r.answers}",
        file=out,
    )


def _solve(a: argparse.Namespace) -> int:
    import jax

    lm, reward = _load(a)
    r = _run_method(
        a.method,
        jax.random.key(a.seed),
        lm,
        reward,
        a.question,
        a.particles,
        _pf_kwargs(a),
        iterations=a.iterations,
        chains=a.chains,
    )
    _print_solution(r)
    _print_trace(r)
    return 0


# -------------------------------------------------------------------------- eval


METHODS = (
    "pf",
    "particle-gibbs",
    "parallel-tempering",
    "greedy",
    "best-of-n",
    "weighted-best-of-n",
    "self-consistency",
)


def _run_method(
    method: str,
    key,
    lm,
    reward,
    question: str,
    n: int,
    kw: dict,
    *,
    iterations: int = 4,
    chains: int = 4,
) -> Any:
    from smcjax.llm import its

    if method == "particle-gibbs":
        return its.particle_gibbs(key, lm, reward, question, n, iterations, **kw)
    if method == "parallel-tempering":
        return its.parallel_tempering(
            key, lm, reward, question, n, iterations, num_chains=chains, **kw
        )

    if method == "greedy":
        return its.greedy(
            key, lm, question, **_only(kw, "max_steps", "step_cap", "max_new_tokens")
        )
    fn = {
        "pf": its.particle_filter,
        "best-of-n": its.best_of_n,
        "weighted-best-of-n": its.weighted_best_of_n,
    }.get(method)
    if fn is not None:
        if method != "pf":
            kw = _only(
                kw,
                "max_steps",
                "step_cap",
                "max_new_tokens",
                "temperature",
                "aggregation",
            )
        return fn(key, lm, reward, question, n, **kw)
    if method == "self-consistency":
        return its.self_consistency(
            key,
            lm,
            question,
            n,
            **_only(kw, "max_steps", "step_cap", "max_new_tokens", "temperature"),
        )
    raise ValueError(f"unknown method {method!r}")


def _only(kw: dict, *names: str) -> dict:
    return {k: v for k, v in kw.items() if k in names}


def _eval(a: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from smcjax.llm.answers import grade
    from smcjax.llm.data import load_dataset

    problems = load_dataset(a.dataset, limit=a.limit, offset=a.offset)
    lm, reward = _load(a)
    kw = _pf_kwargs(a)
    correct, tokens, wall = 0, 0, 0.0
    rows = []
    bar = tqdm(problems, desc=f"{a.method} N={a.particles}", file=sys.stderr)
    for i, prob in enumerate(bar):
        key = jax.random.fold_in(jax.random.key(a.seed), i)
        r = _run_method(
            a.method,
            key,
            lm,
            reward,
            prob.question,
            a.particles,
            kw,
            iterations=a.iterations,
            chains=a.chains,
        )
        ok = grade(r.answer, prob.answer)
        correct += ok
        tokens += r.tokens_generated
        wall += r.wall_time
        bar.set_postfix(acc=f"{correct}/{i + 1}")
        rows.append(
            dict(
                id=prob.id,
                gold=prob.answer,
                answer=r.answer,
                correct=bool(ok),
                tokens=r.tokens_generated,
                wall=r.wall_time,
                compile=r.compile_time,
            )
        )
    lo, hi = wilson_interval(correct, len(problems))
    summary = dict(
        dataset=a.dataset,
        method=a.method,
        particles=a.particles,
        reward=reward.name,
        n=len(problems),
        correct=correct,
        accuracy=correct / max(len(problems), 1),
        ci95=[lo, hi],
        tokens=tokens,
        wall=wall,
        seed=a.seed,
    )
    print(
        f"{a.method} ({reward.name}, N={a.particles}) on {a.dataset}: "
        f"{correct}/{len(problems)} = {summary['accuracy']:.3f} "
        f"[95% CI {lo:.3f}, {hi:.3f}], {tokens} tokens, {wall:.0f}s"
    )
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(summary=summary, rows=rows)) + "\n")
    return 0


# -------------------------------------------------------------------------- demo


def _demo(a: argparse.Namespace) -> int:
    import jax
    from tqdm import tqdm

    from smcjax.llm.answers import grade
    from smcjax.llm.data import load_dataset
    from smcjax.llm.its import greedy, particle_filter

    problems = load_dataset("gsm8k", limit=a.questions, offset=a.offset)
    lm, reward = _load(a)
    kw = _pf_kwargs(a)
    print(
        f"smcjax demo: {len(problems)} GSM8K test questions, {a.model}; one greedy "
        f"sample vs a particle filter with {a.particles} particles ({reward.name} "
        f"reward, resampling every step).\n",
        flush=True,
    )
    score = {"greedy": 0, "pf": 0}
    bar = tqdm(total=2 * len(problems), desc="demo", file=sys.stderr)
    for i, prob in enumerate(problems):
        key = jax.random.fold_in(jax.random.key(a.seed), i)
        g = greedy(
            key,
            lm,
            prob.question,
            max_steps=a.max_steps,
            step_cap=a.step_cap,
            max_new_tokens=a.max_new_tokens,
        )
        bar.update(1)
        r = particle_filter(key, lm, reward, prob.question, a.particles, **kw)
        bar.update(1)
        gok, pok = grade(g.answer, prob.answer), grade(r.answer, prob.answer)
        score["greedy"] += gok
        score["pf"] += pok
        tqdm.write(f"Q{i + 1}: {prob.question}", file=sys.stdout)
        tqdm.write(f"  reference: {prob.answer}", file=sys.stdout)
        tqdm.write(
            f"  greedy   : {g.answer!s:<12} {'✓' if gok else '✗'}  "
            f"({g.tokens_generated} tokens, {g.wall_time:.1f}s)",
            file=sys.stdout,
        )
        tqdm.write(
            f"  PF N={a.particles:<3} : {r.answer!s:<12} {'✓' if pok else '✗'}  "
            f"({r.tokens_generated} tokens, {r.wall_time:.1f}s; particle answers "
            f"{r.answers})",
            file=sys.stdout,
        )
        if a.verbose:
            _print_solution(r)
    bar.close()
    n = len(problems)
    print(
        f"\nCorrect: greedy {score['greedy']}/{n}, particle filter {score['pf']}/{n}. "
        "(First calls include compilation; a few questions say little about accuracy —"
        " see `smcjax eval`.)"
    )
    return 0


# -------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``smcjax`` command."""
    p = argparse.ArgumentParser(
        prog="smcjax", description="JAX-native SMC; LLM inference-time scaling."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="particle-filter one question")
    s.add_argument("question")
    s.add_argument("--method", default="pf", choices=METHODS[:3])
    _add_pf_options(s)

    e = sub.add_parser("eval", help="accuracy on a benchmark")
    e.add_argument(
        "--dataset", default="gsm8k", choices=("gsm8k", "math500", "aime24", "amc23")
    )
    e.add_argument("--limit", type=int, default=50)
    e.add_argument("--offset", type=int, default=0)
    e.add_argument("--method", default="pf", choices=METHODS)
    e.add_argument("--out", default=None, help="append a JSON line with the results")
    _add_pf_options(e)

    d = sub.add_parser(
        "demo", help="greedy vs particle filter on a few GSM8K questions"
    )
    d.add_argument("--questions", type=int, default=2)
    d.add_argument("--offset", type=int, default=0)
    d.add_argument("--verbose", "-v", action="store_true")
    _add_pf_options(d)
    d.set_defaults(max_new_tokens=384, step_cap=96, max_steps=16)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smcjax`` command."""
    a = build_parser().parse_args(argv)
    if getattr(a, "particles", 1) < 1:
        _err("--particles must be >= 1")
        return 2
    handler = {"solve": _solve, "eval": _eval, "demo": _demo}[a.command]
    return handler(a)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
