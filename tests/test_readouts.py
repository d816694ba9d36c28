"""The readouts of ``gapjax.pool_statistics`` and ``gapjax.pool_learned`` on the registry.

Registry-wide properties (every ``POOLS`` name, the readouts included, each compiled once):
a masked set, the same data as an image and as graph segments read out the same; permuting
positions (or the nodes of a graph batch) changes nothing; masked padding holding inf,
-inf and the float32 extremes changes neither the result nor any gradient and gets zero
gradient; a set without real positions reads out zeros with finite gradients. Then the
readouts' own identities: numpy references, tie rules, limits, declared weights, errors,
and GIN taking them from its config. Parity with PyG is in test_readouts_pyg.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import graph, models, pooling
from gapjax.pooling import POOLS, make_pool
from gapjax.pooling import statistics as pool_statistics
from gapjax.pooling.statistics import SCALERS

READOUTS = ("std", "var", "min", "median", "softmax", "vpa", "multi", "pna", "set2set", "sort",
            "deepsets", "set_transformer", "gmt")

B, N, C = 4, 6, 4
IMAGE = (2, 3)  # H x W = N positions
FLOAT32 = np.finfo(np.float32)
GARBAGE = [np.inf, -np.inf, 1e30, -1e30, float(FLOAT32.max), float(FLOAT32.min)]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
#: Compilation dominates these tests on the CPU; the fusion emitters' compile time most.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def jit(fn, **kwargs):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


#: Options a pool needs to be built at all (PNA's training-set degree statistics) or on
#: C = 4 channels (MAP's heads), and richer settings of the learned readouts.
REQUIRED = {"pna": {"avg_log_degree": 1.3, "avg_degree": 3.0, "scalers": SCALERS},
            "map": {"num_heads": 2},
            # More than the defaults, so every block of these is exercised.
            "set2set": {"steps": 2, "num_layers": 2},
            "set_transformer": {"seeds": 2, "heads": 2},
            "gmt": {"k": 2, "heads": 2}}
#: Further configurations of the readouts.
VARIANTS = {
    "softmax_learned_per_channel": ("softmax", {"learn_t": True, "per_channel": True, "t": 0.5}),
    "sort_k_beyond_n": ("sort", {"k": 8}),
    "multi_with_options": ("multi", {"pools": ("sort", "gem"), "pools_kwargs": {"sort": {"k": 2}}}),
}
#: Not functions of a set: learned weights indexed by position (a layout's parameter, of
#: the layout's shape), and the class token (position 0 of a token sequence).
POSITIONAL = {"weighted", *(name for name in POOLS.names() if POOLS.get(name).reads_class_token)}
#: gapjax's own pools (other test modules register fork pools in the same process).
BUILT_IN = [name for name in POOLS.names() if POOLS.get(name).__module__.startswith("gapjax.")]
CASES = {**{name: (name, REQUIRED.get(name, {})) for name in BUILT_IN
            if name not in POSITIONAL}, **VARIANTS}


#: Readouts that see a set through normalised weights, order statistics or moments: a
#: repeated element changes nothing, so {a} and {a, a} read out the same (docs/readouts.md,
#: "injective on multisets").
MULTIPLICITY_BLIND = ("gap", "gmp", "avgmax", "catavgmax", "gem", "lse", "attention", "map",
                      "std", "var", "min", "median", "softmax", "multi", "set2set",
                      "set_transformer", "gmt")
#: Readouts that count: the sum and what is built on it, degree scalers, sorted rows.
COUNTING = ("gsp", "vpa", "pna", "deepsets", "sort", "multi_with_options")


def test_every_readout_is_registered():
    assert set(READOUTS) <= set(POOLS.names())
    for name in READOUTS:
        assert issubclass(POOLS.get(name), pooling.Pool)
        assert POOLS.get(name).weighting in pooling.WEIGHTINGS


def _data(seed: int):
    """Four blocks of ``B`` sets ``[4, B, N, C]`` and their ``masks [4, B, N]``: sets
    (rows: all real, some, one, none) whose masked positions hold inf, -inf and the float32
    extremes; the same with zeros there; the first block with its positions permuted; one
    vector ``a`` repeated: ``{a}``, ``{a, a}``, ``{a, a, a}``, ``{a} * N``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, N, C)).astype(np.float32)
    mask = np.zeros((B, N), bool)
    mask[0] = True
    mask[1, rng.permutation(N)[:4]] = True
    mask[2, rng.integers(N)] = True
    clean = np.where(mask[..., None], x, 0.0).astype(np.float32)
    garbage = np.where(mask[..., None], x, rng.choice(GARBAGE, size=x.shape)).astype(np.float32)
    order = rng.permutation(N)
    repeated = np.broadcast_to(x[0, 0], (B, N, C))
    copies = np.arange(N)[None, :] < np.asarray([1, 2, 3, N])[:, None]
    blocks = np.stack([garbage, clean, garbage[:, order], repeated])
    return blocks, np.stack([mask, mask, mask[:, order], copies])


