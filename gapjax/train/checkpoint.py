"""Checkpoints with Orbax: train state, data-iterator state and run metadata, atomically.

One checkpoint is a composite of three items under ``DIR/checkpoints/<step>/``: ``state``
(the canonical ``TrainState``, saved asynchronously and collectively), ``data`` (the
training iterator's position, one file per process) and ``meta`` (the config and a few
facts, JSON). Orbax policies decide which steps are saved (every ``checkpoint_every``
steps, and at a multi-host preemption sync point) and keep the latest ``keep``.

Failures are one line naming the path (docs/training.md, "Checkpoints and crashes"): a
checkpoint that cannot be read is skipped for the newest intact one and set aside in
``DIR/damaged_checkpoints/``; a save that fails in the background raises
``CheckpointSaveError`` (step directory, errno) at the next step, and the previous
checkpoint is kept.

Reopening a run (the CAM command line, ``config.init_from``) takes the same
``Checkpointer.restore``, read-only: ``load_run(workdir)``, which first re-imports the
modules the run recorded, so a fork's pools and models are known from any directory.
"""

from __future__ import annotations

import dataclasses
import errno as errno_lib
import json
import logging as python_logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from gapjax.registry import import_modules

#: The run directory's checkpoints, set-aside damaged checkpoints and config record.
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or written (one line naming the path)."""


def committed_steps(directory: str | Path) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, ascending (Orbax's listing:
    a step directory is named by its number only once it is committed)."""
    return sorted(ocp.utils.checkpoint_steps(Path(directory)))


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose arrays do not fit the model being restored (another
    model config): no older checkpoint is tried, they would not fit either."""


class CheckpointSaveError(CheckpointError):
    """A save failed (e.g. disk full); the previous checkpoint is kept.

    Attributes:
      path: the step directory that could not be written.
      errno: the operating-system error number, when there is one.
    """

    def __init__(self, message: str, path: Path, errno: int | None):
        super().__init__(message)
        self.path = path
        self.errno = errno


def _grain_args() -> tuple[type, type, tuple[type, ...]] | None:
    """Grain's Orbax args (save, restore) and its iterator types, if grain is installed."""
    try:
        import grain
    except ImportError:
        return None
    return (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore,
            (grain.DataLoaderIterator, grain.DatasetIterator))


