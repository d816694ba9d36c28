"""Step-time overhead of Squeeze-and-Excitation: SE-ResNet / ResNet train step time.

Both models' train steps (the project's ``train_step``, see ``train_throughput.py``) are
compiled first, then timed in alternating rounds (plain, SE, plain, SE, ...), so that a
load change on a shared machine hits both alike; the ratio is of the medians. Target:
SE-ResNet-50 / ResNet-50 <= 1.05 (the paper measured 1.10 on GPUs).

    python benchmarks/se_overhead.py [--depth 50] [--batch B] [--image-size 224]
        [--dtype float32|bfloat16] [--quick] [--out FILE]

``--quick`` (or GAPJAX_BENCH_QUICK=1) uses 96x96 inputs and batch 2: the ratio is then
pessimistic, since the SE work that does not scale with resolution (the two small Dense
layers) weighs more against the convolutions.
"""

from __future__ import annotations

import statistics
import sys

import jax
from common import base_parser, emit, error_entry, target
from train_throughput import DTYPES, compiled_step

TARGET = 1.05


def interleaved_ratio(plain: dict, se: dict, rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median step times of two compiled steps timed in alternation, and their ratio."""
    import time

    for _ in range(warmup):
        plain["run"]()
        se["run"]()
    times = {"plain": [], "se": []}
    for _ in range(rounds):
        for key, step in (("plain", plain), ("se", se)):
            start = time.perf_counter()
            step["run"]()
            times[key].append(time.perf_counter() - start)
    plain_s, se_s = statistics.median(times["plain"]), statistics.median(times["se"])
    return {"plain_step_s": plain_s, "se_step_s": se_s, "ratio": se_s / plain_s,
            "rounds": rounds}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, choices=(18, 50), default=50)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    platform = jax.devices()[0].platform
    native_size = 32 if args.depth == 18 else 224  # ResNet-18 pair: the CIFAR-stem models
    if args.quick:
        batch = args.batch or 2
        image_size, rounds = args.image_size or min(native_size, 96), args.repeats or 3
    else:
        batch = args.batch or (128 if platform != "cpu" else 8)
        image_size, rounds = args.image_size or native_size, args.repeats or 10
    plain_name, se_name = f"resnet{args.depth}", f"seresnet{args.depth}"
    setting = f"{plain_name} pair, {image_size}px, batch {batch}, {args.dtype}, {platform}"
    payload = {"benchmark": "se_overhead", "setting": setting, "batch": batch,
               "image_size": image_size, "dtype": args.dtype}
    try:
        plain = compiled_step(plain_name, batch=batch, dtype=args.dtype, image_size=image_size)
        se = compiled_step(se_name, batch=batch, dtype=args.dtype, image_size=image_size)
        payload.update(interleaved_ratio(plain, se, rounds))
        payload.update({"plain_compile_s": plain["compile_s"], "se_compile_s": se["compile_s"],
                        "plain_flops_per_step": plain["flops_per_step"],
                        "se_flops_per_step": se["flops_per_step"]})
        payload["flops_ratio"] = se["flops_per_step"] / max(plain["flops_per_step"], 1.0)
    except Exception as exc:  # recorded in the JSON; a benchmark never fails
        payload.update(error_entry(exc))
        print(payload["error"], file=sys.stderr)
    payload["targets"] = [target(f"{se_name} / {plain_name} train step time ({setting})",
                                 payload.get("ratio"), TARGET, higher_is_better=False,
                                 unit="x")]
    emit(payload, args.out)


if __name__ == "__main__":
    main()