def _readout_weights(out: jax.Array) -> jax.Array:
    """A fixed linear read-out, so each pool has one scalar loss."""
    return jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)


def _every_layout(module):
    """One jitted function: the pool's initial variables, and with them the readouts of the
    blocks of ``_data`` as masked sets, of the first block as an image and as graph
    segments (in node order and shuffled), with the gradients of a fixed linear read-out
    for the sets and the segments."""

    def loss(variables, x, mask):
        out = module.apply(variables, x, mask).astype(jnp.float32)
        return (out * _readout_weights(out)).sum(), out

    def segment_loss(variables, nodes, ids, node_mask):
        out = module.apply(variables, nodes, ids, B, node_mask, method="segment")
        out = out.astype(jnp.float32)
        return (out * _readout_weights(out)).sum(), out

    def run(key, blocks, masks, node_order):
        variables = module.init(key, blocks[1], masks[1])
        grad = jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0, 0))
        (param_grads, x_grads), sets = grad(variables, blocks, masks)
        nodes, node_mask = blocks[0].reshape(B * N, C), masks[0].ravel()
        ids = jnp.repeat(jnp.arange(B), N)
        segment_grad = jax.vmap(jax.grad(segment_loss, argnums=(0, 1), has_aux=True),
                                in_axes=(None, 0, 0, 0))
        (segment_param_grads, node_grads), segments = segment_grad(
            variables, jnp.stack([nodes, nodes[node_order]]), jnp.stack([ids, ids[node_order]]),
            jnp.stack([node_mask, node_mask[node_order]]))
        image = module.apply(variables, blocks[0].reshape(B, *IMAGE, C),
                             masks[0].reshape(B, *IMAGE))
        return {"sets": sets, "x_grads": x_grads, "param_grads": param_grads,
                "segments": segments, "node_grads": node_grads[0],
                "segment_param_grads": segment_param_grads, "image": image}

    return jit(run)


def _finite(tree) -> bool:
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(tree))


