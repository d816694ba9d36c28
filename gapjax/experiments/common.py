"""Helpers shared by the experiment modules: quick configs, cached training runs, batched
prediction with the feature switch, markdown tables, figures, and section results.

A *section* is what an experiment hands to the report: a plain dict

    {"title": str, "claim": str, "method": str, "markdown": str (tables, text),
     "numbers": dict (JSON-safe measurements), "holds": True | False | None,
     "verdict": str, "figures": [file names inside out_dir]}

built with ``section(...)``. ``holds`` is None when the claim could not be decided.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gapjax import tasks
from gapjax.data import dataset_info, make_iterator
from gapjax.train import run
from gapjax.train.defaults import base_config

# --------------------------------------------------------------------------------------
# Configs and training runs
# --------------------------------------------------------------------------------------


def quick_config(dataset: str, model: str, *, steps: int, batch_size: int = 64,
                 learning_rate: float = 2e-3, optimizer: str = "adamw", weight_decay: float = 1e-4,
                 seed: int = 0, augment: bool = False,
                 dataset_options: dict[str, Any] | None = None,
                 **model_kwargs: Any) -> ml_collections.ConfigDict:
    """A training config for a short run: the shared base config with these overrides.

    AdamW with a cosine schedule and a short warm-up converges in a few hundred steps on
    the embedded datasets, which is what the quick report can afford. Evaluation and
    checkpointing happen once, at the end. ``model_kwargs`` become ``config.model`` keys
    (``head``, ``pool``, ``attn``, ...); ``dataset_options`` become ``config.dataset`` keys.
    """
    if steps < 1:
        raise ValueError(f"quick_config: steps must be >= 1; got {steps}")
    config = base_config()
    config.seed = seed
    config.batch_size = batch_size
    config.total_steps = steps
    config.eval_every = steps
    config.checkpoint_every = steps
    config.log_every = max(1, steps // 4)
    config.keep_checkpoints = 1
    config.progress = "none"
    config.dataset.name = dataset
    config.dataset.augment = augment
    for key, value in (dataset_options or {}).items():
        config.dataset[key] = value
    config.model.name = model
    for key, value in model_kwargs.items():
        config.model[key] = value
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = learning_rate
    config.optimizer.weight_decay = weight_decay
    config.optimizer.warmup_steps = max(1, steps // 20)
    return config


_RUNS: dict[str, Any] = {}


def config_key(config: ml_collections.ConfigDict) -> str:
    """A stable identity for a config (its JSON with sorted keys)."""
    return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)


def train(config: ml_collections.ConfigDict, workdir: Path | str) -> Any:
    """``gapjax.train.run(config, workdir)``, memoised per config within this process.

    Two report sections that need the same model (the GAP cnn on cluttered digits is used
    by the heads and the weighted-pooling sections) train it once.
    """
    key = config_key(config)
    if key not in _RUNS:
        _RUNS[key] = run(config, str(workdir))
    return _RUNS[key]


def clear_run_cache() -> None:
    """Forgets the memoised training runs."""
    _RUNS.clear()


def run_name(config: ml_collections.ConfigDict) -> str:
    """A readable directory name for a run, e.g.
    ``gapjax_digits-16-cnn-head=fc-pool=gap-s0``."""
    parts = [config.dataset.name]
    # Dataset variants (image or canvas size, ...) get their own directories, so a
    # checkpoint is never resumed by a run that reads differently shaped data.
    parts += [f"{value}" for key, value in sorted(config.dataset.items())
              if key not in ("name", "data_dir", "augment")]
    parts.append(config.model.name)
    for key, value in sorted(config.model.items()):
        if key in ("name", "widths"):
            continue
        if hasattr(value, "items"):  # pool_kwargs: one part per option, none when empty
            parts += [f"{key}.{option}={setting}" for option, setting in sorted(value.items())]
        else:
            parts.append(f"{key}={value}")
    parts.append(f"s{config.seed}")
    return "-".join(str(part).replace("/", "_").replace(" ", "") for part in parts)


# --------------------------------------------------------------------------------------
# Prediction over a split
# --------------------------------------------------------------------------------------


def predict(model: Any, variables: dict[str, Any], dataset_config: ml_collections.ConfigDict,
            split: str, *, batch_size: int = 256, with_features: bool = False,
            max_examples: int | None = None) -> dict[str, np.ndarray]:
    """Runs ``model`` over one ordered pass of ``split``; padding rows are dropped.

    Returns NumPy arrays: ``logits [N, K]``, ``label [N]`` (or ``[N, K]``), and with
    ``with_features`` the pre-pool feature maps ``features [N, h, w, C]`` taken from the
    same forward pass (the model contract: ``forward_features`` then ``forward_head``).
    """
    info = dataset_info(dataset_config)
    task = tasks.get(info.task, num_classes=info.num_classes)

    @jax.jit
    def forward(batch):
        inputs = task.model_inputs(batch)
        if not with_features:
            return model.apply(variables, inputs, train=False), None
        features = model.apply(variables, inputs, train=False, method="forward_features")
        return model.apply(variables, features, train=False, method="forward_head"), features

    iterator = make_iterator(dataset_config, split, batch_size=batch_size, seed=0, train=False,
                             process_index=0, process_count=1)
    logits, labels, features, seen = [], [], [], 0
    for batch in iterator:
        real = np.asarray(batch["weight"]) > 0
        batch_logits, batch_features = forward(batch)
        logits.append(np.asarray(batch_logits, np.float32)[real])
        labels.append(np.asarray(batch["label"])[real])
        if with_features:
            features.append(np.asarray(batch_features, np.float32)[real])
        seen += int(real.sum())
        if max_examples is not None and seen >= max_examples:
            break
    out = {"logits": np.concatenate(logits), "label": np.concatenate(labels)}
    if with_features:
        out["features"] = np.concatenate(features)
    if max_examples is not None:
        out = {key: value[:max_examples] for key, value in out.items()}
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits [N, K]`` against integer ``labels [N]``."""
    if len(labels) == 0:
        return float("nan")
    return float((np.argmax(logits, axis=-1) == labels).mean())


