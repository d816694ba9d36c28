"""Train (or resume, or evaluate) one experiment: a thin CLI over ``gapjax.train.run``.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py --workdir runs/digits --config.model.pool=gmp
    python train.py --config configs/digits.py --workdir runs/digits --eval_only
    python train.py --config configs/digits.py:gmp --workdir runs/digits --fresh
    python train.py --config configs/digits.py --workdir runs/digits --fork runs/digits_lr \
        --config.optimizer.learning_rate=0.01

A workdir is bound to the config it was started with (``DIR/config.json``): a rerun resumes,
and a config that changes the run's meaning is refused with one line naming the changed
keys. ``--fresh`` starts over in the same workdir (deleting its checkpoints and metrics);
``--fork NEWDIR`` branches: NEWDIR starts from the workdir's newest checkpoint under the
new config. Ctrl-C saves a checkpoint at the current step and exits (a second Ctrl-C aborts
at once); rerunning the same command resumes.

Multi-host (one command per host): add ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``, or ``--multihost`` where the cluster environment
(TPU pod, SLURM) lets ``jax.distributed.initialize()`` find them itself.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoint and exit.")
_FRESH = flags.DEFINE_bool("fresh", False,
                           "Delete the workdir's run (checkpoints, metrics, config record) and "
                           "start over there.")
_FORK = flags.DEFINE_string("fork", None,
                            "Branch the run: train in this new directory, starting from the "
                            "workdir's newest checkpoint, under the given config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-host runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() with auto-detection.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for user errors.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    """Starts JAX's distributed runtime when asked to; must run before any computation."""
    import jax

    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _MULTIHOST.value and all(value is None for value in explicit):
        return
    # CPU devices need a collectives backend for cross-process reductions; the option only
    # concerns the CPU client, so GPU and TPU jobs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _MULTIHOST.value:
        jax.distributed.initialize()
        return
    if any(value is None for value in explicit):
        raise ValueError(
            "multi-host flags must come together: --coordinator_address, --num_processes "
            f"and --process_id (got {explicit[0]!r}, {explicit[1]!r}, {explicit[2]!r})")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)


def _fail(message: str, status: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    _quiet_shutdown()
    sys.exit(status)


def _quiet_shutdown() -> None:
    """After an error already reported in one line: the asynchronous readers and writers
    of a failed checkpoint operation may still be pending, and Python would print each
    one's "Event loop is closed" as the interpreter shuts down."""
    import threading

    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None


def _load_config():
    """The config, or one line naming the file when it is missing or does not load."""
    try:
        config = _CONFIG.value
        config.keys()  # a file that failed to load raises only when first used
        return config
    except (OSError, AttributeError, SyntaxError, ImportError) as error:
        path = config_flags.get_config_filename(flags.FLAGS["config"])
        if not os.path.exists(path):
            _fail(f"--config: no such file: {path}")
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        _fail(f"--config: cannot load {path}: {lines[-1] if lines else type(error).__name__}")


#: ``--config.model.pool_kwargs.<option>=<value>`` overrides, set once the config is loaded.
_OPEN_OVERRIDES: dict[str, str] = {}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax reports every save at INFO level; keep the console for progress and results.
    logging.set_verbosity(logging.WARNING)
    config = _load_config()
    from gapjax.train.defaults import apply_open_overrides

    apply_open_overrides(config, _OPEN_OVERRIDES)
    from gapjax.registry import UnknownNameError
    from gapjax.train import TrainingError, run
    from gapjax.train.checkpoint import CheckpointError
    from gapjax.train.workdir import WorkdirError

    user_errors = (UnknownNameError, TrainingError, WorkdirError, CheckpointError, ValueError,
                   KeyError, FileNotFoundError)
    workdir, fork = _WORKDIR.value, _FORK.value
    try:
        _initialize_distributed()
        # --workdir OLD --fork NEW trains in NEW, seeded from OLD.
        run(config, fork or workdir, fork_from=workdir if fork else None,
            eval_only=_EVAL_ONLY.value, fresh=_FRESH.value)
    except user_errors as error:
        if _TRACEBACK.value:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        _fail(message)
    except KeyboardInterrupt:
        if _TRACEBACK.value:
            raise
        _fail("aborted (Ctrl-C): nothing was saved since the last checkpoint; rerun the same "
              "command to resume from it", status=130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad ``--config.x.y=v`` override turned into one clear line
    (ml_collections raises it as a plain exception naming the key). Pool options
    (``--config.model.pool_kwargs.<option>=<value>``) are open-ended and set after loading."""
    from gapjax.train.defaults import split_open_overrides

    argv, overrides = split_open_overrides(argv)
    _OPEN_OVERRIDES.update(overrides)
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (SyntaxError, ImportError, NameError) as error:  # the config file itself
        if isinstance(error, SyntaxError):
            message, where = error.msg, f" ({error.filename}, line {error.lineno})"
        else:
            message, where = (str(error).splitlines() or [""])[0], ""
        print(f"error: --config: cannot load the config file: {type(error).__name__}: "
              f"{message}{where}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        text = str(error).replace("\\n", "; ").replace("\\", "").replace("'", "")
        message = " ".join(text.split())
        print(f"error: unknown or invalid config override: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