class _QuietOrbax(python_logging.Filter):
    """Drops Orbax's own error logs (tracebacks of a failed background save or restore,
    repeated by each thread that sees them): ``Checkpointer`` reports each failure once,
    as one line naming the path."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return "orbax" not in record.pathname or record.levelno >= python_logging.CRITICAL


_QUIET = _QuietOrbax()


def _silence_orbax_errors() -> None:
    from absl import logging as absl_logging

    for logger in (absl_logging.get_absl_logger(), python_logging.getLogger()):
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    handler = absl_logging.get_absl_handler()
    if _QUIET not in handler.filters:
        handler.addFilter(_QUIET)


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    meta: dict[str, Any]


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for the training loop.

    Args:
      directory: where the step directories go (created if missing, unless read-only).
      checkpoint_every: save interval in steps (the save-decision policy).
      keep: how many of the latest checkpoints to keep.
      async_save: write the state in a background thread (the loop keeps training).
      read_only: only restore (another run's checkpoints: nothing is created, cleaned up
        or set aside).
    """

    def __init__(self, directory: str | Path, *, checkpoint_every: int = 1, keep: int = 1,
                 async_save: bool = True, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        _silence_orbax_errors()
        save_policy = policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(checkpoint_every), 1)),
            policies.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy,
            preservation_policy=policies.LatestN(max(int(keep), 1)),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as error:
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                  f"{_describe(error)}") from None
        self._grain = _grain_args()
        self._pending: int | None = None  # the step of a save not yet known to be committed
        self._failed = False

    # ----------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether the policies ask for a checkpoint at ``step`` (interval or preemption).

        Called every step, so it is also where a failed background save surfaces
        (``CheckpointSaveError``)."""
        self.check()
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True once every process has reached the preemption sync point (multi-host)."""
        return self.manager.reached_preemption(step)

    def _is_grain(self, iterator: Any) -> bool:
        return self._grain is not None and isinstance(iterator, self._grain[2])

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any],
             force: bool = False) -> bool:
        """Starts saving ``state`` (canonical form), the iterator position and ``meta``.

        Returns whether a save was started. The iterator state is captured before this
        returns, so the loop may keep drawing batches while the state is written. A
        previous save that failed raises ``CheckpointSaveError`` here.
        """
        if self._pending is not None:
            self.wait()  # Orbax would wait for it anyway; this names its step if it failed
        if self._is_grain(data_iterator):
            data_args = self._grain[0](data_iterator)
        else:
            data_args = ocp.args.JsonSave(_iterator_state(data_iterator))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=data_args,
            meta=ocp.args.JsonSave(meta),
        )
        try:
            started = self.manager.save(step, args=args, force=force)
        except Exception as error:
            raise self._save_failed(step, error) from None
        if started:
            self._pending = step
        return started

    def check(self) -> None:
        """Raises ``CheckpointSaveError`` if the last background save has failed by now
        (no waiting: a save still in progress is checked at a later call)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until any background save has been committed; raises
        ``CheckpointSaveError`` (path, errno) if it failed."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(step, error) from None
        if step is not None and not (self.directory / str(step)).is_dir():
            raise self._save_failed(step, None)

    def _save_failed(self, step: int | None, error: BaseException | None
                     ) -> CheckpointSaveError:
        """Cleans up after a failed save of ``step`` and describes it in one line."""
        self._failed = True
        path = self.directory / str(step if step is not None else "?")
        self._remove_temporaries()
        kept = [s for s in committed_steps(self.directory) if step is None or s < step]
        previous = (f"the previous checkpoint (step {kept[-1]}) is kept" if kept
                    else "no earlier checkpoint exists")
        number = _errno(error) if error is not None else None
        reason = _describe(error) if error is not None else "the step was not committed"
        return CheckpointSaveError(
            f"saving checkpoint {path} failed: {reason}; stopped; {previous}. Free space or "
            "fix the directory, then rerun the same command to resume", path, number)

    def _remove_temporaries(self, settle: float = 0.3, timeout: float = 10.0) -> None:
        """Removes the temporary directories of failed saves. Writers of the failed save's
        other items may still be finishing in the background, so it repeats until none
        has reappeared for ``settle`` seconds."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            temporaries = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            for temporary in temporaries:
                shutil.rmtree(temporary, ignore_errors=True)
            if temporaries:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                return
            time.sleep(0.02)

    # ----------------------------------------------------------------------------------

    def restore(self, abstract_state: Any = None, data_iterator: Any | None = None,
                step: int | None = None) -> Restored:
        """Restores ``step`` (default: the newest intact one), onto ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set,
        which is what lets a checkpoint from 4 devices restore on 1 or 8; None restores the
        saved tree as it was written (nested dicts of arrays). The data iterator, when
        given, is moved to the saved position in place.

        Without ``step``, a newest checkpoint that cannot be read is skipped with a warning
        naming the damaged file, and the next older one is tried; the damaged ones are
        moved to ``damaged_checkpoints/`` next to the checkpoint directory once an older
        one restores (unless read-only). If none restores, ``CheckpointError`` names the
        newest one's path.
        """
        steps = [step] if step is not None else committed_steps(self.directory)[::-1]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures: list[tuple[int, BaseException]] = []
        for candidate in steps:
            try:
                restored = self._restore(candidate, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as error:
                failures.append((candidate, error))
                if candidate != steps[-1]:
                    print(f"warning: {self._restore_failed(candidate, error)}; trying the "
                          "previous checkpoint", file=sys.stderr, flush=True)
                continue
            if failures and not self.read_only:
                self._set_aside([s for s, _ in failures], restored.step)
            return restored
        error = self._restore_failed(*failures[0])
        if len(failures) > 1:
            error = CheckpointError(f"{error} (the {len(failures) - 1} older checkpoint(s) "
                                    "fail too)")
        raise error from None

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Restored:
        if abstract_state is not None:
            self._check_shapes(step, abstract_state)
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            if self._is_grain(data_iterator):
                items["data"] = self._grain[1](data_iterator)
            else:
                items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None and not self._is_grain(data_iterator):
            _set_iterator_state(data_iterator, restored["data"])
        return Restored(step=step, state=restored["state"], meta=dict(restored["meta"]))

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Compares the saved arrays' shapes with ``abstract_state`` before reading any
        data: a model that changed shape gets one line naming the first differing array
        (Orbax would fail inside its asynchronous readers, with a page of tracebacks)."""
        path = self.directory / str(step) / "state"
        saved = ocp.StandardCheckpointer().metadata(path)
        saved = getattr(saved, "item_metadata", saved)
        # Key paths as "a.b.c": a TrainState's attributes and the dicts Orbax stores it as
        # read the same.
        expected = {jax.tree_util.keystr(key, simple=True, separator="."): tuple(leaf.shape)
                    for key, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        stored = {jax.tree_util.keystr(key, simple=True, separator="."):
                  tuple(getattr(leaf, "shape", ()) or ())
                  for key, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
        differ = [key for key in expected if key in stored and stored[key] != expected[key]]
        missing = [key for key in expected if key not in stored]
        extra = [key for key in stored if key not in expected]
        if not (differ or missing or extra):
            return
        if differ:
            key = differ[0]
            first = f"{key} has shape {stored[key]} there, {expected[key]} in the model"
        elif missing:
            first = f"{missing[0]} is missing there"
        else:
            first = f"{extra[0]} is not in the model"
        more = len(differ) + len(missing) + len(extra) - 1
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit the model: {first}"
            + (f" (and {more} more difference(s))" if more else "")
            + "; the model config differs from the one this checkpoint was trained with")

    def _restore_failed(self, step: int, error: BaseException) -> CheckpointError:
        step_dir = self.directory / str(step)
        where = _damaged_file(step_dir, error)
        return CheckpointError(f"cannot restore checkpoint {where}: {_describe(error)}")

    def _set_aside(self, steps: list[int], restored: int) -> None:
        """Moves the unreadable ``steps`` out of the checkpoint directory (so the run can
        save those steps again) into ``damaged_checkpoints/`` (so nothing is deleted)."""
        _sync("gapjax_restore_done")
        if jax.process_index() == 0:
            target = self.directory.parent / DAMAGED_DIR
            target.mkdir(exist_ok=True)
            for step in steps:
                destination = target / str(step)
                suffix = 1
                while destination.exists():
                    destination = target / f"{step}-{suffix}"
                    suffix += 1
                os.replace(self.directory / str(step), destination)
                print(f"warning: restored step {restored}; moved the damaged checkpoint "
                      f"{self.directory / str(step)} to {destination}", file=sys.stderr,
                      flush=True)
        _sync("gapjax_damaged_moved")
        self.manager.reload()

    # ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Waits for pending saves and releases the manager (a save that failed after
        its error was reported is not reported again)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise
            if self._failed:
                self._remove_temporaries(settle=0.0)


@dataclasses.dataclass
class Run:
    """A run reopened by ``load_run``: the config its checkpoint was saved with (a
    ``ConfigDict``), its ``variables`` (``params`` and ``batch_stats``, no optimizer state),
    the checkpoint's ``step`` and the ``workdir``."""

    config: Any
    variables: dict[str, Any]
    step: int
    workdir: Path


def load_run(workdir: str | Path) -> Run:
    """The newest intact checkpoint of the run in ``workdir`` (read-only).

    The modules the run recorded are imported first (``config.json``'s ``imports``, the
    ``config.imports`` entries resolved when the run started; else the saved config's
    ``imports``), so ``gapjax.models.from_config(run.config, num_classes)`` rebuilds a
    fork's model exactly as it was trained, ``pool_kwargs`` and ``attn_kwargs`` included.
    A workdir without a checkpoint raises ``CheckpointError`` (one line).
    """
    workdir = Path(workdir).expanduser().absolute()
    directory = workdir / CHECKPOINT_DIR
    if not committed_steps(directory):
        problem = f"no checkpoint in {directory}" if workdir.is_dir() else "no such folder"
        raise CheckpointError(f"workdir {workdir} is not a gapjax run ({problem}); train "
                              f"one first: python train.py --config CONFIG --workdir {workdir}")
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        restored = checkpointer.restore()
    finally:
        checkpointer.close()
    config = ml_collections.ConfigDict(restored.meta["config"])
    record_path = workdir / CONFIG_FILE
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {record_path}: {_describe(error)}") from None
    recorded = record.get("imports") if isinstance(record, dict) else None
    import_modules(recorded or config.get("imports") or ())
    state = restored.state
    variables = {key: state[key] for key in ("params", "batch_stats") if state.get(key)}
    return Run(config, variables, restored.step, workdir)


def _sync(name: str) -> None:
    """A barrier of all processes (none with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _iterator_state(iterator: Any) -> Any:
    """A JSON-able snapshot of a checkpointable iterator's position."""
    state = iterator.get_state()
    if isinstance(state, bytes):
        return {"bytes": state.decode()}
    return json.loads(json.dumps(state))


def _set_iterator_state(iterator: Any, saved: Any) -> None:
    if isinstance(saved, dict) and set(saved) == {"bytes"}:
        iterator.set_state(saved["bytes"].encode())
    else:
        iterator.set_state(saved)


# --------------------------------------------------------------------------------------
# Describing failures in one line
# --------------------------------------------------------------------------------------

_ERRNO_PATTERNS = (re.compile(r"\[Errno (\d+)\]"), re.compile(r"os_error_code='?(\d+)"))


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _errno(error: BaseException) -> int | None:
    """The errno of ``error`` or of an exception it was raised from, else one quoted in a
    message (tensorstore reports ``os_error_code='28'``)."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno is not None:
            return link.errno
    for link in _chain(error):
        for pattern in _ERRNO_PATTERNS:
            match = pattern.search(str(link))
            if match:
                return int(match.group(1))
    return None


def _describe(error: BaseException) -> str:
    """The first line of ``error``'s message, with its errno named when there is one:
    ``No space left on device [errno 28 ENOSPC]``."""
    number = _errno(error)
    if number is not None:
        name = errno_lib.errorcode.get(number, "")
        return f"{os.strerror(number)} [errno {number}{' ' + name if name else ''}]"
    # The innermost exception says what went wrong; the outer ones wrap it in context
    # (tensorstore specs, "Encountered error while reading array index").
    for link in reversed(_chain(error)):
        text = str(link).strip()
        if text:
            first = f"{type(link).__name__}: {text.splitlines()[0]}"
            return first if len(first) <= 300 else first[:300] + "..."
    return type(error).__name__


_JSON_NAMES = ("metadata", "_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def _damaged_file(step_dir: Path, error: BaseException) -> Path:
    """The file of ``step_dir`` that ``error`` is about: one it names, else the first JSON
    file that does not parse, else ``step_dir`` itself."""
    root = str(step_dir)
    for link in _chain(error):
        for match in re.finditer(re.escape(root) + r"[^\s\"',:]*", str(link)):
            candidate = Path(match.group(0).rstrip("."))
            if candidate != step_dir and candidate.exists():
                return candidate
    if step_dir.is_dir():
        for path in sorted(step_dir.rglob("*")):
            if path.is_file() and (path.suffix == ".json" or path.name in _JSON_NAMES
                                   or path.parent.name == "array_metadatas"):
                try:
                    json.loads(path.read_text())
                except (OSError, ValueError):
                    return path
    return step_dir