def train_test_accuracy(result: Any, config: ml_collections.ConfigDict,
                        *, max_train_examples: int | None = 2000) -> dict[str, float]:
    """Accuracy of a finished run on the train split (without augmentation) and the test
    split, and the train-test gap, in percentage points."""
    info = dataset_info(config.dataset)
    train_pred = predict(result.model, result.variables, config.dataset, info.train_split,
                         max_examples=max_train_examples)
    test_pred = predict(result.model, result.variables, config.dataset, info.eval_split)
    train_acc = 100.0 * accuracy(train_pred["logits"], train_pred["label"])
    test_acc = 100.0 * accuracy(test_pred["logits"], test_pred["label"])
    return {"train_accuracy": train_acc, "test_accuracy": test_acc,
            "generalization_gap": train_acc - test_acc, "test_examples": len(test_pred["label"])}


def accuracy_standard_error(accuracy_percent: float, examples: int) -> float:
    """Binomial standard error, in points, of an accuracy measured on ``examples`` items."""
    p = min(max(accuracy_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / max(examples, 1))


def parameter_count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def abstract_variables(model: Any, input_shape: Sequence[int]) -> Any:
    """The variable shapes of ``model`` on one input of ``input_shape`` (no compute)."""
    sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)


class Stopwatch:
    """Wall-clock and CPU seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cpu_elapsed(self) -> float:
        """CPU seconds of this process (all its threads) since creation: on a shared
        machine the wall time stretches with the load, the CPU time much less."""
        return time.process_time() - self.cpu_start

    def timing_text(self, timing: dict[str, float] | None = None) -> str:
        """``"(W s wall, C s CPU, load L)"`` of ``timing`` (default: now)."""
        timing = timing or self.timing()
        return (f"({timing['seconds']:.0f} s wall, {timing['cpu_seconds']:.0f} s CPU, load "
                f"{timing['load_average']:.1f})")

    def timing(self) -> dict[str, float]:
        """``{"seconds", "cpu_seconds", "load_average"}`` now (1-minute load average)."""
        return {"seconds": self.elapsed(), "cpu_seconds": self.cpu_elapsed(),
                "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0}


# --------------------------------------------------------------------------------------
# Markdown and sections
# --------------------------------------------------------------------------------------


def format_value(value: Any, digits: int = 4) -> str:
    """Numbers to short strings (``nan`` and None become ``-``); other values via ``str``."""
    if value is None:
        return "-"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   digits: int = 4) -> str:
    """A GitHub markdown table; numbers formatted with ``format_value``."""
    headers = list(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"markdown_table: row {row!r} has {len(row)} cells; "
                             f"expected {len(headers)} to match headers {headers}")
        cells = [format_value(cell, digits).replace("|", "\\|") for cell in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_table(records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                  digits: int = 4) -> str:
    """A markdown table of dict rows; columns default to the keys of the first row."""
    if not records:
        return "(no rows)"
    columns = list(columns or records[0].keys())
    return markdown_table(columns, ([record.get(column) for column in columns]
                                    for record in records), digits)


def section(title: str, *, claim: str, method: str, markdown: str, numbers: dict[str, Any],
            holds: bool | None, verdict: str, figures: Sequence[str] = ()) -> dict[str, Any]:
    """A report section (see the module docstring)."""
    return {"title": title, "claim": claim, "method": method, "markdown": markdown,
            "numbers": numbers, "holds": holds, "verdict": verdict, "figures": list(figures)}


def to_jsonable(value: Any) -> Any:
    """Converts NumPy / JAX scalars and arrays, tuples and paths into JSON types; NaN and
    infinities become None (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray | jax.Array):
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")


