"""Resampling benchmark: smcjax vs particles 0.4 (NumPy/numba) vs BlackJAX 1.7.1.

Usage::

    python benchmarks/bench_resampling.py            # N = 1e3 ... 1e6, all schemes
    python benchmarks/bench_resampling.py --quick    # N = 1e3 ... 1e5, fewer repeats
    python benchmarks/bench_resampling.py --schemes systematic --sizes 1e6

All timings are in one process, on CPU, as the median of ``--repeats`` calls with a
fresh key each time (JAX: jitted, ``block_until_ready``; the compile time of the first
call is reported separately), each series after ``--warmup`` seconds of untimed calls
of the same function (default 0.5 s, for every library: on the VM this was written
on, XLA's multi-threaded kernels ran up to ~2x slower for the first ~0.2 s of calls
after a different workload, e.g. the previous library's series). Inputs are N(0, 1)
log-weights in float32, M = N.

* A second table times the JAX resamplers inside one jitted ``lax.scan`` of 3-20
  calls (fresh key and input per call, nothing hoisted), which is how smcjax's
  filters call them; ``--no-in-scan`` skips it.
* smcjax takes *unnormalised log-weights* (its time includes the exp/normalisation);
* particles and BlackJAX take *normalised weights* (normalisation not timed), so the
  comparison is conservative for smcjax. particles' ``inverse_cdf`` is numba-compiled
  (warmed up before timing).
* "searchsorted design" is the textbook resampler (``jnp.cumsum`` +
  ``jnp.searchsorted``, BlackJAX's design) written from log-weights, and "blocked
  cumsum + searchsorted" swaps in smcjax's blocked prefix sum, to separate the two
  costs; both against smcjax's O(N) rank/merge design (``smcjax.resampling`` docs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from smcjax import resampling as rs


def _searchsorted_systematic(key, log_weights, cumsum):
    n = log_weights.shape[0]
    w = jnp.exp(log_weights - jnp.max(log_weights))
    c = cumsum(w)
    u = (jnp.arange(n, dtype=w.dtype) + jax.random.uniform(key, ())) / n
    return jnp.clip(jnp.searchsorted(c, u * c[-1]), 0, n - 1).astype(jnp.int32)


def _warm(call, seconds: float) -> None:
    """Call ``call()`` repeatedly for ``seconds`` (at least once)."""
    end = time.perf_counter() + seconds
    call()
    while time.perf_counter() < end:
        call()


def _time_jax(
    fn, arg, repeats: int, seed: int = 0, warmup: float = 0.0
) -> tuple[float, float]:
    """(compile seconds, median run milliseconds) of jitted ``fn(key, arg)``."""
    jitted = jax.jit(fn)
    keys = jax.random.split(jax.random.key(seed), repeats + 1)
    t0 = time.perf_counter()
    compiled = jitted.lower(keys[0], arg).compile()
    compile_s = time.perf_counter() - t0
    _warm(lambda: jax.block_until_ready(compiled(keys[0], arg)), warmup)
    times = []
    for k in keys[1:]:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(k, arg))
        times.append(time.perf_counter() - t0)
    return compile_s, 1e3 * statistics.median(times)


def _time_jax_scan(
    fn, arg, repeats: int, calls: int = 20, seed: int = 0, warmup: float = 0.0
) -> float:
    """Median milliseconds per call of ``fn(key, arg)`` run ``calls`` times in a scan.

    This is how smcjax's filters call a resampler: inside one jitted ``lax.scan``.
    Every call gets a fresh key, and its input is ``arg + c`` with ``c`` a float
    carried from the previous call's ancestors (0.0 at run time, but not a constant
    XLA can fold), so no part of the resampler is hoisted out of the loop.
    """

    def run(key, x):
        def body(c, k):
            a = fn(k, x + c)
            return a[-1].astype(x.dtype) * 0.0, a[0]

        return jax.lax.scan(body, jnp.zeros((), x.dtype), jax.random.split(key, calls))

    compiled = jax.jit(run).lower(jax.random.key(seed), arg).compile()
    keys = jax.random.split(jax.random.key(seed + 1), repeats + 1)
    _warm(lambda: jax.block_until_ready(compiled(keys[0], arg)), warmup)
    times = []
    for k in keys[1:]:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(k, arg))
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)


def _scan_calls(per_call_ms: float) -> int:
    """Calls per timed scan: ~100 ms of work, between 3 and 20 calls."""
    return int(min(20, max(3, round(100.0 / max(per_call_ms, 1e-3)))))


def _time_np(fn, repeats: int, warmup: float = 0.0) -> float:
    _warm(fn, warmup)  # (the first call also compiles numba's loop)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def _ratios(ours: float, particles: float | None, blackjax: float | None) -> str:
    """The last two table cells: particles / smcjax and BlackJAX / smcjax."""
    return (
        f"{_fmt(particles and particles / ours, 2)}× | "
        f"{_fmt(blackjax and blackjax / ours, 2)}× |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 1e5")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--warmup",
        type=float,
        default=0.5,
        help="seconds of untimed calls before each timed series (every library)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated N (default 1e3,1e4,1e5[,1e6])",
    )
    parser.add_argument(
        "--schemes",
        default="systematic,stratified,multinomial,residual",
        help="comma-separated list",
    )
    parser.add_argument(
        "--no-in-scan",
        dest="in_scan",
        action="store_false",
        help="skip the per-call times inside one jitted lax.scan (3-20 calls)",
    )
    args = parser.parse_args()
    sizes = [10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6]
    if args.sizes:
        sizes = [int(float(n)) for n in args.sizes.split(",")]
    repeats = args.repeats or (10 if args.quick else 30)
    warm = args.warmup

    try:
        import particles.resampling as pr
    except ImportError:  # pragma: no cover
        pr = None
    try:
        import blackjax.smc.resampling as br
    except ImportError:  # pragma: no cover
        br = None

    print(
        f"# Resampling benchmark\n\njax {jax.__version__} on "
        f"{jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; load average "
        f"{os.getloadavg()[0]:.1f}; median of {repeats} runs; M = N.\n"
    )
    rows = []
    for scheme in args.schemes.split(","):
        ours = getattr(rs, scheme)
        for n in sizes:
            rng = np.random.default_rng(n)
            lw_np = rng.standard_normal(n).astype(np.float32)
            lw = jnp.asarray(lw_np)
            w_np = np.exp(lw_np.astype(np.float64) - lw_np.max())
            w_np /= w_np.sum()
            w_jax = jnp.asarray(w_np, jnp.float32)
            comp, ms = _time_jax(lambda k, x, f=ours: f(k, x), lw, repeats, warmup=warm)
            row = {"scheme": scheme, "N": n, "smcjax": ms, "compile": comp}
            scan_repeats = max(3, repeats // 3)
            if args.in_scan:
                row["smcjax_scan"] = _time_jax_scan(
                    lambda k, x, f=ours: f(k, x),
                    lw,
                    scan_repeats,
                    calls=_scan_calls(ms),
                    warmup=warm,
                )
            if pr is not None:
                f_pr = getattr(pr, scheme)
                row["particles"] = _time_np(
                    lambda f=f_pr: f(w_np, n), repeats, warmup=warm
                )
            if br is not None:
                f_br = getattr(br, scheme)
                row["blackjax"] = _time_jax(
                    lambda k, x, f=f_br, n=n: f(k, x, n), w_jax, repeats, warmup=warm
                )[1]
                if args.in_scan:
                    row["blackjax_scan"] = _time_jax_scan(
                        lambda k, x, f=f_br, n=n: f(k, x, n),
                        w_jax,
                        scan_repeats,
                        calls=_scan_calls(row["blackjax"]),
                        warmup=warm,
                    )
            if scheme == "systematic":
                row["searchsorted"] = _time_jax(
                    lambda k, x: _searchsorted_systematic(k, x, jnp.cumsum),
                    lw,
                    max(3, repeats // 3),
                )[1]
                row["blocked+ss"] = _time_jax(
                    lambda k, x: _searchsorted_systematic(k, x, rs._cumsum),
                    lw,
                    max(3, repeats // 3),
                )[1]
            rows.append(row)
            print(f"<!-- {row} -->", flush=True)

    print(
        "\n| scheme | N | smcjax (ms) | compile (s) | particles 0.4 (ms) "
        "| BlackJAX 1.7.1 (ms) | particles / smcjax | BlackJAX / smcjax |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        pt, bj = r.get("particles"), r.get("blackjax")
        print(
            f"| {r['scheme']} | {r['N']:.0e} | {_fmt(r['smcjax'])} | "
            f"{_fmt(r['compile'], 2)} | {_fmt(pt)} | {_fmt(bj)} | "
            f"{_ratios(r['smcjax'], pt, bj)}"
        )
    scan_rows = [r for r in rows if "smcjax_scan" in r]
    if scan_rows:
        print(
            "\nInside one jitted `lax.scan` (3-20 calls, ~100 ms; fresh key and input "
            "each call; "
            "how the filters call a resampler), ms per call; particles per call from "
            "Python as above:\n\n| scheme | N | smcjax in scan | BlackJAX in scan "
            "| particles 0.4 | particles / smcjax | BlackJAX / smcjax |\n"
            "|---|---:|---:|---:|---:|---:|---:|"
        )
        for r in scan_rows:
            pt, bj = r.get("particles"), r.get("blackjax_scan")
            print(
                f"| {r['scheme']} | {r['N']:.0e} | {_fmt(r['smcjax_scan'])} | "
                f"{_fmt(bj)} | {_fmt(pt)} | {_ratios(r['smcjax_scan'], pt, bj)}"
            )
    sys_rows = [r for r in rows if "searchsorted" in r]
    if sys_rows:
        print(
            "\nSystematic resampling, design comparison (same process, from "
            "log-weights):\n\n| N | O(N) rank/merge (smcjax) | jnp.cumsum + "
            "searchsorted | blocked cumsum + searchsorted |\n|---:|---:|---:|---:|"
        )
        for r in sys_rows:
            print(
                f"| {r['N']:.0e} | {_fmt(r['smcjax'])} | {_fmt(r['searchsorted'])} | "
                f"{_fmt(r['blocked+ss'])} |"
            )


if __name__ == "__main__":
    main()
