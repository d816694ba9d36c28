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
  for the fastest runs), repeats, calls_per_sample, device, jax, load_average_1min.
The yardstick's own line has pool "x.sum()". Timings are figures, never assertions.

One sample is the mean of ``calls_per_sample`` back-to-back calls (enough to last a few
milliseconds), so that on an accelerator the per-call dispatch latency does not hide the
kernel time; on a CPU with these shapes it is one call.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from common import base_parser  # benchmarks/common.py; also puts the repo on sys.path

from gapjax import pooling

PARAMETER_FREE = ("gap", "gmp", "gsp", "avgmax", "catavgmax")
FULL_CASES = [((256, 14, 14, 1024), "float32"), ((256, 7, 7, 2048), "bfloat16")]
QUICK_CASES = [((8, 7, 7, 64), "float32"), ((8, 7, 7, 128), "bfloat16")]
PASSES = ("forward", "forward+backward")
#: A sample lasts at least this long (seconds), so that dispatch latency stays small.
MIN_SAMPLE_S = 0.005
MAX_CALLS_PER_SAMPLE = 100


Candidate = Callable[[jax.Array, jax.Array], jax.Array]


def pool_functions() -> dict[str, Candidate]:
    """Every pool as ``(x [B, *S, C], aux [B, *S]) -> [B, width]``: gem and lse with fixed
    exponents; weighted and attention take ``aux`` as position weights / scores (the
    pooling itself, no projection). ``aux`` is an argument rather than a captured constant
    so that XLA cannot fold the weight normalisation into the program."""
    functions: dict[str, Candidate] = {
        name: (lambda x, aux, name=name: pooling.pool(name, x)) for name in PARAMETER_FREE
    }
    functions.update(
        gem=lambda x, aux: pooling.gem(x, 3.0),
        lse=lambda x, aux: pooling.lse(x, 10.0),
        weighted=lambda x, aux: pooling.weighted(x, aux),
        attention=lambda x, aux: pooling.attention(x, aux),
    )
    return functions


def forward_and_backward(fn: Candidate) -> Candidate:
    """``(x, aux) -> d sum(fn(x, aux)) / dx``, the whole training-step cost of a pool."""
    return jax.grad(lambda x, aux: fn(x, aux).astype(jnp.float32).sum())


def calls_per_sample(fn: Callable[..., jax.Array], *args: jax.Array) -> int:
    """How many back-to-back calls make one sample last at least ``MIN_SAMPLE_S``."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds = time.perf_counter() - start
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9))))


def time_interleaved(
    candidates: dict[str, Candidate], x: jax.Array, aux: jax.Array, repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each jitted candidate on ``(x, aux)`` (``repeats`` samples
    each), and the calls per sample used.

    Candidates take turns within every round, so a burst of load from other processes
    hits them alike and the ratios of medians stay meaningful on a shared machine.
    """
    compiled = {name: jax.jit(fn).lower(x, aux).compile() for name, fn in candidates.items()}
    for fn in compiled.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(x, aux))
    calls = {name: calls_per_sample(fn, x, aux) for name, fn in compiled.items()}
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                out = fn(x, aux)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / calls[name])
    return times, calls


def benchmark_case(
    shape: tuple[int, ...], dtype: str, pools: list[str], repeats: int, warmup: int
) -> list[dict]:
    """All records for one (shape, dtype): the yardstick and each pool, both passes."""
    key_x, key_aux = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_x, shape, jnp.float32).astype(dtype)
    aux = jax.random.uniform(key_aux, shape[:-1], jnp.float32)
    functions = pool_functions()
    yardstick = lambda x, aux: x.sum()
    records = []
    for pass_name in PASSES:
        candidates = {"x.sum()": yardstick, **{name: functions[name] for name in pools}}
        if pass_name == "forward+backward":
            candidates = {name: forward_and_backward(fn) for name, fn in candidates.items()}
        times, calls = time_interleaved(candidates, x, aux, repeats, warmup)
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
                "calls_per_sample": calls[name],
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "load_average_1min": round(os.getloadavg()[0], 2),
                "platform": jax.default_backend(),
            })
    return records


def parse_args(argv: list[str] | None = None):
    """``--quick``, ``--out FILE``, ``--repeats N`` (shared flags), ``--warmup``, ``--pools``."""
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    known = list(pool_functions())
    parser.add_argument("--pools", default=",".join(known),
                        help="comma-separated pool names (default: all)")
    args = parser.parse_args(argv)
    args.pools = [name.strip() for name in args.pools.split(",") if name.strip()]
    unknown = [name for name in args.pools if name not in known]
    if unknown:
        parser.error(f"--pools: unknown {unknown}; choose from {', '.join(known)}")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
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
    sys.exit(main())
