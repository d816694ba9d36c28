"""The training loop: ``run(config, workdir) -> TrainResult``.

It reads top to bottom: the run's pieces (data, task, model, optimizer, evaluators), the
state (fresh, fine-tuned or restored), the compiled step, then the loop, which owns the
order of events at a step ``s``:

1. train on the next batch (asynchronous dispatch, no host sync);
2. every ``log_every`` steps: fetch the on-device running sums, check the loss is finite,
   write ``train/*``;
3. run every evaluator that is due (``config.evals``, ``gapjax.evaluators``): ``eval/*``,
   ``test/*`` after the last step, ``train/grad_*``;
4. when the Orbax policy asks (every ``checkpoint_every`` steps, a preemption sync point),
   at the end, or after SIGTERM: check the loss is finite, then save.

Because metrics for ``s`` are written before the checkpoint of ``s``, and the state holds
the running sums and the iterator position is saved with it, a run resumed from any
checkpoint writes exactly the records an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from gapjax import data, evaluators, models, tasks
from gapjax.pooling import POOLS
from gapjax.registry import import_modules, resolve_import
from gapjax.train.checkpoint import Checkpointer
from gapjax.train.defaults import DTYPES
from gapjax.train.init_from import initialize
from gapjax.train.metrics import MetricWriter, NullWriter, Progress, read_metrics
from gapjax.train.optim import make_optimizer, make_schedule
from gapjax.train.parallel import DataParallel
from gapjax.train.state import NO_BAD_STEP, TrainState, create_train_state, reset_sums
from gapjax.train.steps import train_step
from gapjax.train.workdir import CHECKPOINT_DIR, StopSignals, open_workdir

#: A run whose training will take longer than this says so after its first timed steps.
LONG_RUN_SECONDS = 600
TIMED_STEPS = 10


class TrainingError(RuntimeError):
    """A run that cannot go on for a reason the user can act on (one-line message)."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite; nothing after the last good step is saved."""


@dataclasses.dataclass
class TrainResult:
    """What ``run`` returns.

    Attributes:
      model: the Linen module that was trained.
      variables: its variables (``{"params": ..., "batch_stats": ...}``), replicated arrays.
      metrics: the latest value of every logged metric, plus ``step``.
      workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files are.
    """

    model: Any
    variables: dict[str, Any]
    metrics: dict[str, float]
    workdir: Path


def with_imports(config: Any) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``config.imports`` imported (a fork's pools, models,
    evaluators register themselves) and recorded resolved (``resolve_import``), so that
    every command reopening the run imports them from any working directory."""
    config = ml_collections.ConfigDict(config).copy_and_resolve_references()
    imports = tuple(config.get("imports") or ())
    import_modules(imports)
    with config.unlocked():
        config.imports = tuple(resolve_import(spec) for spec in imports)
    return config


def run(config: Any, workdir: str | Path, *, eval_only: bool = False, fresh: bool = False,
        fork_from: str | Path | None = None) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    The workdir is locked for the run and bound to its config (``workdir/config.json``):
    a rerun resumes from the newest intact checkpoint, and refuses a config that changes
    the run's meaning (one line naming each changed key) unless ``fresh`` (delete the
    run's files and start over there) or ``fork_from=OLD`` (branch: ``workdir`` is a new
    directory seeded with OLD's checkpoints). ``eval_only`` evaluates the run as trained
    (under its recorded config) and appends its record (nothing when ``config`` differs
    in meaning). ``config.progress="none"`` keeps it quiet, as programmatic callers
    (experiments) want. See ``gapjax.train.workdir``.
    """
    config = with_imports(config)
    sync = multihost_utils.sync_global_devices if jax.process_count() > 1 else None
    with open_workdir(workdir, json.loads(config.to_json_best_effort()), eval_only=eval_only,
                      fresh=fresh, fork_from=fork_from, chief=jax.process_index() == 0,
                      sync=sync) as bound:
        if bound.refused:  # --eval_only under another config: evaluate the recorded one
            config = with_imports(bound.recorded)
        return _train_and_evaluate(config, bound.workdir, eval_only=eval_only,
                                   append=bound.append_metrics)


