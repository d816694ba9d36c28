"""Checkpoints with Orbax: train state, data-iterator state and run metadata, atomically.

One checkpoint is a composite of three items under ``DIR/checkpoints/<step>/``:

* ``state``: the canonical (replicated) ``TrainState``, saved asynchronously and written
  collectively by all processes (``StandardSave``);
* ``data``: the training iterator's position, one file per process (grain's handler for
  grain iterators, JSON of ``get_state()`` for any other checkpointable iterator);
* ``meta``: the config and a few facts about the run (``JsonSave``).

Orbax writes into a temporary directory and renames it when complete, so a half-written
checkpoint (a run killed mid-save) is never listed, let alone restored. Which steps are
saved is decided by Orbax policies: every ``checkpoint_every`` steps, and at a preemption
sync point on multi-host jobs; the loop forces the final and the SIGTERM saves. The
preservation policy keeps the latest ``keep`` checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def _grain_args() -> tuple[type, type, tuple[type, ...]] | None:
    """Grain's Orbax args (save, restore) and its iterator types, if grain is installed."""
    try:
        import grain
    except ImportError:
        return None
    return (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore,
            (grain.DataLoaderIterator, grain.DatasetIterator))


@dataclasses.dataclass
class Restored:
    """What ``Checkpointer.restore`` returns."""

    step: int
    state: Any
    meta: dict[str, Any]


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for the training loop.

    Args:
      directory: where the step directories go (created if missing).
      checkpoint_every: save interval in steps (the save-decision policy).
      keep: how many of the latest checkpoints to keep.
      async_save: write the state in a background thread (the loop keeps training).
    """

    def __init__(self, directory: str | Path, *, checkpoint_every: int, keep: int,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        save_policy = policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(checkpoint_every), 1)),
            policies.PreemptionCheckpointingPolicy(),
        ])
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=save_policy,
            preservation_policy=policies.LatestN(max(int(keep), 1)),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._grain = _grain_args()

    # ----------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether the policies ask for a checkpoint at ``step`` (interval or preemption)."""
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
        returns, so the loop may keep drawing batches while the state is written.
        """
        if self._is_grain(data_iterator):
            data_args = self._grain[0](data_iterator)
        else:
            data_args = ocp.args.JsonSave(_iterator_state(data_iterator))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=data_args,
            meta=ocp.args.JsonSave(meta),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: Any, data_iterator: Any | None,
                step: int | None = None) -> Restored:
        """Restores ``step`` (default latest) onto the shardings in ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set,
        which is what lets a checkpoint from 4 devices restore on 1 or 8. The data
        iterator, when given, is moved to the saved position in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
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

    def wait(self) -> None:
        """Blocks until any background save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


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
