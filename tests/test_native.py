"""The fused CPU mean+max kernel (gapjax/native) against the XLA reductions it replaces."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import native, pooling

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def xla_mean_max(sets, mask, dtype=jnp.float32):
    """What the kernel must equal: masked mean and max as XLA computes them."""
    return pooling._xla_mean_and_peak(sets, mask, dtype)


def test_kernel_builds_and_registers_on_this_machine():
    # CI machines carry a C++ compiler; without the kernel avgmax/catavgmax are ~2x slower.
    assert native.load(), "gapjax.native.load() failed; see the RuntimeWarning above"
    assert native.supports(jnp.zeros((1, 2, 3), jnp.float32), jnp.bfloat16)
    assert native.supports(jnp.zeros((1, 2, 3), jnp.bfloat16), jnp.float32)
    assert not native.supports(jnp.zeros((1, 2, 3), jnp.float16), jnp.float32)
    assert not native.supports(jnp.zeros((1, 2, 3), jnp.float32), jnp.float16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 7, 3), (3, 8, 64), (5, 9, 65), (1, 17, 1000),
                                   (1, 9, 259), (2, 196, 300), (40, 12, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_equals_xla_reductions(dtype, out_dtype, shape, masked):
    # Shapes cover: fewer positions than a group of eight and remainders after groups;
    # channel counts that do and do not split into per-thread blocks (259: odd blocks, and
    # an even-width last block starting at an odd channel, for bfloat16 word pairs); batches
    # smaller and larger than the thread count.
    sets = jnp.asarray(RNG.normal(size=shape) * 3, dtype)
    mask = None
    if masked:
        mask = jnp.asarray(RNG.random(shape[:2]) < 0.6).at[0].set(False)  # row 0 empty
    stats = jax.jit(native.mean_max, static_argnums=2)(sets, mask, out_dtype)
    want = jax.jit(xla_mean_max, static_argnums=2)(sets, mask, out_dtype)
    assert stats.dtype == out_dtype and stats.shape == (shape[0], 2, shape[2])
    np.testing.assert_array_equal(stats[:, 1], want[:, 1])  # max is exact in any order
    # Means agree up to summation order, then rounding to the output dtype (bfloat16
    # results may land one bfloat16 step apart).
    tolerance = 1e-5 if out_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(stats[:, 0], np.float32),
                               np.asarray(want[:, 0], np.float32), rtol=tolerance, atol=tolerance)
    if masked:
        np.testing.assert_array_equal(stats[0], 0.0)


def test_kernel_rounds_to_bfloat16_like_xla():
    # Values that sit exactly between two bfloat16 numbers (ties go to even), just off a
    # tie, and NaN: the kernel's float32 -> bfloat16 store must round as XLA's convert.
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F80FFFF, 0x7F7FFFFF, 0xBF808000],
                    np.uint32)
    values = bits.view(np.float32)
    sets = jnp.asarray(np.stack([values, values]))[None]  # [1, 2, 6]: mean == max == value
    stats = native.mean_max(sets, None, jnp.bfloat16)
    want = jnp.asarray(values).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(stats[0, 1]).view(np.uint16),
                                  np.asarray(want).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(stats[0, 0]).view(np.uint16),
                                  np.asarray(want).view(np.uint16))
    nan = native.mean_max(jnp.full((1, 3, 2), jnp.nan), None, jnp.bfloat16)
    assert np.isnan(np.asarray(nan, np.float32)).all()


def test_kernel_nan_and_inf_follow_xla_max():
    nan, inf = np.nan, np.inf
    # One set of three positions, the middle one masked; by channel: a NaN at a real
    # position; a NaN only at the masked position; +inf and -inf at real positions (sum
    # NaN, max +inf); all -inf; plain values.
    columns = [[nan, 7.0, 0.0], [5.0, nan, 1.0], [inf, 0.0, -inf], [-inf] * 3, [2.0, 3.0, -1.0]]
    values = jnp.asarray(np.array(columns, np.float32).T[None])  # [1, 3, 5]
    mask = jnp.asarray([[True, False, True]])
    for m in (None, mask):
        np.testing.assert_array_equal(native.mean_max(values, m), xla_mean_max(values, m))
    stats = native.mean_max(values, mask)
    np.testing.assert_array_equal(stats[0, 1], [nan, 5.0, inf, -inf, 2.0])
    np.testing.assert_array_equal(stats[0, 0], [nan, 3.0, nan, -inf, 0.5])


def test_kernel_under_vmap_matches_per_example_calls():
    sets = jnp.asarray(RNG.normal(size=(4, 3, 10, 5)), jnp.float32)
    mask = jnp.asarray(RNG.random((4, 3, 10)) < 0.5)
    batched = jax.vmap(native.mean_max)(sets, mask)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], native.mean_max(sets[i], mask[i]))


def test_masked_avgmax_gradient_is_uniform_plus_first_peak():
    x = jnp.asarray([[[3.0], [9.0], [9.0], [1.0], [9.0]]], jnp.float32)
    mask = jnp.asarray([[True, False, True, True, True]])  # the first 9.0 is padding
    grads = jax.grad(lambda x: pooling.catavgmax(x, mask).sum())(x)
    # mean: 1/4 at each real position; max: 1 at the first real 9.0 (position 2)
    np.testing.assert_allclose(grads[0, :, 0], [0.25, 0.0, 1.25, 0.25, 0.25], rtol=1e-6)
    grads = jax.grad(lambda x: pooling.avgmax(x, jnp.zeros_like(mask)).sum())(x)
    np.testing.assert_array_equal(grads, 0.0)  # empty rows: zeros, finite gradients


def test_enabled_reads_gapjax_native(monkeypatch):
    for value, expected in [("0", False), ("off", False), ("1", True), ("", True)]:
        monkeypatch.setenv("GAPJAX_NATIVE", value)
        assert native.enabled() is expected


def test_build_caches_atomically_and_names_a_missing_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("GAPJAX_CACHE_DIR", str(tmp_path))
    library = native.build()
    assert library.parent == tmp_path and library.stat().st_size > 0
    assert native.build() == library  # the second call is a cache hit
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no partial files left
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(native.BuildError, match="no-such-compiler-xyz"):
        native.build()


def test_without_a_compiler_pools_fall_back_with_one_warning(tmp_path):
    script = textwrap.dedent("""
        import warnings
        import jax.numpy as jnp, numpy as np
        from gapjax import native, pooling
        x = jnp.asarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = pooling.avgmax(x)
            pooling.catavgmax(x)
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert len(messages) == 1 and "no-such-compiler" in messages[0], messages
        assert not native.load()
        np.testing.assert_allclose(out, (x.mean(1) + x.max(1)) / 2)
        print("ok")
    """)
    env = {**os.environ, "CXX": "no-such-compiler", "GAPJAX_CACHE_DIR": str(tmp_path),
           "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_kernel_partitions_over_a_device_mesh_and_runs_under_pmap():
    # Each device pools its own shard of sets: no all-gather of the feature map, and the
    # same per-set arithmetic as on one device, so results are bitwise equal.
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from gapjax import native, pooling
        assert native.load() and jax.device_count() == 4
        mesh = Mesh(np.array(jax.devices()), ("data",))
        x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 48))
        mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.5, (8, 5, 5))
        def step(x, mask):
            sets = x.reshape(8, 25, 48)
            grads = jax.grad(lambda x: pooling.avgmax(x, mask).sum())(x)
            return native.mean_max(sets, mask.reshape(8, 25)), pooling.catavgmax(x, mask), grads
        single = jax.jit(step)(x, mask)
        shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
        compiled = jax.jit(step).lower(shard(x), shard(mask)).compile()
        assert "all-gather" not in compiled.as_text()
        assert "gapjax_masked_mean_max" in compiled.as_text()
        split = compiled(shard(x), shard(mask))
        assert split[1].sharding.spec == P("data")
        # The kernel's means and maxima, and so the pools, are bitwise equal; XLA may
        # fuse the gradient's division by the counts differently (1 ulp).
        for a, b in zip(split[:2], single[:2]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(split[2], single[2], rtol=3e-7, atol=1e-7)
        mapped = jax.pmap(native.mean_max)(x.reshape(4, 2, 25, 48))
        np.testing.assert_array_equal(mapped.reshape(8, 2, 48),
                                      native.mean_max(x.reshape(8, 25, 48)))
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_kernel_under_nested_vmap_and_grad():
    x = jnp.asarray(RNG.normal(size=(6, 4, 9)), jnp.float32)
    mask = jnp.asarray(RNG.random((6, 4)) < 0.7)
    direct = pooling.avgmax(x, mask)
    nested = jax.vmap(jax.vmap(pooling.avgmax))(x.reshape(2, 3, 1, 4, 9), mask.reshape(2, 3, 1, 4))
    np.testing.assert_array_equal(nested.reshape(6, 9), direct)
    loss = lambda x, m: pooling.avgmax(x, m).sum()
    per_example = jax.vmap(jax.grad(loss))(x[:, None], mask[:, None])
    np.testing.assert_array_equal(per_example[:, 0], jax.grad(loss)(x, mask))