def _check_choices(config: Any) -> None:
    """Fails fast, before any data or compilation, on names that are not registered."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r} is not supported; choose one of: "
                         f"{', '.join(DTYPES)}")
    models.MODELS.get(config.model.name)
    if config.model.get("pool") not in (None, "token"):  # token: a ViT's class token
        POOLS.get(config.model.pool)
    for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key}={config[key]!r} must be a positive integer")


def _train_and_evaluate(config: Any, workdir: Path, *, eval_only: bool, append: bool
                        ) -> TrainResult:
    # The pieces: names are checked before any data is read or code compiled.
    _check_choices(config)
    tx = make_optimizer(config.optimizer, int(config.total_steps))
    chosen_evaluators = evaluators.build(config)
    info = data.dataset_info(config.dataset)
    parallel = DataParallel(config.parallel)
    task = tasks.get(info.task, num_classes=info.num_classes,
                     label_smoothing=float(config.optimizer.get("label_smoothing", 0)))
    if not task.rows_split and (config.parallel == "pmap" or jax.process_count() > 1):
        raise ValueError(
            f"config.parallel={config.parallel!r} with {jax.process_count()} process(es): "
            f"{info.task} batches cannot be split per device or per process; use "
            "parallel='jit' in a single process")
    seed, total_steps = int(config.seed), int(config.total_steps)
    batch_size = parallel.local_batch_size(int(config.batch_size))
    model = models.from_config(config, info.num_classes, parallel.axis_name)
    chief = jax.process_index() == 0
    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR,
                                checkpoint_every=int(config.checkpoint_every),
                                keep=int(config.get("keep_checkpoints", 3)))
    try:
        # The state: restored from the newest checkpoint, else fine-tuned or fresh. Shapes
        # come from an evaluation batch, so no training data is consumed.
        iterator = None if eval_only else data.make_iterator(
            config.dataset, info.train_split, batch_size=batch_size, seed=seed, train=True,
            process_index=jax.process_index(), process_count=jax.process_count())
        first = next(iter(data.make_iterator(config.dataset, info.eval_split,
                                             batch_size=batch_size, seed=seed, train=False)))
        sample = task.init_inputs(first)
        state = parallel.init(lambda: create_train_state(model, tx, sample, seed))
        start_step = 0
        if checkpointer.latest_step() is not None:
            restored = checkpointer.restore(parallel.abstract_canonical(state), iterator)
            state, start_step = restored.state, restored.step
        elif eval_only:
            raise TrainingError(f"--eval_only: no checkpoint in {checkpointer.directory}; "
                                "train first with the same --workdir")
        elif config.get("init_from"):  # fine-tuning: only a fresh run reads the weights
            state = initialize(state, model, tx, config)

        writer = MetricWriter(workdir, resume_step=start_step) if chief else NullWriter()
        progress = Progress(config.progress if chief else "none", total_steps, start_step,
                            int(config.batch_size))
        run_view = evaluators.Run(config, model, task, info, parallel, batch_size,
                                  writer if append else NullWriter())
        for evaluator in chosen_evaluators.values():
            evaluator.setup(run_view)
        try:
            if eval_only:
                latest = _evaluate(chosen_evaluators.values(), state, start_step)
                if append:
                    writer.write(start_step, latest)
                progress.message(_summary(start_step, latest, 0.0, workdir))
                return TrainResult(model, state.variables(), {"step": start_step, **latest},
                                   workdir)
            if start_step:
                progress.message(f"resuming from step {start_step} ({checkpointer.directory})")
            step_fn = parallel.compile(functools.partial(
                train_step, model=model, tx=tx, task=task, seed=seed), donate_argnums=(0,))
            state, latest = _train(config, state, step_fn, iterator, start_step, parallel,
                                   list(chosen_evaluators.values()), checkpointer, writer,
                                   progress, workdir)
            # A resumed run logged only its own steps: take earlier values from the file.
            logged = {}
            for record in read_metrics(workdir) if chief else []:
                logged.update(record)
            latest = {**logged, **latest}
        finally:
            progress.close()
            writer.close()
        return TrainResult(model, state.variables(), latest, workdir)
    finally:
        checkpointer.close()


def _evaluate(due: Any, state: TrainState, step: int, batch: Any = None) -> dict[str, float]:
    """The metrics of every evaluator in ``due`` at ``step`` (canonical ``state``)."""
    metrics: dict[str, float] = {}
    for evaluator in due:
        metrics.update(evaluator(state, step, batch))
    return metrics


def _raise_if_bad(bad_step: int, checkpointer: Checkpointer) -> None:
    if bad_step != NO_BAD_STEP:
        checkpointer.wait()
        kept = checkpointer.latest_step()
        where = (f"the last good checkpoint (step {kept}) is kept in {checkpointer.directory}"
                 if kept is not None else "no checkpoint was written")
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN or inf) at step {bad_step}; stopped "
            f"without saving; {where}. Lower config.optimizer.learning_rate or set "
            f"config.optimizer.grad_clip")


def _train(config: Any, state: TrainState, step_fn: Any, iterator: Any, start_step: int,
           parallel: DataParallel, chosen: list[Any], checkpointer: Checkpointer,
           writer: Any, progress: Progress, workdir: Path) -> tuple[TrainState, dict[str, Any]]:
    """Steps ``start_step + 1 .. total_steps``; returns the state and the latest metrics."""
    total_steps, log_every = int(config.total_steps), int(config.log_every)
    schedule = make_schedule(config.optimizer, total_steps)
    multi_process = jax.process_count() > 1
    sigterm = StopSignals()
    if not multi_process:  # multi-host jobs use the distributed runtime's preemption notice
        sigterm.install()
    latest: dict[str, float] = {}
    step_state = parallel.to_step_form(state)
    # Zeroing the sums must keep every leaf's placement (pmap checks its inputs' layout).
    reset = jax.jit(reset_sums, donate_argnums=(0,),
                    out_shardings=jax.tree.map(lambda leaf: leaf.sharding, step_state))
    started = time.perf_counter()
    step = start_step
    try:
        if start_step >= total_steps:
            progress.message(f"already trained to step {start_step}; nothing to do")
        batches = iter(iterator)
        while step < total_steps:
            batch = next(batches)
            step_state = step_fn(step_state, parallel.global_batch(batch))
            step += 1
            progress.advance(step)
            if step - start_step in (1, 1 + TIMED_STEPS) and step < total_steps:
                jax.block_until_ready(step_state.step)  # two syncs per run time the steps
                progress.time_step(step, LONG_RUN_SECONDS)
            record: dict[str, float] = {}
            if step % log_every == 0 or step == total_steps:
                sums, bad = parallel.fetch((step_state.sums, step_state.first_bad_step))
                _raise_if_bad(int(bad), checkpointer)
                count = max(float(sums["steps"]), 1.0)
                record["train/loss"] = float(sums["loss_sum"]) / count
                record["train/accuracy"] = float(sums["accuracy_sum"]) / count
                record["train/learning_rate"] = float(schedule(step - 1))
                step_state = reset(step_state)
                progress.log(step, {k: v for k, v in record.items() if "rate" not in k},
                             progress.examples_per_second(step))
            due = [evaluator for evaluator in chosen if evaluator.due(step)]
            if due:
                evaluated = _evaluate(due, parallel.to_canonical(step_state), step, batch)
                record.update(evaluated)
                progress.log(step, evaluated)
            if record:
                writer.write(step, record)
                latest.update(record)
            preempted = sigterm.raised or (multi_process
                                           and checkpointer.reached_preemption(step))
            if step == total_steps or preempted or checkpointer.should_save(step):
                bad = parallel.fetch(step_state.first_bad_step)
                _raise_if_bad(int(bad), checkpointer)
                checkpointer.save(step, parallel.to_canonical(step_state), iterator,
                                  _meta(config, step, parallel), force=True)
            if preempted:
                checkpointer.wait()
                progress.message(f"stopped ({sigterm.name or 'preemption'}): saved a "
                                 f"checkpoint at step {step}; "
                                 "rerun the same command to resume")
                break
        checkpointer.wait()
    finally:
        sigterm.restore()
    latest = {"step": step, **latest}
    if step >= total_steps or start_step >= total_steps:
        progress.message(_summary(step, latest, time.perf_counter() - started, workdir))
    return parallel.to_canonical(step_state), latest


def _meta(config: Any, step: int, parallel: DataParallel) -> dict[str, Any]:
    """What a checkpoint records besides the state (the CAM command rebuilds the model
    from its ``config``)."""
    return {"step": int(step), "config": json.loads(config.to_json_best_effort()),
            "device_count": parallel.device_count, "process_count": jax.process_count(),
            "parallel": config.parallel}


def _summary(step: int, metrics: dict[str, Any], seconds: float, workdir: Path) -> str:
    shown = [f"step {step}"]
    for key in ("eval/accuracy", "eval/map", "eval/loss", "train/loss"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4f}")
    shown.append(f"{seconds:.1f}s")
    return "done: " + ", ".join(shown) + f" -> {workdir}"