def _block(tree, index: int):
    return jax.tree.map(lambda leaf: leaf[index], tree)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pool_reads_out_sets_images_and_graphs_alike(case):
    name, options = CASES[case]
    module = make_pool(name, **options)
    run = _every_layout(module)
    for seed in (0, 1):  # the second seed reuses the compiled program
        blocks, masks = _data(seed)
        node_order = np.random.default_rng(seed).permutation(B * N)
        out = jax.tree.map(np.asarray, run(jax.random.key(seed), blocks, masks, node_order))
        garbage, clean, permuted, repeated = out["sets"]
        assert clean.shape == (B, module.output_width(C)), case
        assert np.isfinite(out["sets"]).all() and np.abs(clean[0]).max() > 0, case
        # Garbage behind the mask, another position order, the image and graph layouts,
        # another node order: the same readout (sort: up to ties, and there are none).
        for label, got in (("garbage", garbage), ("permuted", permuted), ("image", out["image"]),
                           ("segments", out["segments"][0]),
                           ("shuffled segments", out["segments"][1])):
            np.testing.assert_allclose(got.reshape(clean.shape), clean, **TOLERANCE,
                                       err_msg=f"{case}: {label}")
        # A set without real positions reads out zeros.
        np.testing.assert_array_equal(clean[3], 0.0, err_msg=case)
        # {a}, {a, a}, ...: the same readout unless the pool counts.
        kind = case if case in COUNTING + MULTIPLICITY_BLIND else name
        if kind in COUNTING:
            assert (np.abs(repeated[1:] - repeated[0]).max(axis=1) > 1e-3).all(), case
        elif kind in MULTIPLICITY_BLIND:
            np.testing.assert_allclose(repeated[1:], np.broadcast_to(repeated[0], (B - 1,
                                       repeated.shape[1])), **TOLERANCE, err_msg=case)
        # Gradients: finite everywhere; zero on masked positions (and on the empty set);
        # the same with or without garbage, in the set and in the segment form.
        for key in ("x_grads", "param_grads", "node_grads", "segment_param_grads"):
            assert _finite(out[key]), f"{case}: {key}"
        garbage_grads, clean_grads = out["x_grads"][:2]
        hidden = ~masks[0]
        assert np.abs(garbage_grads[hidden]).max() == 0.0, case
        assert np.abs(out["node_grads"][hidden.ravel()]).max() == 0.0, case
        np.testing.assert_allclose(garbage_grads, clean_grads, **TOLERANCE, err_msg=case)
        np.testing.assert_allclose(out["node_grads"], clean_grads.reshape(B * N, C),
                                   **TOLERANCE, err_msg=case)
        reference = _block(out["param_grads"], 1)
        for label, other in (("garbage", _block(out["param_grads"], 0)),
                             ("segments", _block(out["segment_param_grads"], 0))):
            for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(reference)):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                                           err_msg=f"{case}: {label} parameter gradients")


# --------------------------------------------------------------------------------------
# The readouts' own identities
# --------------------------------------------------------------------------------------


def _reference(name: str, real: np.ndarray, **options) -> np.ndarray:
    """What each parameter-free readout means, on the real positions ``[n, C]`` (float64)."""
    n = len(real)
    if n == 0:
        return np.zeros(real.shape[-1] * options.get("k", 1))
    if name == "std":
        return real.std(axis=0)
    if name == "var":
        return real.var(axis=0)
    if name == "min":
        return real.min(axis=0)
    if name == "median":
        return np.sort(real, axis=0)[(n - 1) // 2]
    if name == "vpa":
        return real.sum(axis=0) / np.sqrt(n)
    if name == "softmax":
        scores = options["t"] * real
        weights = np.exp(scores - scores.max(axis=0))
        return (weights / weights.sum(axis=0) * real).sum(axis=0)
    if name == "sort":
        rows = real[np.argsort(-real[:, -1], kind="stable")][: options["k"]]
        return np.pad(rows, ((0, options["k"] - len(rows)), (0, 0))).ravel()
    raise KeyError(name)


PURE = {"std": {}, "var": {}, "min": {}, "median": {}, "vpa": {}, "softmax": {"t": 1.7},
        "sort": {"k": 3}}


def test_pure_functions_and_modules_equal_their_definitions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 2, 4, 5)).astype(np.float32)  # two spatial axes
    mask = rng.random((3, 2, 4)) < 0.6
    mask[0], mask[2] = True, False

    @jit
    def both(x, mask):
        functions = {name: pooling.pool(name, x, mask, **kw) for name, kw in PURE.items()}
        modules = {name: make_pool(name, **kw).apply({}, x, mask) for name, kw in PURE.items()}
        return functions, modules

    functions, modules = jax.tree.map(np.asarray, both(x, mask))
    for name, options in PURE.items():
        np.testing.assert_array_equal(functions[name], modules[name], err_msg=name)
        for row in range(3):
            want = _reference(name, x[row][mask[row]].astype(np.float64), **options)
            np.testing.assert_allclose(functions[name][row], want, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} row {row}")