def new_figure(ncols: int = 1, *, width: float = 5.0, height: float = 3.6):
    """A matplotlib figure with ``ncols`` axes in the report's style (Agg backend, no GUI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, out_dir: Path | str, name: str) -> str:
    """Saves ``fig`` as ``out_dir/name`` (PNG, 120 dpi), closes it, returns ``name``."""
    import matplotlib.pyplot as plt

    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return name


def bar_chart(ax: Any, labels: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str) -> None:
    """Grouped bars: one group per label, one bar per series, values written on top."""
    count = max(len(series), 1)
    width = 0.8 / count
    positions = np.arange(len(labels))
    for index, (name, values) in enumerate(series.items()):
        offsets = positions + (index - (count - 1) / 2) * width
        bars = ax.bar(offsets, values, width, label=name, color=PALETTE[index % len(PALETTE)])
        ax.bar_label(bars, [f"{v:.3g}" if math.isfinite(v) else "" for v in values], fontsize=8)
    ax.set_xticks(positions, labels)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(frameon=False)


# --------------------------------------------------------------------------------------
# The standard short runs shared by several sections
# --------------------------------------------------------------------------------------

DIGITS = "gapjax_digits"
CLUTTERED = "gapjax_cluttered_digits"

#: The standard cnn runs, per (dataset, quick): steps, batch, dataset options, cnn options.
#: Quick runs are sized so that the whole report fits in about 20 minutes on 2 CPU cores:
#: cluttered digits then use 32x32 canvases and a half-width cnn (16, 32, 64 channels).
#: Digits are read at 16x16, so the cnn's final map is 4x4 and an FC head 16x a GAP head.
STANDARD_RUNS: dict[tuple[str, bool], dict[str, Any]] = {
    (DIGITS, True): {"steps": 300, "batch_size": 64, "dataset": {"image_size": 16},
                     "model": {}},
    (DIGITS, False): {"steps": 3000, "batch_size": 64, "dataset": {"image_size": 16},
                      "model": {}},
    (CLUTTERED, True): {"steps": 300, "batch_size": 32, "dataset": {"canvas_size": 32},
                        "model": {"widths": (16, 32, 64)}},
    (CLUTTERED, False): {"steps": 4000, "batch_size": 64, "dataset": {"canvas_size": 64},
                         "model": {}},
}


def standard_config(dataset: str, quick: bool, *, model: str = "cnn", seed: int = 0,
                    data_dir: Path | str | None = None,
                    **model_kwargs: Any) -> ml_collections.ConfigDict:
    """The config every section uses for "a ``model`` trained on ``dataset``", so that two
    sections asking for the same model share one memoised run (see ``train``).
    ``model_kwargs`` override the standard cnn options (the widths apply to ``cnn`` only).
    ``data_dir``: where the embedded datasets are built (the report uses its own, so a
    stale shared copy never leaks in); None = the TFDS default."""
    if (dataset, quick) not in STANDARD_RUNS:
        choices = sorted({name for name, _ in STANDARD_RUNS})
        raise ValueError(f"standard_config: dataset {dataset!r} has no standard run; "
                         f"choose one of {choices}")
    standard = STANDARD_RUNS[(dataset, quick)]
    options = dict(standard["model"]) if model == "cnn" else {}
    options.update(model_kwargs)
    dataset_options = dict(standard["dataset"])
    if data_dir is not None:
        dataset_options["data_dir"] = str(data_dir)
    return quick_config(dataset, model, steps=standard["steps"],
                        batch_size=standard["batch_size"], seed=seed,
                        dataset_options=dataset_options, **options)


def forward_flops(model: Any, input_shape: Sequence[int], batch: int = 1) -> float:
    """FLOPs of one inference forward pass on ``batch`` inputs, from XLA's cost analysis of
    the lowered function (every floating-point operation: 2 per multiply-add, plus the
    elementwise work of normalisation, activations and pooling). Nothing is executed."""
    variables = abstract_variables(model, input_shape)
    sample = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, sample)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float((cost or {}).get("flops", float("nan")))


def experiment_cli(run: Callable[..., dict[str, Any]], doc: str,
                   full_help: str = "longer training runs") -> dict[str, Any]:
    """The command line of an experiment module: ``--out DIR [--full]``.

    Runs ``run(out, quick=not full)`` and prints the section's table and verdict.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full", action="store_true", help=full_help)
    args = parser.parse_args()
    result = run(args.out, quick=not args.full)
    print(result["markdown"])
    print(result["verdict"])
    return result


