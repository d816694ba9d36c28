"""The evaluator interface, the ``EVALUATORS`` registry and ``config.evals``.

``config.evals`` maps a name to ``dict(type=<EVALUATORS name>, every=<steps>,
split=<split>, final_split=<split>, <the evaluator's options>)``; ``specs(config)`` adds
the entries today's keys ask for, ``build(config)`` makes the evaluators. The loop names
none of them: it calls ``setup(run)`` once, then at every step ``due(step)`` and, when
due, ``evaluator(state, step, batch) -> {metric: float}``. A fork registers its own with
``@EVALUATORS.register("mine")`` on an ``Evaluator`` subclass (a dataclass: its fields
are its options) in a module named in ``config.imports``.
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
    """What an evaluator may use of the run: its config, model, task, dataset info, the
    ``gapjax.train.parallel.DataParallel`` placement, rows per process and metric writer."""

    config: Any
    model: Any
    task: Task
    info: data.DatasetInfo
    parallel: Any
    batch_size: int
    writer: Any

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        """One ordered pass over ``split``: this process's rows, padding rows weighing 0."""
        return data.make_iterator(self.config.dataset, split, batch_size=self.batch_size,
                                  seed=int(self.config.seed), train=False,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())


@dataclasses.dataclass
class Evaluator(abc.ABC):
    """Runs every ``every`` steps and, when ``at_end``, after the last one; reads ``split``
    (None: the eval split) and after the last step ``final_split`` too, as ``test/*``.
    Metric names start with ``prefix``."""

    every: int = 0
    split: str | None = None
    final_split: str | None = None

    prefix: ClassVar[str] = "eval/"
    at_end: ClassVar[bool] = True

    def setup(self, run: Run) -> None:
        """Called once before the first step: keeps ``run``, builds what is reused."""
        self.run = run

    def due(self, step: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == self.run.config.total_steps)

    def __call__(self, state: Any, step: int, batch: Any = None) -> dict[str, float]:
        """Metrics of the canonical train ``state`` at ``step``; ``batch``: the step's
        process-local training batch (None under ``--eval_only``)."""
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
        """Metrics (without prefix) of ``state`` on ``split`` (``final``: the final split)."""


EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")


def specs(config: Any) -> dict[str, dict[str, Any]]:
    """``config.evals`` with the defaults: ``classification`` (``eval/*``; ``test/*`` on
    ``eval.final_split``), ``localization`` when ``eval.localization`` (``cam_method``,
    ``wsol_protocol``, ``overlay_images``, ``final_split``) and ``gradflow`` every
    ``gradflow_every`` > 0 steps. An entry of ``config.evals`` updates the default of its
    name; ``every`` defaults to ``eval_every``, and 0 turns an entry off."""
    legacy = config.get("eval") or {}
    final = legacy.get("final_split")
    entries = {"classification": {"type": "classification", "final_split": final}}
    if legacy.get("localization"):
        entries["localization"] = {
            "type": "localization", "method": legacy.get("cam_method", "auto"),
            "protocol": legacy.get("wsol_protocol", "gapjax"),
            "overlay_images": int(legacy.get("overlay_images") or 0), "final_split": final}
    if config.get("gradflow_every"):
        entries["gradflow"] = {"type": "gradflow", "every": int(config.gradflow_every)}
    for name, options in (config.get("evals") or {}).items():
        entries[name] = {**entries.get(name, {}), **dict(options)}
    entries = {name: {"every": int(config.eval_every), **options}
               for name, options in entries.items()}
    return {name: options for name, options in entries.items() if int(options["every"]) > 0}


def build(config: Any) -> dict[str, Evaluator]:
    """The evaluators of ``specs(config)``; a missing or unknown type or an unknown option
    is one line naming the entry and the choices."""
    evaluators = {}
    for name, options in specs(config).items():
        kind = options.pop("type", None)
        if kind is None:
            raise ValueError(f"config.evals.{name} has no type; choose one of: "
                             f"{', '.join(EVALUATORS.names())}")
        evaluators[name] = build_with_options(EVALUATORS.get(kind),
                                              f"config.evals.{name} ({kind!r})", options)
    return evaluators