def test_multi_and_pna_are_their_members_concatenated_and_scaled():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 5, 2)), jnp.float32)
    mask = jnp.asarray([[True] * 5, [True, True, False, False, False], [True] + [False] * 4])
    statistics = {"avg_log_degree": 1.1, "avg_degree": 2.5}
    pna_module = make_pool("pna", scalers=SCALERS, **statistics)

    @jit
    def compute(x, mask):
        members = [pooling.pool(name, x, mask) for name in ("mean", "min", "max", "std")]
        return {"multi": pool_statistics.multi(x, "mean,max,std", mask=mask),
                "multi_by_name": pooling.pool("multi", x, mask, pools=("softmax", "min"),
                                              pools_kwargs={"softmax": {"t": 0.0}}),
                "members": members,
                "pna": pool_statistics.pna(x, scalers=SCALERS, mask=mask, **statistics),
                "pna_module": pna_module.apply({}, x, mask)}

    out = jax.tree.map(np.asarray, compute(x, mask))
    mean, smallest, largest, spread = out["members"]
    np.testing.assert_array_equal(out["multi"], np.concatenate([mean, largest, spread], -1))
    # Options reach the members: softmax at t = 0 is the mean.
    np.testing.assert_allclose(out["multi_by_name"], np.concatenate([mean, smallest], -1),
                               rtol=1e-6, atol=1e-7)
    aggregated = np.concatenate([mean, smallest, largest, spread], -1)
    n = np.asarray([[5.0], [2.0], [1.0]])
    log_degree, degree = statistics["avg_log_degree"], statistics["avg_degree"]
    want = np.concatenate([aggregated, aggregated * np.log(n + 1) / log_degree,
                           aggregated * log_degree / np.log(n + 1), aggregated * n / degree,
                           aggregated * degree / n], -1)
    np.testing.assert_allclose(out["pna"], want, rtol=1e-6)
    np.testing.assert_array_equal(out["pna_module"], out["pna"])
    assert pna_module.output_width(2) == 5 * 4 * 2


def test_tie_rules_and_the_lower_median():
    # Channel 0: the minimum 1.0 twice (positions 1 and 3); channel 1: 2.0 three times.
    x = np.array([[[4.0, 2.0], [1.0, 2.0], [3.0, 2.0], [1.0, 7.0]]], np.float32)
    nodes, ids = x[0], np.zeros(4, np.int32)

    def grads(fn):
        return jax.grad(lambda x: fn(x).sum())

    @jit
    def compute(x, nodes):
        module = {name: make_pool(name) for name in ("min", "median", "std")}
        return {
            "min": grads(pool_statistics.gmin)(x),
            "median": grads(pool_statistics.median)(x),
            "median_value": pool_statistics.median(x),
            "segment_min": grads(lambda v: module["min"].segment(v, ids, 1))(nodes),
            "segment_median": grads(lambda v: module["median"].segment(v, ids, 1))(nodes),
            "std_one": grads(pool_statistics.std)(x[:, :1]),
            "segment_std_one": grads(lambda v: module["std"].segment(v, ids[:1], 1))(nodes[:1]),
        }

    out = jax.tree.map(np.asarray, compute(x, nodes))
    # Channel 1's minimum 2.0 ties at positions 0, 1 and 2: the first takes the gradient.
    np.testing.assert_array_equal(out["min"][0], [[0, 1], [1, 0], [0, 0], [0, 0]])
    # Sorted channel 0: 1 (pos 1), 1 (pos 3), 3, 4 -> rank (4 - 1) // 2 = 1 is position 3;
    # channel 1: 2, 2, 2, 7 (positions 0, 1, 2, 3) -> rank 1 is position 1.
    np.testing.assert_array_equal(out["median_value"], [[1.0, 2.0]])
    np.testing.assert_array_equal(out["median"][0], [[0, 0], [0, 1], [0, 0], [1, 0]])
    np.testing.assert_array_equal(out["segment_min"], out["min"][0])
    np.testing.assert_array_equal(out["segment_median"], out["median"][0])
    # The std of one position is 0, with a zero (not NaN) gradient.
    np.testing.assert_array_equal(out["std_one"], 0.0)
    np.testing.assert_array_equal(out["segment_std_one"], 0.0)