# --------------------------------------------------------------------------------------
# Real data (the real_* sections)
# --------------------------------------------------------------------------------------


def real_dataset_options(data_dir: Path | str, source_dir: Path | str | None = None,
                         **options: Any) -> dict[str, Any]:
    """``config.dataset`` keys of a real dataset: where prepared data goes (``data_dir``),
    where Fashion-MNIST's IDX files are (``source_dir``; None: the Debian location) and
    the dataset's own keys."""
    return {"data_dir": str(data_dir), **({"source_dir": str(source_dir)} if source_dir
                                           else {}), **options}


def section_settings(section: str, table: dict[bool, dict[str, Any]], quick: bool,
                     overrides: dict[str, Any]) -> dict[str, Any]:
    """``table[quick]`` with ``overrides`` (one line naming an unknown key and the valid
    ones); tests pass tiny settings this way."""
    unknown = sorted(set(overrides) - set(table[True]))
    if unknown:
        raise ValueError(f"{section}: unknown settings {unknown}; valid: "
                         f"{', '.join(table[True])}")
    return {**table[bool(quick)], **overrides}


def published_table(rows: Sequence[Sequence[Any]]) -> str:
    """The published figures a section stands beside: rows ``(source, setting, quantity,
    value)``."""
    return markdown_table(["published source", "setting", "quantity", "value"], rows)


def method_text(doc: str, end: str = "``python") -> str:
    """A section module's docstring from ``Method:`` up to ``end`` (default its
    ``python -m`` line: the method and the decision rule), on one line."""
    return " ".join(doc.split("Method: ", 1)[1].split(end, 1)[0].split())


def write_section(out_dir: Path, name: str, title: str, *, claim: str, doc: str,
                  markdown: str, numbers: dict[str, Any], holds: bool | None, verdict: str,
                  figures: Sequence[str] = (), write_json: bool = True,
                  method_end: str = "``python") -> dict[str, Any]:
    """Writes ``<name>.md`` (title, markdown, verdict, figures) and ``<name>.json`` (the
    numbers; ``write_json=False``: already written); returns the report section, its
    method from ``doc`` (``method_text(doc, method_end)``)."""
    links = "".join(f"\n\n![{name}]({figure})" for figure in figures)
    (out_dir / f"{name}.md").write_text(f"# {title}\n\n{markdown}\n\n{verdict}{links}\n")
    if write_json:
        (out_dir / f"{name}.json").write_text(json.dumps(numbers, indent=1))
    return section(title, claim=claim, method=method_text(doc, method_end), markdown=markdown,
                   numbers=numbers, holds=holds, verdict=verdict, figures=figures)
