"""Input-pipeline throughput against what the train step consumes.

For each embedded image dataset: examples per second delivered by the training iterator
(``gapjax.data.make_iterator(..., train=True)``: shuffle, augment, batch, grain prefetch)
after its first batch, and examples per second consumed by the project's cnn train step
on batches of the same shape (``train_throughput.compiled_step``). The pipeline keeps up
when ``pipeline / step >= 1``. Both are timed alone; in training they share the cores.

Needs the data stack (TFDS, grain, scikit-learn); the datasets are built on first use
under ``--data-dir`` (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    python benchmarks/input_pipeline.py [--dataset gapjax_digits ...] [--batch 64] [--quick]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from common import base_parser, emit, error_entry, target, time_calls
from train_throughput import compiled_step

#: dataset -> config.dataset options of the measured variant
DATASET_OPTIONS: dict[str, dict[str, Any]] = {
    "gapjax_digits": {},
    "gapjax_cluttered_digits": {"canvas_size": 64},
}


def pipeline_rate(name: str, options: dict[str, Any], batch: int, batches: int,
                  data_dir: str | None) -> dict[str, Any]:
    """Examples/s of the training iterator over ``batches`` batches after the first."""
    import ml_collections

    from gapjax.data import dataset_info, make_iterator

    dataset_config = ml_collections.ConfigDict({"name": name, "data_dir": data_dir,
                                                "augment": True, **options})
    info = dataset_info(dataset_config)  # builds the dataset on first use
    start = time.perf_counter()
    iterator = make_iterator(dataset_config, info.train_split, batch_size=batch, seed=0,
                             train=True)
    first = next(iterator)
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {"input_shape": list(first["image"].shape[1:]), "first_batch_s": first_batch_s,
            "pipeline_examples_per_s": batches * batch / seconds}


def step_rate(input_shape: list[int], batch: int, repeats: int) -> float:
    """Examples/s the cnn train step consumes at ``input_shape`` and ``batch``."""
    if input_shape[0] != input_shape[1]:
        raise ValueError(f"square images expected; got {input_shape}")
    step = compiled_step("cnn", batch=batch, dtype="float32", image_size=input_shape[0])
    return batch / time_calls(step["run"], repeats=repeats, warmup=1)["median"]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=sorted(DATASET_OPTIONS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=None, help="batches timed")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    names = args.dataset or list(DATASET_OPTIONS)
    batches = args.batches or (5 if args.quick else 50)
    repeats = args.repeats or (2 if args.quick else 5)
    results, targets = [], []
    for name in names:
        try:
            result = {"dataset": name, "batch": args.batch,
                      **pipeline_rate(name, DATASET_OPTIONS[name], args.batch, batches,
                                      args.data_dir)}
            result["step_examples_per_s"] = step_rate(result["input_shape"], args.batch,
                                                      repeats)
            result["pipeline_over_step"] = (result["pipeline_examples_per_s"]
                                            / result["step_examples_per_s"])
            targets.append(target(f"{name} pipeline / cnn train step examples/s",
                                  result["pipeline_over_step"], 1.0, higher_is_better=True,
                                  unit="x"))
        except Exception as exc:  # recorded, never fatal
            result = {"dataset": name, "batch": args.batch, **error_entry(exc)}
        results.append(result)
        print(result, file=sys.stderr)
    emit({"benchmark": "input_pipeline", "batches_timed": batches, "results": results,
          "targets": targets}, args.out)


if __name__ == "__main__":
    main()
