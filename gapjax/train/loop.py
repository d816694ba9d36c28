"""The training loop: ``run(config, workdir) -> TrainResult``.

config -> registries (dataset, model, pool, optimizer) -> input pipeline -> compiled step
-> checkpoints and metrics. The loop owns the order of events at a step ``s``:

1. train on the next batch (asynchronous dispatch, no host sync);
2. every ``log_every`` steps: fetch the on-device running sums, check the loss is finite,
   write ``train/*``;
3. every ``eval_every`` steps and at the end: evaluate, write ``eval/*``;
4. when the Orbax policy asks (every ``checkpoint_every`` steps, a preemption sync point),
   at the end, or after SIGTERM: check the loss is finite, then save.

Because metrics for ``s`` are written before the checkpoint of ``s``, and the state holds
the running sums and the iterator position is saved with it, a run resumed from any
checkpoint writes exactly the records an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gapjax import gradflow, models, tasks, wsol
from gapjax.pooling import POOLS
from gapjax.train.checkpoint import Checkpointer
from gapjax.train.defaults import DTYPES
from gapjax.train.metrics import MetricWriter, NullWriter, Progress, read_metrics
from gapjax.train.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from gapjax.train.parallel import DataParallel
from gapjax.train.state import NO_BAD_STEP, TrainState, create_train_state, reset_sums
from gapjax.train.steps import eval_step, train_step, zero_eval_sums
from gapjax.train.workdir import StopSignals, open_workdir

CHECKPOINT_DIR = "checkpoints"


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


# --------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------


def _check_choices(config: Any) -> None:
    """Fails fast, before any data or compilation, on names that are not registered."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r} is not supported; choose one of: "
                         f"{', '.join(DTYPES)}")
    models.MODELS.get(config.model.name)
    pool = config.model.get("pool")
    if pool is not None and pool != "token":  # "token": a ViT's class token, not a pool
        POOLS.get(pool)
    OPTIMIZERS.get(config.optimizer.name)
    SCHEDULES.get(config.optimizer.get("schedule", "constant"))
    for key in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key}={config[key]!r} must be a positive integer")


def _sample_inputs(data: Any, info: Any, task: Any, config: Any, batch_size: int) -> Any:
    """Model inputs from the first evaluation batch, to initialise shapes (no training data
    is consumed, so a fresh and a resumed run see the same training batches)."""
    iterator = data.make_iterator(config.dataset, info.eval_split, batch_size=batch_size,
                                  seed=config.seed, train=False, process_index=0,
                                  process_count=1)
    return task.init_inputs(next(iter(iterator)))


def _config_json(config: Any) -> dict[str, Any]:
    import json

    return json.loads(config.to_json_best_effort())


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


