"""What the experiments share to decide a claim over seeds: every seed of a model trained
at once (the training loop's own steps, vmapped over seeds, one compiled program), and the
paired comparison that decides whether one model beats another.

* ``SeedBatches(dataset_config, split, batch_size, seeds, steps)``: each seed's own
  shuffled pass of the dataset's pipeline, stacked ``[seeds, batch, ...]`` per step.
* ``SeedTrainer(model, task, tx, seeds)`` (or ``.from_config(config, num_classes,
  task_name, seeds)``): ``fit(batches)`` trains every
  seed from its own initialisation (``gapjax.train.steps.train_step``,
  ``create_train_state``); ``accuracy(state, eval_batches)`` per seed;
  ``step_seconds(...)``. A seed fixes the data order and the initialisation, so the runs
  of two models with one seed are a pair.
* ``paired_comparison(first, second)``: the mean paired difference, its two-sided
  t-interval (95% by default), the p-value and the outcome ``helps`` / ``hurts`` /
  ``tied``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from gapjax import models, tasks
from gapjax.data import dataset_info, make_iterator
from gapjax.evaluators import eval_step, zero_eval_sums
from gapjax.experiments import common
from gapjax.train.optim import make_optimizer
from gapjax.train.state import create_train_state
from gapjax.train.steps import train_step

CONFIDENCE = 0.95
#: Keep the training batches in memory (shared by every model of a study) below this size.
CACHE_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def paired_comparison(first: Sequence[float], second: Sequence[float],
                      confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``first - second`` paired by seed: the mean difference, its two-sided t-interval
    at ``confidence``, the t-test's p-value and the outcome: ``"helps"`` (interval above
    zero), ``"hurts"`` (below) or ``"tied"``. Differences without spread are decided by
    their sign (an interval of one point)."""
    differences = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    if differences.size < 2:
        raise ValueError("paired_comparison needs at least two seeds")
    mean = float(differences.mean())
    spread = float(differences.std(ddof=1))
    if spread == 0.0:
        low = high = mean
        p_value = 1.0 if mean == 0.0 else 0.0
    else:
        error = spread / math.sqrt(differences.size)
        half = float(stats.t.ppf(0.5 + confidence / 2, differences.size - 1)) * error
        low, high = mean - half, mean + half
        p_value = float(2 * stats.t.sf(abs(mean) / error, differences.size - 1))
    outcome = "helps" if low > 0 else "hurts" if high < 0 else "tied"
    return {"mean_difference": mean, "low": low, "high": high, "p_value": p_value,
            "outcome": outcome, "differences": differences.tolist()}


# --------------------------------------------------------------------------------------
# Training: the loop's own steps, vmapped over seeds
# --------------------------------------------------------------------------------------


class SeedBatches:
    """The training batches of every seed, stacked ``[seeds, batch, ...]`` per step: each
    seed's own shuffled pass of the dataset's pipeline, identical for every member. Kept
    in memory when they fit ``CACHE_BYTES``, else read again for each member."""

    def __init__(self, dataset_config: Any, split: str, batch_size: int, seeds: int,
                 steps: int):
        self.dataset_config, self.split = dataset_config, split
        self.batch_size, self.seeds, self.steps = batch_size, seeds, steps
        self._cache: list[dict[str, np.ndarray]] | None = None
        first = self._stream()
        sample = next(first)
        size = sum(value.nbytes for value in sample.values()) * steps
        if size <= CACHE_BYTES:
            self._cache = [sample] + [next(first) for _ in range(steps - 1)]
        self.sample = sample

    def _stream(self):
        iterators = [make_iterator(self.dataset_config, self.split, batch_size=self.batch_size,
                                   seed=seed, train=True, process_index=0, process_count=1)
                     for seed in range(self.seeds)]
        while True:
            batches = [next(iterator) for iterator in iterators]
            yield {key: np.stack([np.asarray(batch[key]) for batch in batches])
                   for key in batches[0]}

    def __iter__(self):
        if self._cache is not None:
            return iter(self._cache)
        stream = self._stream()
        return (next(stream) for _ in range(self.steps))


#: XLA options for programs that run once or twice (initialisation, evaluation): compiled
#: about 5x faster; the training step keeps the default optimisation, as it runs hundreds
#: of times.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


