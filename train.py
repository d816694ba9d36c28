"""Train (or resume, or evaluate) one experiment: a thin CLI over ``gapjax.train.run``.

    python train.py --config configs/digits.py --workdir runs/digits
    python train.py --config configs/digits.py --workdir runs/digits --config.model.pool=gmp
    python train.py --config configs/digits.py --workdir runs/digits --eval_only

Multi-host (one command per host): add ``--coordinator_address=HOST:PORT
--num_processes=N --process_id=I``, or ``--multihost`` where the cluster environment
(TPU pod, SLURM) lets ``jax.distributed.initialize()`` find them itself.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/x.py:arg.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoint and exit.")
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax reports every save at INFO level; keep the console for progress and results.
    logging.set_verbosity(logging.WARNING)
    from gapjax.registry import UnknownNameError
    from gapjax.train import TrainingError, run

    user_errors = (UnknownNameError, TrainingError, ValueError, KeyError, FileNotFoundError)
    try:
        _initialize_distributed()
        run(_CONFIG.value, _WORKDIR.value, eval_only=_EVAL_ONLY.value)
    except user_errors as error:
        if _TRACEBACK.value:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with a bad ``--config.x.y=v`` override turned into one clear line
    (ml_collections raises it as a plain exception naming the key)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        text = str(error).replace("\\n", "; ").replace("\\", "").replace("'", "")
        message = " ".join(text.split())
        print(f"error: unknown or invalid config override: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