def test_softmax_spans_mean_max_and_min():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 7, 3)), jnp.float32)
    t = jnp.asarray([0.0, 200.0, -200.0])  # per channel: mean, max, min

    @jit
    def compute(x):
        return (pool_statistics.softmax(x, t), pooling.gap(x), pooling.gmp(x),
                pool_statistics.gmin(x))

    pooled, mean, largest, smallest = map(np.asarray, compute(x))
    np.testing.assert_allclose(pooled[:, 0], mean[:, 0], rtol=1e-6)
    np.testing.assert_allclose(pooled[:, 1], largest[:, 1], rtol=1e-4)
    np.testing.assert_allclose(pooled[:, 2], smallest[:, 2], rtol=1e-4)


def test_declared_weights_of_the_readouts_rebuild_them():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 4, 5, 6)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 4, 5)) < 0.6).at[0, 0, 0].set(True).at[2].set(False)
    cases = {name: {} for name in READOUTS if POOLS.get(name).weighting}
    cases["softmax"] = {"learn_t": True, "per_channel": True, "t": 2.0}
    assert {"min", "median", "softmax", "vpa"} <= set(cases)

    @jit
    def compute(x, mask):
        out = {}
        for name, options in cases.items():
            module = make_pool(name, **options)
            variables = module.init(jax.random.key(0), x, mask)
            out[name] = module.apply(variables, x, mask, return_weights=True)
        return out

    for name, (pooled, weights) in jax.tree.map(np.asarray, compute(x, mask)).items():
        channel = POOLS.get(name).weighting == "channel"
        assert weights.shape == (x.shape if channel else x.shape[:-1]), name
        full = weights if channel else weights[..., None]
        np.testing.assert_allclose((full * np.asarray(x)).sum(axis=(1, 2)), pooled, rtol=1e-5,
                                   atol=1e-6, err_msg=name)
        assert np.abs(weights[~np.asarray(mask)]).max() == 0.0, name
        if name in ("min", "median", "softmax"):  # a distribution over each channel
            np.testing.assert_allclose(full.sum(axis=(1, 2))[:2], 1.0, rtol=1e-6)
            np.testing.assert_array_equal(full[2], 0.0)



def test_bfloat16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(7)
    low = jnp.asarray(rng.normal(size=(2, 64, 3)), jnp.bfloat16)

    @jit
    def compute(low):
        high = low.astype(jnp.float32)  # the same values
        return {name: (pooling.pool(name, low, **kw), pooling.pool(name, high, **kw))
                for name, kw in PURE.items()}

    for name, (out, want) in compute(low).items():
        assert out.dtype == jnp.bfloat16, name
        # Only the final rounding to bfloat16 (8 bits of mantissa) differs.
        np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2**-8, atol=1e-6,
                                   err_msg=name)


