"""The run directory: bound to one config, held by one run at a time, stopped cleanly.

A workdir holds one run: ``config.json`` (the resolved config it was started with),
``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and, while a run is active, ``lock``.

* **Config record.** The first run writes ``config.json``; every later run compares its own
  config with it and refuses a change of any key that alters what the run means (model,
  pool, dataset, batch size, seed, optimizer, ...) with one line naming each changed key
  and both values. The keys in ``RESUMABLE_KEYS`` (length, cadence, display) may change on
  resume, and so may keys the code added or removed since; the record keeps each such
  change with the step it was made at. ``fresh=True`` (``--fresh``) deletes the run's
  files and starts over in the same directory; ``fork_from=OLD`` (``--fork NEW``) copies
  OLD's checkpoints and metrics into a new directory and continues from there under the
  new config.
* **Lock.** ``lock`` names the holder (host, pid, start time) and is held with ``flock``
  for the whole run, so the kernel releases it when the process dies, however it dies. A
  second run on the same workdir is refused with one line naming the holder; a lock left by
  a dead run is taken over with a notice.
* **Stop signals.** SIGTERM and a first Ctrl-C ask the loop to save at the current step and
  exit; a second Ctrl-C aborts at once (no save).

Notices (repairs, take-overs, accepted changes) are one line each on stderr, prefixed
``note:``; refusals raise ``WorkdirError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flax import traverse_util

CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DAMAGED_DIR = "damaged_checkpoints"
IMAGES_DIR = "images"

# Keys that may change when a run is resumed: how long it trains, how often it logs,
# evaluates and checkpoints, how it is displayed, where the prepared data lives and how
# the devices split the batch. Every other key is part of what the run means.
RESUMABLE_KEYS = (
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "gradflow_every",
    "parallel",
    "dataset.data_dir",
)

_RUN_FILES = (CHECKPOINT_DIR, METRICS_FILE, TENSORBOARD_DIR, IMAGES_DIR, CONFIG_FILE,
              DAMAGED_DIR)


class WorkdirError(RuntimeError):
    """A workdir that cannot be used as asked (one-line message naming what and why)."""


def notice(message: str) -> None:
    """One line on stderr, prefixed ``note:`` (repairs, take-overs, accepted changes)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def write_atomically(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so the file is
    always either the old or the new version, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _write_json_atomically(path: Path, value: Any) -> None:
    write_atomically(path, json.dumps(value, indent=1, sort_keys=True) + "\n")


def prepare(workdir: str | Path) -> Path:
    """Creates ``workdir`` (and parents) and checks it can be written to.

    Returns its absolute path; raises ``WorkdirError`` (one line) when it cannot be made or
    written, e.g. a read-only location or a path through an existing file.
    """
    workdir = Path(workdir).absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WorkdirError(f"cannot create workdir {workdir}: {_os_reason(error)}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {workdir} is not writable (permission denied); choose "
                           "another --workdir or fix its permissions")
    return workdir


def _os_reason(error: OSError) -> str:
    name = errno.errorcode.get(error.errno or 0, "")
    return f"{error.strerror or error} ({name})" if name else str(error)


# --------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------


def _describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def read_lock(workdir: str | Path) -> dict[str, Any] | None:
    """The holder recorded in ``workdir/lock`` (host, pid, started), or None."""
    try:
        text = (Path(workdir) / LOCK_FILE).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


class WorkdirLock:
    """An exclusive, process-lifetime lock on a workdir (``flock`` on ``workdir/lock``).

    The kernel drops an ``flock`` when its process ends, so a lock file whose lock is free
    is stale (its run died without cleaning up) and is taken over with a notice.
    """

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock or raises ``WorkdirError`` naming the live holder."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise WorkdirError(f"cannot create lock file {self.path}: "
                                   f"{_os_reason(error)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by another run "
                    f"({_describe_holder(read_lock(self.workdir))}); wait for it to end or "
                    "stop it, or use another --workdir") from None
            # The holder before us may have removed the file after we opened it: then we
            # locked an unlinked file and must start again on the current one.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = os.read(fd, 4096).decode(errors="replace")
        if previous.strip():
            try:
                holder = json.loads(previous)
            except ValueError:
                holder = None
            notice(f"took over the lock of a run that is no longer running "
                   f"({_describe_holder(holder)}): {self.path}")
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and drops the lock (no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# --------------------------------------------------------------------------------------
# The config record
# --------------------------------------------------------------------------------------


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"model": {"pool": "gap"}}`` -> ``{"model.pool": "gap"}`` (lists stay values)."""
    return traverse_util.flatten_dict(config, sep=".")


_ABSENT = object()


def config_changes(recorded: dict[str, Any], current: dict[str, Any]
                   ) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, current value)`` for every dotted key that differs, sorted;
    a key missing on one side has the value ``(absent)``."""
    old, new = flatten(recorded), flatten(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before != after or type(before) is not type(after):
            changes.append((key, before, after))
    return changes


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``model.pool "gap" -> "gmp", batch_size 32 -> 64``."""
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, old, new in changes)


def is_resumable(key: str, old: Any = None, new: Any = None) -> bool:
    """Whether ``key`` (dotted) may change from ``old`` to ``new`` when a run is resumed:
    a key of ``RESUMABLE_KEYS``, or a key that exists on one side only (the code added or
    removed a config key since the run started; a locked config cannot gain keys from
    the command line)."""
    return key in RESUMABLE_KEYS or old is _ABSENT or new is _ABSENT


def committed_steps(workdir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``workdir/checkpoints`` (Orbax renames a step
    directory to its number only once it is complete)."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def has_run(workdir: str | Path) -> bool:
    """Whether ``workdir`` holds anything of a run (a checkpoint or a metrics record)."""
    metrics = Path(workdir) / METRICS_FILE
    return bool(committed_steps(workdir)) or (metrics.exists() and metrics.stat().st_size > 0)


def read_record(workdir: str | Path) -> dict[str, Any] | None:
    """``workdir/config.json`` as a dict (``config``, ``forked_from``, ``resumed``), or None.

    A workdir from before config records existed falls back to the config saved in its
    newest checkpoint's ``meta`` item.
    """
    path = Path(workdir) / CONFIG_FILE
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except ValueError as error:
            raise WorkdirError(f"{path} is not valid JSON ({error}); restore it or pass "
                               "--fresh to start over") from None
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise WorkdirError(f"{path} has no 'config' object; restore it or pass --fresh "
                               "to start over")
        return record
    for step in reversed(committed_steps(workdir)):
        meta = Path(workdir) / CHECKPOINT_DIR / str(step) / "meta" / "metadata"
        try:
            config = json.loads(meta.read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return {"config": config, "forked_from": None, "resumed": []}
    return None


def clear_run(workdir: str | Path) -> list[str]:
    """Deletes the run's files in ``workdir`` (checkpoints, metrics, TensorBoard, images,
    config record, set-aside damaged checkpoints); other files stay. Returns what was
    removed."""
    removed = []
    for name in _RUN_FILES:
        path = Path(workdir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _copy_run(source: Path, target: Path) -> int:
    """Copies ``source``'s complete checkpoints and its metrics up to the newest of them
    into ``target``; returns that step."""
    steps = committed_steps(source)
    if not steps:
        raise WorkdirError(f"--fork: {source} has no checkpoint to branch from")
    (target / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    for step in steps:
        try:
            shutil.copytree(source / CHECKPOINT_DIR / str(step),
                            target / CHECKPOINT_DIR / str(step))
        except (OSError, shutil.Error) as error:
            # The source run deleted an old checkpoint while we copied it: skip it.
            if (source / CHECKPOINT_DIR / str(step)).exists():
                raise WorkdirError(f"--fork: cannot copy {source / CHECKPOINT_DIR / str(step)}"
                                   f": {error}") from None
            shutil.rmtree(target / CHECKPOINT_DIR / str(step), ignore_errors=True)
    metrics = source / METRICS_FILE
    if metrics.exists():
        shutil.copyfile(metrics, target / METRICS_FILE)
    return steps[-1]


# --------------------------------------------------------------------------------------
# Opening a workdir for a run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Binding:
    """What ``open_workdir`` settled.

    Attributes:
      workdir: the run directory (absolute).
      recorded: the config the run is bound to (a plain dict), after accepted changes.
      refused: for ``eval_only``, the changes of meaning that were ignored (nothing is
        appended to the metrics when there are any); empty otherwise.
    """

    workdir: Path
    recorded: dict[str, Any]
    refused: list[tuple[str, Any, Any]]

    @property
    def append_metrics(self) -> bool:
        return not self.refused


def _bind(workdir: Path, current: dict[str, Any], *, eval_only: bool, chief: bool
          ) -> Binding:
    record = read_record(workdir)
    started = has_run(workdir)
    path = workdir / CONFIG_FILE
    if record is None or not started:
        if eval_only:
            return Binding(workdir, current, [])
        if chief:
            if started:
                notice(f"{workdir} holds a run without a config record; recording this "
                       f"config in {path}")
            _write_json_atomically(path, {"config": current, "forked_from": None,
                                          "resumed": []})
        return Binding(workdir, current, [])
    changes = config_changes(record["config"], current)
    meaning = [change for change in changes if not is_resumable(*change)]
    if eval_only:
        if meaning:
            notice(f"--eval_only evaluates the run as trained (config in {path}); ignored: "
                   f"{format_changes(meaning)}; nothing is appended to {METRICS_FILE}")
        accepted = flatten(record["config"])
        # Only the keys that may change on resume: a key of another model or dataset
        # (absent from the record) must not reach the recorded model.
        accepted.update({key: new for key, _, new in changes
                         if key in RESUMABLE_KEYS and new is not _ABSENT})
        return Binding(workdir, traverse_util.unflatten_dict(accepted, sep="."), meaning)
    if meaning:
        raise WorkdirError(
            f"config differs from the run in {workdir} (recorded in {CONFIG_FILE}): "
            f"{format_changes(meaning)}; only {', '.join(RESUMABLE_KEYS)} may change on "
            "resume. Rerun with the recorded config, or pass --fresh to start over in this "
            "workdir, or --fork NEWDIR to branch into a new one")
    if changes:
        notice(f"config changes accepted on resume: {format_changes(changes)}")
        if chief:
            steps = committed_steps(workdir)
            record.setdefault("resumed", []).append({
                "step": steps[-1] if steps else 0,
                "changes": {key: [_plain(old), _plain(new)] for key, old, new in changes}})
            record["config"] = current
            _write_json_atomically(path, record)
    return Binding(workdir, current, [])


def _plain(value: Any) -> Any:
    return None if value is _ABSENT else value


@contextlib.contextmanager
def open_workdir(workdir: str | Path, config: dict[str, Any], *, eval_only: bool = False,
                 fresh: bool = False, fork_from: str | Path | None = None,
                 chief: bool = True, sync: Any = None) -> Iterator[Binding]:
    """Prepares, locks and binds ``workdir`` to ``config`` (a JSON dict) for one run.

    Args:
      workdir: the run directory (created if missing).
      config: the resolved config as JSON (``ConfigDict.to_json_best_effort``).
      eval_only: evaluate the run as trained: a config that differs in meaning is
        ignored with a notice (the binding carries the recorded one) instead of refused.
      fresh: delete the run's files in ``workdir`` first (a new run in the same place).
      fork_from: another workdir whose checkpoints and metrics seed this new one; its
        config may differ. Rerunning the same fork resumes it.
      chief: whether this process writes (process 0); the others only read and compare.
      sync: a ``name -> None`` barrier across processes, called after the chief changed
        files (multi-host); None in a single process.

    Yields a ``Binding``; the lock is released on exit, whatever happens.
    """
    if fresh and (fork_from is not None or eval_only):
        raise WorkdirError("--fresh cannot be combined with --fork or --eval_only")
    if fork_from is not None and eval_only:
        raise WorkdirError("--fork cannot be combined with --eval_only")
    newest = max(committed_steps(fork_from), default=0) if fork_from is not None else 0
    total = int(config.get("total_steps", newest + 1))
    if fork_from is not None and not has_run(workdir) and newest >= total:
        raise WorkdirError(f"--fork: {fork_from} is already at step {newest}, and "
                           f"config.total_steps={total}; raise it (e.g. --config.total_steps="
                           f"{2 * newest}) to train the fork further")
    workdir = prepare(workdir) if chief else Path(workdir).absolute()
    lock = WorkdirLock(workdir)
    if chief:
        lock.acquire()
    try:
        if fresh and chief:
            removed = clear_run(workdir)
            if removed:
                notice(f"--fresh: deleted {', '.join(removed)} in {workdir}")
        if fork_from is not None:
            _fork_into(Path(fork_from).absolute(), workdir, config, chief)
        if sync is not None:
            sync("gapjax_workdir_prepared")
        yield _bind(workdir, config, eval_only=eval_only, chief=chief)
    finally:
        lock.release()


def _fork_into(source: Path, target: Path, config: dict[str, Any], chief: bool) -> None:
    """Seeds ``target`` from ``source`` and binds it to ``config``, unless ``target``
    already holds that fork (a rerun of the same command resumes it)."""
    if source == target:
        raise WorkdirError(f"--fork needs a new directory, not the workdir itself ({source})")
    record = read_record(target)
    if has_run(target):
        origin = (record or {}).get("forked_from") or {}
        if origin.get("workdir") == str(source):
            return  # the same fork, rerun: resume it
        raise WorkdirError(f"--fork: {target} already holds another run; choose an empty "
                           "directory")
    if not source.is_dir():
        raise WorkdirError(f"--fork: {source} does not exist")
    if not chief:
        return
    source_record = read_record(source)
    step = _copy_run(source, target)
    _write_json_atomically(target / CONFIG_FILE, {
        "config": config, "forked_from": {"workdir": str(source), "step": step},
        "resumed": []})
    changes = config_changes(source_record["config"], config) if source_record else []
    notice(f"forked {source} at step {step} into {target}"
           + (f"; changed: {format_changes(changes)}" if changes else ""))


# --------------------------------------------------------------------------------------
# Stop signals
# --------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and a first Ctrl-C set ``raised`` (the loop saves at the current step and
    exits); a second Ctrl-C raises ``KeyboardInterrupt`` at once, without saving.

    ``install`` only works in the main thread; elsewhere the signals are left alone.
    """

    def __init__(self):
        self.raised = False
        self.name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                return

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.raised:
            self.restore()
            raise KeyboardInterrupt
        if not self.raised:
            self.raised = True
            self.name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            if signum == signal.SIGINT:
                print("\ninterrupted: saving a checkpoint at the current step, then exiting "
                      "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