class SeedTrainer:
    """One model's train / eval steps, vmapped over seeds and compiled once."""

    def __init__(self, model: Any, task: Any, tx: Any, seeds: int):
        """``model`` (Flax), ``task`` (``gapjax.tasks``), ``tx`` (optax) for ``seeds``
        seeds; ``from_config`` builds the three from a training config."""
        self.model, self.task, self.tx, self.seeds = model, task, tx, seeds
        self._init = jax.jit(jax.vmap(
            lambda seed, inputs: create_train_state(model, tx, inputs, seed),
            in_axes=(0, None)))
        self._train = jax.jit(jax.vmap(functools.partial(
            train_step, model=model, tx=tx, task=task)))
        self._eval = jax.jit(jax.vmap(functools.partial(eval_step, model=model, task=task),
                                      in_axes=(0, None, 0)))
        self._compiled: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, num_classes: int, task_name: str,
                    seeds: int) -> SeedTrainer:
        """The model, task and optimizer ``config`` describes (as ``train.py`` builds
        them)."""
        return cls(models.from_config(config, num_classes),
                   tasks.get(task_name, num_classes=num_classes),
                   make_optimizer(config.optimizer, config.total_steps), seeds)

    def _program(self, name: str, *args: Any) -> Any:
        """The compiled ``name`` program for ``args``' shapes (compiled on first use; a
        batch of other shapes, e.g. another graph task's budgets, compiles again)."""
        key = (name, *(tuple((field, np.shape(value)) for field, value in arg.items())
                       for arg in args if isinstance(arg, dict) and "weight" in arg))
        if key not in self._compiled:
            lowered = getattr(self, f"_{name}").lower(*args)
            self._compiled[key] = (lowered.compile() if name == "train"
                                   else lowered.compile(FAST_COMPILE))
        return self._compiled[key]

    def fit(self, batches: Iterable[dict[str, np.ndarray]]) -> Any:
        """Trains every seed from its initialisation (seed ``i`` for row ``i``) on the
        stacked batches ``[seeds, batch, ...]`` (a ``SeedBatches`` or a list); returns the
        stacked train state."""
        state = None
        for batch in batches:
            if state is None:
                sample = {key: value[0] for key, value in batch.items()}
                seeds, inputs = jnp.arange(self.seeds), self.task.init_inputs(sample)
                state = self._program("init", seeds, inputs)(seeds, inputs)
            state = self._program("train", state, batch)(state, batch)
        return state

    def step_seconds(self, state: Any, batch: dict[str, np.ndarray], steps: int,
                     repeats: int = 3) -> float:
        """Seconds per training step of all seeds (the fastest of ``repeats`` timed runs
        of ``steps`` steps on one batch; compilation is done by then)."""
        step = self._program("train", state, batch)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            timed = state
            for _ in range(steps):
                timed = step(timed, batch)
            jax.block_until_ready(timed.params)
            best = min(best, (time.perf_counter() - start) / steps)
        return best

    def accuracy(self, state: Any, eval_batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Test accuracy (%) of each seed over the evaluation batches."""
        return self.evaluate(state, eval_batches)["accuracy"]

    def evaluate(self, state: Any, eval_batches: list[dict[str, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
        """Every metric of the task per seed over the evaluation batches, each ``[seeds]``:
        the weighted means of ``task.metric_names`` (``accuracy`` in %) and, for a task
        that keeps its outputs (multilabel: ``map``, ``ap_<k>``), ``task.summarize`` of
        each seed's logits over the real rows."""
        variables = state.variables()
        sums = jax.tree.map(lambda zero: jnp.zeros((self.seeds,), zero.dtype),
                            zero_eval_sums(self.task))
        logits, labels = [], []
        for batch in eval_batches:
            sums, batch_logits = self._program("eval", variables, batch, sums)(
                variables, batch, sums)
            if self.task.keeps_outputs:
                real = np.asarray(batch["weight"]) > 0
                logits.append(np.asarray(batch_logits)[:, real])
                labels.append(np.asarray(batch["label"])[real])
        weight = np.asarray(sums.pop("weight"))
        metrics = {key: np.asarray(value) / weight for key, value in sums.items()}
        if "accuracy" in metrics:
            metrics["accuracy"] = 100.0 * metrics["accuracy"]
        if logits:
            per_seed = [self.task.summarize(seed_logits, np.concatenate(labels))
                        for seed_logits in np.concatenate(logits, axis=1)]
            metrics.update({key: np.array([summary[key] for summary in per_seed])
                            for key in per_seed[0]})
        return metrics


# --------------------------------------------------------------------------------------
# A model trained on every seed, shared by the sections that need it
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SeedRun:
    """A config trained on seeds ``0..seeds-1`` by ``train_seeds``: the trainer (model,
    task, compiled steps), the stacked train state, the dataset's info, the training split
    and the seconds it took (wall, CPU)."""

    config: Any
    trainer: SeedTrainer
    state: Any
    info: Any
    split: str
    seconds: float
    cpu_seconds: float

    def variables(self, seed: int) -> dict[str, Any]:
        """The variables of seed ``seed`` (index ``seed`` of every stacked leaf)."""
        return jax.tree.map(lambda leaf: leaf[seed], self.state.variables())


_SEED_RUNS: dict[tuple[str, int, str], SeedRun] = {}


def train_seeds(config: Any, seeds: int, split: str | None = None) -> SeedRun:
    """``config`` trained from seeds ``0..seeds-1`` at once (``SeedTrainer``) on ``split``
    (default the dataset's training split; a TFDS slice such as ``"train[:2000]"`` trains
    on a fixed subset), memoised within the process, so two report sections that need the
    same model (the GAP cnn on the Fashion-MNIST canvases: real_heads and
    real_localization) train it once."""
    info = dataset_info(config.dataset)
    split = split or info.train_split
    key = (common.config_key(config), seeds, split)
    if key not in _SEED_RUNS:
        model = config.model
        what = (f"{model.name} (head {model.get('head', '-')}, pool {model.get('pool', '-')}) on "
                f"{config.dataset.name} {split}: {seeds} seeds x {config.total_steps} steps of "
                f"{config.batch_size}")
        print(f"[seeds] training {what} ...", file=sys.stderr, flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        batches = SeedBatches(config.dataset, split, config.batch_size, seeds,
                              config.total_steps)
        trainer = SeedTrainer.from_config(config, info.num_classes, info.task, seeds)
        state = trainer.fit(batches)
        _SEED_RUNS[key] = SeedRun(config, trainer, state, info, split,
                                  time.perf_counter() - wall, time.process_time() - cpu)
        print(f"[seeds] trained {what} in {_SEED_RUNS[key].seconds:.0f} s",
              file=sys.stderr, flush=True)
    return _SEED_RUNS[key]


def evaluation_batches(dataset_config: Any, split: str, batch_size: int = 256,
                       max_examples: int | None = None) -> list[dict[str, np.ndarray]]:
    """One ordered pass of ``split`` (``make_iterator(train=False)``: no augmentation, the
    last batch padded with ``weight == 0`` rows), cut after ``max_examples`` real rows (the
    rest of that batch is marked as padding, so every batch keeps one shape)."""
    batches, seen = [], 0
    for batch in make_iterator(dataset_config, split, batch_size=batch_size, seed=0,
                               train=False, process_index=0, process_count=1):
        if max_examples is not None:
            weight = np.asarray(batch["weight"]).copy()
            keep = np.cumsum(weight > 0) + seen <= max_examples
            batch = {**batch, "weight": np.where(keep, weight, 0.0).astype(weight.dtype)}
        batches.append(batch)
        seen += int((np.asarray(batch["weight"]) > 0).sum())
        if max_examples is not None and seen >= max_examples:
            break
    return batches


def spread(values: Sequence[float]) -> dict[str, Any]:
    """``{"runs", "mean", "std"}`` of per-seed values (sample standard deviation)."""
    runs = [float(value) for value in values]
    return {"runs": runs, "mean": float(np.mean(runs)),
            "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0}


def mean_sd_text(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± sd"`` of per-seed values."""
    summary = spread(values)
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def interval_text(comparison: dict[str, Any], digits: int = 2) -> str:
    """A ``paired_comparison`` as ``"+d [low, high] outcome"``."""
    return (f"{comparison['mean_difference']:+.{digits}f} [{comparison['low']:+.{digits}f}, "
            f"{comparison['high']:+.{digits}f}] {comparison['outcome']}")