class _Run:
    """The pieces of one run, built once by ``run``."""

    def __init__(self, config: Any, workdir: Path):
        from gapjax import data

        _check_choices(config)
        self.config = config
        self.workdir = workdir
        self.data = data
        self.info = data.dataset_info(config.dataset)
        self.parallel = DataParallel(config.parallel)
        self.task = tasks.get(self.info.task, num_classes=self.info.num_classes,
                              label_smoothing=float(config.optimizer.get("label_smoothing", 0)))
        if not self.task.rows_split and (config.parallel == "pmap" or jax.process_count() > 1):
            raise ValueError(
                f"config.parallel={config.parallel!r} with {jax.process_count()} process(es): "
                f"{self.info.task} batches cannot be split per device or per process; use "
                "parallel='jit' in a single process"
            )
        self.local_batch_size = self.parallel.local_batch_size(int(config.batch_size))
        self.is_chief = jax.process_index() == 0
        self.model = models.from_config(config, self.info.num_classes, self.parallel.axis_name)
        self.tx = make_optimizer(config.optimizer, int(config.total_steps))
        self.schedule = make_schedule(config.optimizer, int(config.total_steps))
        self.train_step = self.parallel.compile_train_step(functools.partial(
            train_step, model=self.model, tx=self.tx, task=self.task, seed=int(config.seed)))
        self.eval_step = self.parallel.compile_eval_step(functools.partial(
            eval_step, model=self.model, task=self.task))
        self.checkpointer = Checkpointer(
            workdir / CHECKPOINT_DIR, checkpoint_every=int(config.checkpoint_every),
            keep=int(config.get("keep_checkpoints", 3)))

    def make_train_iterator(self) -> Any:
        return self.data.make_iterator(
            self.config.dataset, self.info.train_split, batch_size=self.local_batch_size,
            seed=int(self.config.seed), train=True, process_index=jax.process_index(),
            process_count=jax.process_count())

    def initial_state(self) -> TrainState:
        sample = _sample_inputs(self.data, self.info, self.task, self.config,
                                self.local_batch_size)
        model, tx, seed = self.model, self.tx, int(self.config.seed)
        return self.parallel.init(lambda: create_train_state(model, tx, sample, seed))

    def meta(self, step: int) -> dict[str, Any]:
        return {"step": int(step), "config": _config_json(self.config),
                "device_count": self.parallel.device_count,
                "process_count": jax.process_count(), "parallel": self.config.parallel}

    def evaluate(self, canonical_state: TrainState, split: str | None = None,
                 prefix: str = "eval", loc_threshold: float | None = None) -> dict[str, float]:
        """Evaluation metrics (``<prefix>/...``) of ``canonical_state`` on ``split`` (default
        the eval split). Localization uses ``config.eval.wsol_protocol`` and
        ``loc_threshold`` (None: calibrated on this split); its overlay grid, when
        ``config.eval.overlay_images`` > 0, is left in ``self.overlay``."""
        config, info = self.config, self.info
        variables = self.parallel.to_step_form(canonical_state.variables())
        sums = self.parallel.replicate(zero_eval_sums(self.task))
        iterator = self.data.make_iterator(
            config.dataset, split or info.eval_split, batch_size=self.local_batch_size,
            seed=int(config.seed), train=False, process_index=jax.process_index(),
            process_count=jax.process_count())
        localization = self.overlay = None
        if config.eval.get("localization", False):
            localization = wsol.LocalizationEvaluator(
                self.model, config.eval.get("cam_method", "auto"),
                protocol=config.eval.get("wsol_protocol", "gapjax"),
                loc_threshold=loc_threshold,
                overlay_images=int(config.eval.get("overlay_images", 0) or 0))
        collected: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        canonical_variables = canonical_state.variables()
        for batch in iterator:
            sums, logits = self.eval_step(variables, self.parallel.global_batch(batch), sums)
            if self.task.keeps_outputs:
                collected.append((self.parallel.local_rows(logits), np.asarray(batch["label"]),
                                  np.asarray(batch["weight"])))
            if localization is not None:
                localization.update(canonical_variables, batch)
        totals = self.parallel.fetch(sums)
        weight = max(float(totals.pop("weight")), 1.0)
        metrics = {f"eval/{key}": float(value) / weight for key, value in totals.items()}
        if collected:
            logits, labels, weights = (np.concatenate(parts) for parts in zip(*collected))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                logits, labels, weights = (
                    np.asarray(multihost_utils.process_allgather(a, tiled=True))
                    for a in (logits, labels, weights))
            real = weights > 0
            metrics.update({f"eval/{key}": value for key, value in
                            self.task.summarize(logits[real], labels[real]).items()})
        if localization is not None:
            metrics.update({key if key.startswith("eval/") else f"eval/{key}": float(value)
                            for key, value in localization.result().items()})
            self.overlay = localization.overlay()
        return {f"{prefix}/{key[len('eval/'):]}": value for key, value in metrics.items()}


def _raise_if_bad(bad_step: int, checkpointer: Checkpointer) -> None:
    if bad_step != NO_BAD_STEP:
        checkpointer.wait()
        kept = checkpointer.latest_step()
        where = (f"the last good checkpoint (step {kept}) is kept in {checkpointer.directory}"
                 if kept is not None else "no checkpoint was written")
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN or inf) at step {bad_step}; stopped "
            f"without saving; {where}. Lower config.optimizer.learning_rate or set "
            f"config.optimizer.grad_clip"
        )