def test_options_are_checked_with_one_clear_line():
    x = jnp.ones((2, 3, 4))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"pna: avg_log_degree is required by the scalers "
                                         r"\['amplification', 'attenuation'\]"):
        make_pool("pna").init(key, x)
    with pytest.raises(ValueError, match=r"pna: avg_degree is required by the scalers "
                                         r"\['linear'\]"):
        make_pool("pna", scalers=("identity", "linear")).init(key, x)
    with pytest.raises(ValueError, match=r"pna: scalers: 'log' is not valid; choose from: "
                                         r"'identity'"):
        make_pool("pna", scalers="identity,log").init(key, x)
    with pytest.raises(ValueError, match=r"pna: avg_log_degree=-1.0 is not valid"):
        make_pool("pna", avg_log_degree=-1.0).init(key, x)
    with pytest.raises(KeyError, match=r"multi: pools: unknown pool 'maen'.*did you mean 'mean'"):
        make_pool("multi", pools=("maen", "max")).init(key, x)
    with pytest.raises(ValueError, match=r"multi: pools_kwargs names pools \['gem'\]"):
        make_pool("multi", pools=("mean",), pools_kwargs={"gem": {"p": 2}}).init(key, x)
    with pytest.raises(ValueError, match=r"pool 'gem' has no option 'q'"):
        make_pool("multi", pools=("gem",), pools_kwargs={"gem": {"q": 2}}).output_width(4)
    with pytest.raises(ValueError, match=r"sort: k=0 is not valid; it must be an integer >= 1"):
        make_pool("sort", k=0).output_width(4)
    with pytest.raises(ValueError, match=r"softmax: t must be a scalar or have shape "
                                         r"\[channels\] = \[4\]"):
        pool_statistics.softmax(x, jnp.ones(3))
    with pytest.raises(ValueError, match=r"channels=4 must be divisible by heads=3"):
        make_pool("set_transformer", heads=3).init(key, x)
    with pytest.raises(ValueError, match=r"set2set: steps=0 is not valid"):
        make_pool("set2set", steps=0).init(key, x)
    with pytest.raises(ValueError, match=r"deepsets: features=3 needs global_layers >= 1"):
        make_pool("deepsets", features=3, global_layers=0).init(key, x)
    with pytest.raises(ValueError, match=r"pna_degree_statistics: histogram must be"):
        pool_statistics.pna_degree_statistics([0, 0])


def test_readout_widths_and_graph_readout_take_the_options():
    assert graph.readout_width("sort", 5, k=3) == 15
    assert graph.readout_width("set2set", 5) == 10
    assert graph.readout_width("set_transformer", 5, seeds=3) == 15
    assert graph.readout_width("set_transformer", 5, seeds=3, concat=False) == 5
    assert graph.readout_width("multi", 5, pools="mean,sort", pools_kwargs={"sort": {"k": 2}}) == 15
    assert graph.readout_width("deepsets", 5, hidden=7) == 7
    assert graph.readout_width("deepsets", 5, hidden=7, features=3) == 3
    assert graph.readout_width("pna", 5, avg_log_degree=1.0) == 3 * 4 * 5


def test_gin_reads_out_with_any_readout_from_its_config():
    rng = np.random.default_rng(8)
    graphs = [{"node_features": rng.integers(0, 3, size=n),
               "senders": rng.integers(0, n, size=2 * n), "receivers": rng.integers(0, n, 2 * n)}
              for n in (4, 1, 6)]
    batch = graph.batch_graphs(graphs, node_budget=16, edge_budget=32, graph_budget=4)
    # One model whose readout holds parameter-free, degree-scaled and learned readouts; the
    # pool names come as the command line gives them (a comma-separated string).
    model = models.get(
        "gin", num_classes=3, num_colors=3, num_layers=1, hidden=5,
        pool="multi", pool_kwargs={
            "pools": "median,pna,set2set", "pools_kwargs": {"pna": {"avg_log_degree": 1.2}}})
    logits, variables = jit(model.init_with_output)(jax.random.key(0), batch)
    assert logits.shape == (4, 3) and np.isfinite(np.asarray(logits)).all()
    assert "members_2" in variables["params"]["readout"]  # set2set's parameters
    width = 3 + 5  # jumping knowledge: the one-hot colours and one layer
    # median, PNA (3 scalers x 4 aggregators), set2set (2C).
    assert variables["params"]["hidden"]["kernel"].shape[0] == width * (1 + 12 + 2)
