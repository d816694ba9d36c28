"""Data parallelism over every device of every process: ``jit`` over a mesh, or ``pmap``.

Both modes keep one *canonical* train state: a pytree of global ``jax.Array``s replicated
over a 1-D ``Mesh`` named ``data``. That is what checkpoints hold, so a checkpoint written
in one mode or on one device count restores in any other (Orbax gets the target shardings).

* ``jit`` (default): the batch is sharded on its leading axis with
  ``NamedSharding(mesh, P("data"))`` and the state replicated; XLA partitions the step, and
  every reduction in it (the loss, BatchNorm statistics) covers the global batch.
* ``pmap``: the step runs per device under ``jax.pmap`` with ``axis_name="data"``; the
  state carries a leading device axis, the batch is ``[devices, per_device, ...]``, and the
  step psum-s its sums and gradients (BatchNorm gets ``axis_name`` from the model config).

Each process feeds only its own rows: ``global_batch`` assembles the global array from the
process-local NumPy batch with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gapjax.train.defaults import PARALLEL_MODES

AXIS = "data"


class BatchSizeError(ValueError):
    """The global batch size does not split evenly over processes and devices."""


def check_batch_size(batch_size: int, device_count: int, process_count: int) -> None:
    """Raises ``BatchSizeError`` unless ``batch_size`` splits evenly over the devices."""
    if batch_size <= 0 or batch_size % device_count or batch_size % process_count:
        multiple = int(np.lcm(device_count, process_count))
        raise BatchSizeError(
            f"config.batch_size={batch_size} is not divisible by the number of devices "
            f"({device_count} on {process_count} process(es)); choose a positive multiple "
            f"of {multiple}")


class DataParallel:
    """Places states and batches and compiles the steps for ``mode`` ("jit" | "pmap")."""

    def __init__(self, mode: str = "jit", devices: list[Any] | None = None):
        if mode not in PARALLEL_MODES:
            raise ValueError(
                f"config.parallel={mode!r} is not a parallel mode; choose one of: "
                f"{', '.join(PARALLEL_MODES)}")
        self.mode = mode
        self.devices = list(devices or jax.devices())
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.device_count = len(self.devices)
        self.local_device_count = sum(d.process_index == jax.process_index()
                                      for d in self.devices)
        self.axis_name = AXIS if mode == "pmap" else None

    # ----------------------------------------------------------------------------------
    # Sizes
    # ----------------------------------------------------------------------------------

    def local_batch_size(self, batch_size: int) -> int:
        """Rows this process feeds per step, after checking divisibility."""
        check_batch_size(batch_size, self.device_count, jax.process_count())
        return batch_size // jax.process_count()

    # ----------------------------------------------------------------------------------
    # Batches
    # ----------------------------------------------------------------------------------

    def global_batch(self, local_batch: dict[str, Any]) -> dict[str, Any]:
        """Process-local NumPy batch (leading axis = local rows) -> global device arrays.

        jit: ``[global_rows, ...]`` sharded over ``data``. pmap: ``[devices, per_device, ...]``
        with the device axis sharded, as pmap expects.
        """
        return jax.tree.map(self._global_leaf, local_batch)

    def _global_leaf(self, leaf: Any) -> jax.Array:
        leaf = np.asarray(leaf)
        processes = jax.process_count()
        if self.mode == "pmap":
            per_device = leaf.shape[0] // self.local_device_count
            local = leaf.reshape(self.local_device_count, per_device, *leaf.shape[1:])
            global_shape = (self.device_count, per_device, *leaf.shape[1:])
            return jax.make_array_from_process_local_data(self.sharded, local, global_shape)
        if leaf.ndim == 0 or leaf.shape[0] % self.local_device_count:
            # Leaves that are not per-row (e.g. padded graph node arrays of odd size) can
            # only be split when every process holds the same value: replicate them.
            if processes > 1:
                raise ValueError(
                    f"batch leaf of shape {leaf.shape} does not split over "
                    f"{self.local_device_count} local devices; multi-process runs need every "
                    "batch array to have a leading per-row axis")
            return jax.device_put(leaf, self.replicated)
        global_shape = (leaf.shape[0] * processes, *leaf.shape[1:])
        return jax.make_array_from_process_local_data(self.sharded, leaf, global_shape)

    # ----------------------------------------------------------------------------------
    # States: canonical (replicated) <-> step form
    # ----------------------------------------------------------------------------------

    def canonical_shardings(self, tree: Any) -> Any:
        """Replicated shardings for every leaf of ``tree`` (the checkpoint layout)."""
        return jax.tree.map(lambda _: self.replicated, tree)

    def abstract_canonical(self, tree: Any) -> Any:
        """``ShapeDtypeStruct``s with the canonical shardings, for restoring a checkpoint."""
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype,
                                              sharding=self.replicated), tree)

    def init(self, create: Callable[[], Any]) -> Any:
        """Runs ``create()`` (pure, no arguments) under jit, placing its result replicated."""
        shapes = jax.eval_shape(create)
        return jax.jit(create, out_shardings=self.canonical_shardings(shapes))()

    def to_step_form(self, state: Any) -> Any:
        """Canonical state -> what the compiled step takes (pmap: a leading device axis)."""
        if self.mode == "jit":
            return state
        count = self.device_count

        def stack(tree):
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (count, *x.shape)), tree)

        out = jax.tree.map(lambda _: self.sharded, state)
        return jax.jit(stack, out_shardings=out)(state)

    def to_canonical(self, state: Any) -> Any:
        """Step-form state -> canonical replicated state (for checkpoints and evaluation)."""
        if self.mode == "jit":
            return state
        out = self.canonical_shardings(state)
        return jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree), out_shardings=out)(state)

    # ----------------------------------------------------------------------------------
    # Compiled steps
    # ----------------------------------------------------------------------------------

    def compile(self, fn: Callable[..., Any], donate_argnums: tuple[int, ...] = ()
                ) -> Callable[..., Any]:
        """``fn(*arrays, axis_name=...)`` compiled: under pmap per device with
        ``axis_name="data"`` (its arrays in step form), else jitted with ``axis_name=None``.
        The train step donates the state, the eval step its sums."""
        if self.mode == "pmap":
            return jax.pmap(functools.partial(fn, axis_name=AXIS), axis_name=AXIS,
                            devices=self.devices, donate_argnums=donate_argnums)
        return jax.jit(functools.partial(fn, axis_name=None), donate_argnums=donate_argnums)

    def replicate(self, tree: Any) -> Any:
        """Host values -> step-form device values (replicated; stacked under pmap)."""
        placed = jax.device_put(tree, self.canonical_shardings(tree))
        return self.to_step_form(placed)

    # ----------------------------------------------------------------------------------
    # Reading values back
    # ----------------------------------------------------------------------------------

    def fetch(self, tree: Any) -> Any:
        """Step-form replicated values -> NumPy on this host (one device's copy)."""

        def one(x):
            data = np.asarray(x.addressable_data(0))
            return data[0] if self.mode == "pmap" else data

        return jax.tree.map(one, tree)

    def local_rows(self, x: jax.Array) -> np.ndarray:
        """A batch-sharded output (e.g. logits) -> this process's rows, in local batch order."""
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        data = np.concatenate([np.asarray(s.data) for s in shards], axis=0)
        if self.mode == "pmap":
            data = data.reshape(-1, *data.shape[2:])
        return data