def run(config: Any, workdir: str | Path, *, eval_only: bool = False, fresh: bool = False,
        fork_from: str | Path | None = None) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    The workdir is locked for the run and bound to its config (``workdir/config.json``):
    a rerun resumes from the newest intact checkpoint, and refuses a config that changes
    the run's meaning (one line naming each changed key) unless ``fresh`` (delete the
    run's files and start over there) or ``fork_from=OLD`` (branch: ``workdir`` is a new
    directory seeded with OLD's checkpoints). ``eval_only`` evaluates the run as trained
    and appends its ``eval/*`` record (nothing when ``config`` differs in meaning). See
    ``gapjax.train.workdir``.
    """
    sync = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        sync = multihost_utils.sync_global_devices
    with open_workdir(workdir, _config_json(config), eval_only=eval_only, fresh=fresh,
                      fork_from=fork_from, chief=jax.process_index() == 0,
                      sync=sync) as bound:
        if bound.refused:  # --eval_only under another config: evaluate the recorded one
            import ml_collections

            config = ml_collections.ConfigDict(bound.recorded)
        return _run(config, bound.workdir, eval_only=eval_only,
                    append=bound.append_metrics)


def _run(config: Any, workdir: str | Path, *, eval_only: bool, append: bool) -> TrainResult:
    """Trains (or resumes) the run described by ``config`` in ``workdir``.

    Rerunning with the same ``workdir`` resumes from the latest checkpoint; a finished run
    returns at once with its final metrics. ``eval_only`` evaluates the latest checkpoint
    and writes its ``eval/*`` record. ``config.progress="none"`` keeps it quiet, which is
    what programmatic callers (experiments) want.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    job = _Run(config, workdir)
    checkpointer, parallel = job.checkpointer, job.parallel
    total_steps, batch_size = int(config.total_steps), int(config.batch_size)
    try:
        train_iterator = None if eval_only else job.make_train_iterator()
        state = job.initial_state()
        start_step = 0
        if checkpointer.latest_step() is not None:
            abstract = parallel.abstract_canonical(state)
            restored = checkpointer.restore(abstract, train_iterator)
            state, start_step = restored.state, restored.step
        elif eval_only:
            raise TrainingError(
                f"--eval_only: no checkpoint in {checkpointer.directory}; train first with "
                "the same --workdir")
        elif config.get("init_from"):  # fine-tuning: only a fresh run reads the weights
            from gapjax.train.init_from import initialize

            state = initialize(state, job.model, job.tx, config)

        writer = (MetricWriter(workdir, resume_step=start_step) if job.is_chief
                  else NullWriter())
        progress = Progress(config.progress if job.is_chief else "none", total_steps,
                            start_step, batch_size)
        latest: dict[str, float] = {}
        try:
            if eval_only:
                latest = job.evaluate(state)
                if append:
                    writer.write(start_step, latest)
                progress.message(_summary(start_step, latest, 0.0, workdir))
                return TrainResult(job.model, state.variables(), {"step": start_step, **latest},
                                   workdir)
            if start_step:
                progress.message(f"resuming from step {start_step} ({checkpointer.directory})")
            state, latest = _train(job, state, train_iterator, start_step, writer, progress)
            # A resumed run logged only its own steps: take earlier values from the file.
            logged = {}
            for record in read_metrics(workdir) if job.is_chief else []:
                logged.update(record)
            latest = {**logged, **latest}
        finally:
            progress.close()
            writer.close()
        return TrainResult(job.model, state.variables(), latest, workdir)
    finally:
        checkpointer.close()


def _train(job: _Run, state: TrainState, iterator: Any, start_step: int, writer: Any,
           progress: Progress) -> tuple[TrainState, dict[str, Any]]:
    """Steps ``start_step + 1 .. total_steps``; returns the state and the latest metrics."""
    config, parallel, checkpointer = job.config, job.parallel, job.checkpointer
    total_steps = int(config.total_steps)
    log_every, eval_every = int(config.log_every), int(config.eval_every)
    gradflow_every = int(config.get("gradflow_every", 0) or 0)
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
            step_state = job.train_step(step_state, parallel.global_batch(batch))
            step += 1
            progress.advance(step)
            record: dict[str, float] = {}
            if gradflow_every and step % gradflow_every == 0:
                record.update(_gradflow(job, parallel.to_canonical(step_state), batch))
            if step % log_every == 0 or step == total_steps:
                sums, bad = parallel.fetch((step_state.sums, step_state.first_bad_step))
                _raise_if_bad(int(bad), checkpointer)
                count = max(float(sums["steps"]), 1.0)
                record["train/loss"] = float(sums["loss_sum"]) / count
                record["train/accuracy"] = float(sums["accuracy_sum"]) / count
                record["train/learning_rate"] = float(job.schedule(step - 1))
                step_state = reset(step_state)
                progress.log(step, {k: v for k, v in record.items() if "rate" not in k},
                             progress.examples_per_second(step))
            if step % eval_every == 0 or step == total_steps:
                eval_metrics = job.evaluate(parallel.to_canonical(step_state))
                if job.overlay is not None:
                    writer.write_image(step, "eval/cam_overlay", job.overlay)
                final_split = config.eval.get("final_split")
                if step == total_steps and final_split:  # e.g. WSOL's test split, with the
                    # map threshold calibrated on the eval split (train-fullsup)
                    eval_metrics.update(job.evaluate(
                        parallel.to_canonical(step_state), final_split, "test",
                        eval_metrics.get("eval/loc_threshold")))
                record.update(eval_metrics)
                progress.log(step, eval_metrics)
            if record:
                writer.write(step, record)
                latest.update(record)
            preempted = sigterm.raised or (multi_process
                                           and checkpointer.reached_preemption(step))
            if step == total_steps or preempted or checkpointer.should_save(step):
                bad = parallel.fetch(step_state.first_bad_step)
                _raise_if_bad(int(bad), checkpointer)
                checkpointer.save(step, parallel.to_canonical(step_state), iterator,
                                  job.meta(step), force=True)
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
        progress.message(_summary(step, latest, time.perf_counter() - started, job.workdir))
    return parallel.to_canonical(step_state), latest


def _gradflow(job: _Run, state: TrainState, batch: dict[str, Any]) -> dict[str, float]:
    values = gradflow.training_diagnostics(job.model, state.variables(), batch, job.task)
    return {f"train/grad_{key}": float(value) for key, value in values.items()}


def _summary(step: int, metrics: dict[str, Any], seconds: float, workdir: Path) -> str:
    shown = [f"step {step}"]
    for key in ("eval/accuracy", "eval/map", "eval/loss", "train/loss"):
        if key in metrics:
            shown.append(f"{key} {metrics[key]:.4f}")
    shown.append(f"{seconds:.1f}s")
    return "done: " + ", ".join(shown) + f" -> {workdir}"
