"""Train (or resume, or evaluate) one experiment: a thin CLI over ``gapjax.train.run``.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py --workdir runs/digits --config.model.pool=gem \
        --config.model.pool_kwargs.p=4
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

Overrides: ``--config.<key>=<value>`` for any key the config has, and for the open-ended
sections ``--config.model.<pool|attn|...>_kwargs.<option>=<value>`` and
``--config.evals.<name>.<option>=<value>``. A config file's folder is on ``sys.path``, so a
fork's config imports the modules beside it; ``config.imports`` names modules (or ``.py``
files) imported before anything is built.

A user error is one line on stderr (``error: ...``) and exit status 1; ``--traceback`` shows
the traceback instead.

Multi-host (one command per host): add ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``, or ``--multihost`` where the cluster environment
(TPU pod, SLURM) lets ``jax.distributed.initialize()`` find them itself.
"""

from __future__ import annotations

import logging as python_logging
import os
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from gapjax.train import run
from gapjax.train.defaults import apply_open_overrides, split_open_overrides

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False,
                               "Evaluate the latest checkpoint (under the recorded config) "
                               "and exit.")
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

#: The open-ended overrides (``gapjax.train.defaults.is_open_override``), set once the
#: config is loaded.
_OPEN_OVERRIDES: dict[str, str] = {}


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
    sys.exit(status)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).replace("\\n", "\n").splitlines()]
    return next((line for line in lines if line), type(error).__name__)


def _quiet_background_failures() -> None:
    """A failed checkpoint save leaves Orbax's asynchronous writers pending; as they wind
    down they report "Event loop is closed" from threads and unretrieved futures on the
    asyncio logger. The failure itself is reported in one line, so these are dropped."""
    default_hook, default_thread_hook = sys.excepthook, threading.excepthook

    def closed_loop(error: BaseException | None) -> bool:
        return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)

    sys.excepthook = lambda kind, error, tb: (
        None if closed_loop(error) else default_hook(kind, error, tb))
    threading.excepthook = lambda args: (
        None if closed_loop(args.exc_value) else default_thread_hook(args))
    sys.unraisablehook = lambda unraisable: None
    python_logging.getLogger("asyncio").setLevel(python_logging.CRITICAL)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax reports every save at INFO level; keep the console for progress and results.
    logging.set_verbosity(logging.WARNING)
    if not _TRACEBACK.value:
        _quiet_background_failures()
    workdir, fork = _WORKDIR.value, _FORK.value
    try:
        config = _CONFIG.value
        apply_open_overrides(config, _OPEN_OVERRIDES)
        _initialize_distributed()
        # --workdir OLD --fork NEW trains in NEW, seeded from OLD.
        run(config, fork or workdir, fork_from=workdir if fork else None,
            eval_only=_EVAL_ONLY.value, fresh=_FRESH.value)
    except KeyboardInterrupt:
        if _TRACEBACK.value:
            raise
        _fail("aborted (Ctrl-C): nothing was saved since the last checkpoint; rerun the same "
              "command to resume from it", status=130)
    except Exception as error:  # every error reaches the user as one line
        if _TRACEBACK.value:
            raise
        user_error = isinstance(error, ValueError | KeyError | OSError | RuntimeError)
        _fail(_first_line(error) if user_error else f"{type(error).__name__}: "
              f"{_first_line(error)} (--traceback shows where)")


def _config_path(argv: list[str]) -> str | None:
    """The ``--config`` file named in ``argv`` (without its ``:argument``), if any."""
    for index, argument in enumerate(argv):
        if argument.startswith("--config="):
            value = argument.split("=", 1)[1]
        elif argument == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        else:
            continue
        return value.split(":", 1)[0]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with every failure turned into one clear line: a missing config file,
    a config file that does not load, a bad ``--config.x.y=v`` override. The open-ended
    overrides are kept apart (ml_collections reads overrides from ``sys.argv`` and knows
    only the keys the config file set)."""
    argv, overrides = split_open_overrides(argv)
    sys.argv[:] = argv
    _OPEN_OVERRIDES.update(overrides)
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        _fail(f"--config: no such file: {path}")
    if path is not None:  # a fork's config imports the modules beside it
        sys.path.append(os.path.dirname(os.path.abspath(path)))
    try:
        return flags.FLAGS(argv)
    except Exception as error:
        if "--traceback" in argv:
            raise
        if isinstance(error, SyntaxError):
            _fail(f"--config: cannot load {path}: SyntaxError: {error.msg} (line "
                  f"{error.lineno})")
        if isinstance(error, ImportError | NameError | OSError):
            _fail(f"--config: cannot load {path}: {type(error).__name__}: "
                  f"{_first_line(error)}")
        if "Error whilst parsing config file" in str(error):  # get_config raised
            _fail(f"--config: cannot load {path}: {str(error).strip().splitlines()[-1]}")
        if isinstance(error, flags.Error):
            _fail(_first_line(error))
        text = " ".join(str(error).replace("\\n", "; ").replace("\\", "").replace("'", "")
                        .split())
        named = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")
                 and arg.split("=")[0].rsplit(".", 1)[-1] in text]
        _fail(f"{named[0] if named else '--config'}: unknown or invalid config override: "
              f"{text}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
