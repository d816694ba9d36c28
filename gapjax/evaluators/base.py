"""The evaluator interface, the ``EVALUATORS`` registry and ``config.evals``.

``config.evals`` maps a name to ``dict(type=<EVALUATORS name>, every=<steps>,
split=<split>, final_split=<split>, <the evaluator's options>)``. ``specs(config)`` folds
in the keys that ask for evaluations (``eval_every``, ``config.eval.*``,
``gradflow_every``), so every config evaluates as it always did, and ``build(config)``
makes the evaluators. The loop names none of them: it calls ``setup(run)`` once, then at
every step ``due(step)`` and, when due, ``evaluator(state, step, batch)`` -> metrics. A
fork adds one with ``@EVALUATORS.register("mine")`` on an ``Evaluator`` subclass (a
dataclass; its fields are its options) in a module named in ``config.imports``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import jax

from gapjax import data
from gapjax.registry import Registry, build_with_options
from gapjax.tasks import Task


@dataclasses.dataclass
class Run:
    """What an evaluator may use of the run it evaluates (made by the training loop).

    Attributes:
      config: the run's config. model, task, info: its model, ``gapjax.tasks`` task and
        ``gapjax.data.DatasetInfo``.
      parallel: ``gapjax.train.parallel.DataParallel`` (placements, compiled functions).
      batch_size: rows per process. writer: the metric writer (``write_image``).
    """

    config: Any
    model: Any
    task: Task
    info: data.DatasetInfo
    parallel: Any
    batch_size: int
    writer: Any

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        """One ordered pass over ``split``: this process's rows, the last batch padded
        (padding rows have ``weight == 0``)."""
        return data.make_iterator(self.config.dataset, split, batch_size=self.batch_size,
                                  seed=int(self.config.seed), train=False,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())


@dataclasses.dataclass
class Evaluator(abc.ABC):
    """An evaluation the loop runs every ``every`` steps (and after the last step).

    Attributes:
      every: steps between two evaluations (``config.eval_every`` unless set).
      split: the split read (None: the dataset's eval split).
      final_split: a split evaluated once more after the last step, as ``test/<metric>``.
      prefix: (class) what the metric names of ``split`` start with.
      at_end: (class) also due after the last step.
    """

    every: int = 0
    split: str | None = None
    final_split: str | None = None

    prefix: ClassVar[str] = "eval/"
    at_end: ClassVar[bool] = True

    def setup(self, run: Run) -> None:
        """Called once before the first step: keep ``run``, build what is reused."""
        self.run = run

    def due(self, step: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == self.run.config.total_steps)

    def __call__(self, state: Any, step: int, batch: Any = None) -> dict[str, float]:
        """The metrics at ``step`` of the canonical train ``state``; ``batch`` is the step's
        training batch (process-local NumPy; None under ``--eval_only``)."""
        split = self.split or self.run.info.eval_split
        metrics = {self.prefix + key: value
                   for key, value in self.evaluate(state, split, batch).items()}
        if self.final_split and step == self.run.config.total_steps:
            metrics.update({f"test/{key}": value for key, value in
                            self.evaluate(state, self.final_split, batch, final=True).items()})
        return metrics

    @abc.abstractmethod
    def evaluate(self, state: Any, split: str, batch: Any = None, final: bool = False
                 ) -> dict[str, float]:
        """Metrics (without prefix) of ``state`` on ``split``; ``final``: the final split."""


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")


def specs(config: Any) -> dict[str, dict[str, Any]]:
    """``config.evals`` with the evaluations today's keys ask for: name -> options.

    ``classification`` (``eval/*``, and ``test/*`` on ``config.eval.final_split``);
    ``localization`` when ``config.eval.localization`` (``cam_method``,
    ``wsol_protocol``, ``overlay_images``, ``final_split``); ``gradflow``
    (``train/grad_*``) every ``gradflow_every`` steps when that is > 0. An entry of
    ``config.evals`` with the same name updates these; ``every`` defaults to
    ``config.eval_every``; ``every=0`` turns an entry off.
    """
    legacy = config.get("eval") or {}
    final_split = legacy.get("final_split")
    entries = {"classification": {"type": "classification", "final_split": final_split}}
    if legacy.get("localization"):
        entries["localization"] = {
            "type": "localization", "method": legacy.get("cam_method", "auto"),
            "protocol": legacy.get("wsol_protocol", "gapjax"),
            "overlay_images": int(legacy.get("overlay_images") or 0), "final_split": final_split}
    if config.get("gradflow_every"):
        entries["gradflow"] = {"type": "gradflow", "every": int(config.gradflow_every)}
    for name, options in (config.get("evals") or {}).items():
        entries[name] = {**entries.get(name, {}), **dict(options)}
    entries = {name: {"every": int(config.eval_every), **options}
               for name, options in entries.items()}
    return {name: options for name, options in entries.items() if int(options["every"]) > 0}


def build(config: Any) -> dict[str, Evaluator]:
    """The evaluators of ``specs(config)``; an unknown type or option is one line naming
    the entry and the valid choices."""
    evaluators = {}
    for name, options in specs(config).items():
        options = dict(options)
        kind = options.pop("type", None)
        if kind is None:
            raise ValueError(f"config.evals.{name} has no type; choose one of: "
                             f"{', '.join(EVALUATORS.names())}")
        evaluators[name] = build_with_options(EVALUATORS.get(kind),
                                              f"config.evals.{name} (evaluator {kind!r})",
                                              options)
    return evaluators
