"""Fused CPU kernels, compiled on first use with the machine's C++ compiler.

XLA's CPU backend runs two reductions of one tensor as two passes over memory, so
``avgmax`` and ``catavgmax`` (a mean and a max of the same feature map) cost about twice
a single ``x.sum()``. ``mean_max.cc`` reads the map once and writes both, already in
catavgmax's ``[mean, max]`` layout and output dtype. It is an XLA FFI handler built
against the headers that ship with jaxlib (``jax.ffi.include_dir()``), so there is no build
step at install time: the first call compiles it (about 2 s) into a cache keyed by the
source, jaxlib, compiler and CPU, and later processes load the cached library.

When no compiler is found or the build fails, ``load()`` returns False, warns once, and
the pools fall back to two XLA reductions (same results up to summation order).

Environment:
  ``GAPJAX_NATIVE=0``      never build or use the kernels.
  ``GAPJAX_CACHE_DIR``     where compiled kernels live (default ``~/.cache/gapjax``,
                           or ``$XDG_CACHE_HOME/gapjax``).
  ``CXX``                  the compiler (default ``c++``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array

SOURCE = Path(__file__).with_name("mean_max.cc")
#: FFI target name -> exported handler symbol in the compiled library.
TARGETS = {"gapjax_mean_max": "GapjaxMeanMax", "gapjax_masked_mean_max": "GapjaxMaskedMeanMax"}
#: Input and output dtypes the kernel handles; others take the XLA path.
DTYPES = (jnp.float32, jnp.bfloat16)
#: Compiler flag sets tried in order: tuned for this CPU first, then portable.
FLAG_SETS = (
    ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"),
    ("-O3", "-std=c++17", "-shared", "-fPIC"),
)
COMPILE_TIMEOUT_S = 300


class BuildError(RuntimeError):
    """The kernel library could not be compiled."""


def enabled() -> bool:
    """False when ``GAPJAX_NATIVE`` is set to 0 / false / off."""
    return os.environ.get("GAPJAX_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if "GAPJAX_CACHE_DIR" in os.environ:
        return Path(os.environ["GAPJAX_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gapjax"


def _cpu_fingerprint() -> str:
    """The CPU model and feature flags, so that a shared cache never hands a library tuned
    with ``-march=native`` to a machine whose CPU lacks its instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")
        return "\n".join(sorted({line for line in lines if line.startswith(wanted)}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compiler() -> str:
    compiler = os.environ.get("CXX", "c++")
    path = shutil.which(compiler)
    if path is None:
        raise BuildError(f"no C++ compiler {compiler!r} on PATH (set CXX to choose one)")
    return path


def _compiler_version(compiler: str) -> str:
    run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    return run.stdout.splitlines()[0] if run.stdout else ""


def build(force: bool = False) -> Path:
    """Compiles ``mean_max.cc`` (or finds it in the cache) and returns the library path.

    The library is written under a temporary name and renamed into place, so processes
    that build at the same time never load a half-written file. Raises ``BuildError``.
    """
    compiler = _compiler()
    include = jax.ffi.include_dir()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([
        source, jax.__version__.encode(), str(include).encode(),
        _compiler_version(compiler).encode(), _cpu_fingerprint().encode(),
        repr(FLAG_SETS).encode(),
    ])).hexdigest()[:16]
    target = cache_dir() / f"mean_max-{key}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).info("gapjax: compiling %s into %s (once per machine)",
                                     SOURCE.name, target)
    errors = []
    for flags in FLAG_SETS:
        handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=target.parent)
        os.close(handle)
        command = [compiler, *flags, "-isystem", str(include), str(SOURCE), "-o", partial]
        try:
            run = subprocess.run(command, capture_output=True, text=True,
                                 timeout=COMPILE_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(partial, target)
                return target
            errors.append(f"{' '.join(flags)}: {run.stderr.strip()[-600:]}")
        except subprocess.TimeoutExpired:
            errors.append(f"{' '.join(flags)}: compiler ran over {COMPILE_TIMEOUT_S} s")
        finally:
            Path(partial).unlink(missing_ok=True)
    raise BuildError(f"compiling {SOURCE} failed:\n" + "\n".join(errors))


@functools.cache
def load() -> bool:
    """Builds (once per machine) and registers the kernels with XLA's CPU backend.

    True when ``mean_max`` is usable; False, after one warning, when it is not (or when
    ``GAPJAX_NATIVE=0``). Cached for the life of the process.
    """
    if not enabled():
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    except (BuildError, OSError, AttributeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"gapjax: the fused CPU mean+max kernel is unavailable ({error}); gmp, avgmax "
            "and catavgmax use XLA reductions instead (same results; avgmax and catavgmax "
            "about 2x slower on CPU). Set CXX to a C++17 compiler or GAPJAX_CACHE_DIR to a "
            "writable folder to fix it, or GAPJAX_NATIVE=0 to skip the build and this warning.",
            RuntimeWarning, stacklevel=2,
        )
        return False
    return True


def supports(sets: Array, dtype: Any) -> bool:
    """Whether ``mean_max`` can pool ``sets [B, N, C]`` into ``dtype`` here: float32 or
    bfloat16 in and out, CPU as the default backend, and the kernel built."""
    return (
        any(sets.dtype == d for d in DTYPES)
        and any(jnp.dtype(dtype) == d for d in DTYPES)
        and jax.default_backend() == "cpu"
        and load()
    )


def _ffi_mean_max(dtype: Any, sets: Array, *mask: Array) -> Array:
    """The kernel on this device's ``sets [B, N, C]`` (and ``mask [B, N]``)."""
    out = jax.ShapeDtypeStruct((sets.shape[0], 2, sets.shape[2]), dtype)
    target = "gapjax_masked_mean_max" if mask else "gapjax_mean_max"
    return jax.ffi.ffi_call(target, out)(sets, *mask)


def _batch_and_channel_axes(sharding: Any) -> tuple[Any, Any]:
    """Mesh axes over which ``sets [B, N, C]`` is split along B and C (None if not)."""
    spec = (*getattr(sharding, "spec", ()), None, None, None)
    return spec[0], spec[2]


def _output_sharding(mesh, arg_shapes, result_shape):
    batch, channels = _batch_and_channel_axes(arg_shapes[0].sharding)
    return NamedSharding(mesh, P(batch, None, channels))


def _partitioner(dtype: Any):
    def partition(mesh, arg_shapes, result_shape):
        # Sets and channels are independent, so each device pools its own block;
        # positions are reduced over, so each device needs all of them (N is gathered
        # if split).
        batch, channels = _batch_and_channel_axes(arg_shapes[0].sharding)
        inputs = (NamedSharding(mesh, P(batch, None, channels)),
                  NamedSharding(mesh, P(batch, None)))
        lower = functools.partial(_ffi_mean_max, dtype)
        return (mesh, lower, _output_sharding(mesh, arg_shapes, result_shape),
                inputs[:len(arg_shapes)])

    return partition


def _vmap_by_merging(fn: Callable[..., Array]) -> Callable[..., Array]:
    """``fn`` whose vmap folds the mapped axis into the batch axis: one kernel call."""
    fn = jax.custom_batching.custom_vmap(fn)

    @fn.def_vmap
    def _(axis_size, in_batched, *args):
        args = [arg if batched else jnp.broadcast_to(arg, (axis_size, *arg.shape))
                for arg, batched in zip(args, in_batched)]
        merged = fn(*[arg.reshape(-1, *arg.shape[2:]) for arg in args])
        return merged.reshape(axis_size, -1, *merged.shape[1:]), True

    return fn


@functools.cache
def _partitioned(masked: bool, dtype: Any) -> Callable[..., Array]:
    """The kernel as one op that jit partitions over a device mesh and vmap batches."""
    fn = custom_partitioning(functools.partial(_ffi_mean_max, dtype))
    rule = "b n c, b n -> b t c" if masked else "b n c -> b t c"
    fn.def_partition(infer_sharding_from_operands=_output_sharding,
                     partition=_partitioner(dtype), sharding_rule=rule)
    return _vmap_by_merging(fn)


def mean_max(sets: Array, mask: Array | None = None, dtype: Any = jnp.float32) -> Array:
    """One pass over ``sets [B, N, C]``: ``stats [B, 2, C]`` in ``dtype``, the mean
    (``stats[:, 0]``, float32 accumulation) and the max (``stats[:, 1]``) over real
    positions; both 0 for a set without real positions; a NaN at a real position makes the
    max NaN. ``stats.reshape(B, 2 * C)`` is catavgmax. Works under jit over a device mesh
    (each device pools its shard of sets), pmap and vmap; not differentiable on its own
    (see ``gapjax.pooling``). Call only where ``supports(sets, dtype)`` holds."""
    if not load():
        raise RuntimeError("gapjax.native.mean_max: the kernel is not available (GAPJAX_NATIVE=0 "
                           "or the build failed; see the warning); check supports() first")
    dtype = jnp.dtype(dtype)
    if mask is None:
        return _partitioned(False, dtype)(sets)
    return _partitioned(True, dtype)(sets, mask.astype(bool))
