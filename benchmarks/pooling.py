"""Throughput of every pool against the memory-bound yardstick ``x.sum()``.

For each pool and each feature-map shape this times the jitted forward pass and the
jitted forward + backward pass (gradient of the summed output with respect to ``x``),
after a warm-up, as the median of interleaved repeats, and reports the achieved memory
throughput and the ratio to ``x.sum()`` on the same tensor timed in the same rounds.

    python benchmarks/pooling.py                 # [256,14,14,1024] f32, [256,7,7,2048] bf16
    python benchmarks/pooling.py --quick         # small shapes, a smoke run
    python benchmarks/pooling.py --out pooling.jsonl --repeats 15 --pools gap,gmp

Output: one JSON object per line (also written to ``--out``). Fields:
  pool, shape, dtype, pass ("forward" | "forward+backward"), median_ms, min_ms,
  gbps (bytes that must move at least, divided by the median time: the input once for
  the forward pass; the input read and its gradient written for forward + backward),
  yardstick_median_ms, ratio (median_ms / yardstick_median_ms) and ratio_min (the same
  for the fastest runs), device, jax.
The yardstick's own line has pool "x.sum()". Timings are figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gapjax import pooling

FULL_CASES = [((256, 14, 14, 1024), "float32"), ((256, 7, 7, 2048), "bfloat16")]
QUICK_CASES = [((8, 7, 7, 64), "float32"), ((8, 7, 7, 128), "bfloat16")]
PASSES = ("forward", "forward+backward")


def pool_functions(shape: tuple[int, ...]) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """Every pool as ``x -> [B, width]``; gem/lse with fixed exponents, weighted and
    attention with fixed position weights / scores (the pooling itself, no projection)."""
    spatial = shape[1:-1]
    key_weights, key_scores = jax.random.split(jax.random.PRNGKey(1))
    weights = jax.random.uniform(key_weights, (shape[0], *spatial), jnp.float32)
    scores = jax.random.normal(key_scores, (shape[0], *spatial), jnp.float32)
    functions = {name: (lambda x, name=name: pooling.pool(name, x)) for name in pooling.FUNCTIONS}
    functions.update(
        gem=lambda x: pooling.gem(x, 3.0),
        lse=lambda x: pooling.lse(x, 10.0),
        weighted=lambda x: pooling.weighted(x, weights),
        attention=lambda x: pooling.attention(x, scores),
    )
    return functions


def forward_and_backward(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """``x -> d sum(fn(x)) / dx``, the whole training-step cost of a pool."""
    return jax.grad(lambda x: fn(x).astype(jnp.float32).sum())


def time_interleaved(
    candidates: dict[str, Callable[[jax.Array], jax.Array]], x: jax.Array, repeats: int,
    warmup: int,
) -> dict[str, list[float]]:
    """Seconds per call of each jitted candidate on ``x``.

    Candidates take turns within every round, so a burst of load from other processes
    hits them alike and the ratios of medians stay meaningful on a shared machine.
    """
    compiled = {name: jax.jit(fn).lower(x).compile() for name, fn in candidates.items()}
    for fn in compiled.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(x))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[name].append(time.perf_counter() - start)
    return times


def benchmark_case(
    shape: tuple[int, ...], dtype: str, pools: list[str], repeats: int, warmup: int
) -> list[dict]:
    """All records for one (shape, dtype): the yardstick and each pool, both passes."""
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32).astype(dtype)
    functions = pool_functions(shape)
    yardstick = lambda x: x.sum()
    records = []
    for pass_name in PASSES:
        candidates = {"x.sum()": yardstick, **{name: functions[name] for name in pools}}
        if pass_name == "forward+backward":
            candidates = {name: forward_and_backward(fn) for name, fn in candidates.items()}
        times = time_interleaved(candidates, x, repeats, warmup)
        bytes_moved = x.nbytes * (1 if pass_name == "forward" else 2)
        base_median = statistics.median(times["x.sum()"])
        base_min = min(times["x.sum()"])
        for name, samples in times.items():
            median = statistics.median(samples)
            records.append({
                "pool": name,
                "shape": list(shape),
                "dtype": dtype,
                "pass": pass_name,
                "median_ms": round(median * 1e3, 3),
                "min_ms": round(min(samples) * 1e3, 3),
                "gbps": round(bytes_moved / median / 1e9, 2),
                "yardstick_median_ms": round(base_median * 1e3, 3),
                "ratio": round(median / base_median, 3),
                "ratio_min": round(min(samples) / base_min, 3),
                "repeats": repeats,
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
            })
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--out", help="also write the JSON lines to this file")
    parser.add_argument("--repeats", type=int, default=11, help="timed calls per candidate")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument("--pools", default=",".join(pool_functions((1, 1, 1)).keys()),
                        help="comma-separated pool names (default: all)")
    args = parser.parse_args(argv)
    known = list(pool_functions((1, 1, 1)))
    args.pools = [name.strip() for name in args.pools.split(",") if name.strip()]
    unknown = [name for name in args.pools if name not in known]
    if unknown:
        parser.error(f"--pools: unknown {unknown}; choose from {', '.join(known)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES
    out = open(args.out, "w") if args.out else None
    try:
        for shape, dtype in cases:
            for record in benchmark_case(shape, dtype, args.pools, args.repeats, args.warmup):
                line = json.dumps(record)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
