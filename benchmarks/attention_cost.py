"""What each attention module adds to a block: parameters, FLOPs and forward time.

For every ``gapjax.attention.ATTENTIONS`` name at C channels on an h x w map (default 256,
14x14, the third ResNet stage): parameters (``jax.eval_shape``, no compile), FLOPs of one
example's eval-mode forward from XLA's cost analysis of the compiled program
(``jax.jit(f).lower(...).compile().cost_analysis()``; XLA counts a multiply-add as 2 and
every elementwise op), and the forward time of a batch next to two yardsticks timed in
the same rounds: the identity (the map scaled by a runtime scalar: one read and one write
of the map, the least any gate costs) and the block's 3x3 convolution C -> C. Times are
information, not targets: on a shared CPU they move with the load.

    python benchmarks/attention_cost.py [--channels 256] [--size 14] [--batch 8]
        [--dtype float32|bfloat16] [--quick] [--out FILE]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from common import base_parser, block, emit, error_entry

from gapjax.attention import ATTENTIONS, make_attention


def xla_flops(fn, *args) -> float | None:
    """FLOPs of ``fn(*args)`` from XLA's cost analysis of the compiled program."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return None if flops is None else float(flops)


def interleaved_times(functions: dict, rounds: int) -> dict[str, dict[str, float]]:
    """Median and minimum seconds of each zero-argument blocking callable, timed in
    alternation (a load change hits every one alike; the minimum is the least disturbed)."""
    samples = {name: [] for name in functions}
    for fn in functions.values():
        fn()  # compile and warm up
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(values), "min": min(values)}
            for name, values in samples.items()}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    channels, size = (32, 8) if args.quick else (args.channels, args.size)
    batch, rounds = (2, 3) if args.quick else (args.batch, args.repeats or 40)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels), dtype)
    one = x[:1]

    conv = jax.random.normal(jax.random.key(1), (3, 3, channels, channels), dtype) * 0.02

    def conv3x3(x):
        return jax.lax.conv_general_dilated(x, conv, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def identity(x, scale):
        return x * scale

    scale = jnp.asarray(1.0, dtype)
    yardsticks = {"identity": (identity, (scale,)), "conv3x3": (conv3x3, ())}
    records, runners = {}, {}
    for name, (fn, extra) in yardsticks.items():
        compiled = jax.jit(fn)
        records[name] = {"flops": xla_flops(fn, one, *extra), "parameters": 0}
        runners[name] = lambda compiled=compiled, extra=extra: block(compiled(x, *extra))
    records["conv3x3"]["parameters"] = 9 * channels * channels
    for name in ATTENTIONS.names():
        try:
            module = make_attention(name, channels, dtype=dtype)
            abstract = jax.eval_shape(module.init, jax.random.key(0), one)
            variables = module.init(jax.random.key(0), one)
            apply = jax.jit(module.apply)
            records[name] = {
                "parameters": sum(leaf.size for leaf in
                                  jax.tree_util.tree_leaves(abstract.get("params", {}))),
                "flops": xla_flops(module.apply, variables, one),
            }
            runners[name] = (lambda apply=apply, variables=variables:
                             block(apply(variables, x)))
        except Exception as exc:  # one module failing must not hide the others
            records[name] = error_entry(exc)
    times = interleaved_times(runners, rounds)
    for name, seconds in times.items():
        records[name]["forward_ms"] = 1e3 * seconds["median"]
        records[name]["forward_min_ms"] = 1e3 * seconds["min"]
        for yardstick in ("identity", "conv3x3"):
            records[name][f"time_vs_{yardstick}"] = seconds["median"] / times[yardstick][
                "median"]
            records[name][f"min_time_vs_{yardstick}"] = seconds["min"] / times[yardstick][
                "min"]
    emit({"benchmark": "attention_cost", "channels": channels, "size": size, "batch": batch,
          "dtype": args.dtype, "rounds": rounds, "modules": records, "targets": []}, args.out)


if __name__ == "__main__":
    main()
