"""Readouts against PyG (torch_geometric 2.8.1 ``nn.aggr``) on random graphs.

Parameter-free readouts equal PyG's aggregation of the same meaning on every graph of a
batch that holds a one-node graph and an empty graph. Learned readouts equal PyG's module
on the same weights: PyG's randomly initialised parameters (all perturbed, so no bias is
trivially zero) are ported into the Flax variables, and every non-empty graph agrees to
1e-5. Where PyG differs, the test says so:

* an empty graph: gapjax reads out zeros for every readout; PyG's parameter-free
  aggregations give zeros too, but its learned ones give a constant (Set2Set the LSTM
  state ``[q, 0]``, DeepSets ``global_nn(0)``, the set transformers their decoded seeds);
* ``std``: PyG returns 0 below ``sqrt(1e-5)``; gapjax is exact (no such std occurs here
  except the one-node graph's, where both give 0).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from gapjax import graph
from gapjax.pooling import make_pool
from gapjax.pooling import statistics as pool_statistics

torch = pytest.importorskip("torch")
aggr = pytest.importorskip("torch_geometric.nn.aggr")

SIZES = (3, 1, 0, 5, 2, 4)  # graph 1 has one node, graph 2 none
EMPTY = 2
NUM_GRAPHS = len(SIZES)
C = 4
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
#: Compilation dominates these tests on the CPU; the fusion emitters' compile time most.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def random_batch(seed: int = 0, channels: int = C) -> tuple[np.ndarray, np.ndarray]:
    """Node features ``[N, C]`` and a sorted graph index ``[N]`` (PyG's dense batching of
    sort / set transformer needs it sorted)."""
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(NUM_GRAPHS), SIZES)
    return rng.normal(size=(len(index), channels)).astype(np.float32), index


def pyg_readout(module, x: np.ndarray, index: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(x), torch.from_numpy(index), dim_size=NUM_GRAPHS)
    return out.numpy()


def gapjax_readout(name: str, x: np.ndarray, index: np.ndarray, **options) -> np.ndarray:
    readout = functools.partial(graph.readout, name, num_graphs=NUM_GRAPHS, **options)
    return np.asarray(jax.jit(readout, compiler_options=FAST_COMPILE)(x, index))


# --------------------------------------------------------------------------------------
# Parameter-free readouts
# --------------------------------------------------------------------------------------

HISTOGRAM = np.bincount([3, 1, 5, 2, 4, 4, 6, 3])  # graph sizes of a "training set"

PARAMETER_FREE = {
    "std": ({}, lambda: aggr.StdAggregation()),
    "var": ({}, lambda: aggr.VarAggregation()),
    "min": ({}, lambda: aggr.MinAggregation()),
    "median": ({}, lambda: aggr.MedianAggregation()),
    "softmax": ({"t": 2.0}, lambda: aggr.SoftmaxAggregation(t=2.0)),
    "softmax_negative_t": ({"t": -0.7}, lambda: aggr.SoftmaxAggregation(t=-0.7)),
    "vpa": ({}, lambda: aggr.VariancePreservingAggregation()),
    "sort": ({"k": 3}, lambda: aggr.SortAggregation(k=3)),
    "sort_k_beyond_sizes": ({"k": 7}, lambda: aggr.SortAggregation(k=7)),
    "multi": ({}, lambda: aggr.MultiAggregation(["mean", "max", "std"])),
    "multi_with_options": (
        {"pools": ("softmax", "min", "sum"), "pools_kwargs": ({"t": 0.5}, {}, {})},
        lambda: aggr.MultiAggregation(["softmax", "min", "sum"],
                                      aggrs_kwargs=[{"t": 0.5}, {}, {}])),
    "pna": (
        {"scalers": pool_statistics.SCALERS,
         **pool_statistics.pna_degree_statistics(HISTOGRAM)},
        lambda: aggr.DegreeScalerAggregation(
            ["mean", "min", "max", "std"], list(pool_statistics.SCALERS),
            torch.from_numpy(HISTOGRAM))),
}


@pytest.mark.parametrize("case", sorted(PARAMETER_FREE))
def test_parameter_free_readouts_equal_pyg(case):
    options, reference = PARAMETER_FREE[case]
    name = case.split("_")[0]
    x, index = random_batch(1)
    ours = gapjax_readout(name, x, index, **options)
    theirs = pyg_readout(reference(), x, index)
    assert ours.shape == theirs.shape == (NUM_GRAPHS, make_pool(name, **options).output_width(C))
    # Every graph, the empty one included (PyG fills it with zeros as well).
    np.testing.assert_allclose(ours, theirs, **TOLERANCE, err_msg=case)
    np.testing.assert_array_equal(ours[EMPTY], 0.0)
    if name in ("std", "var"):
        np.testing.assert_array_equal(ours[1], 0.0)  # one node: no spread


def test_pna_degree_statistics_are_pygs():
    statistics = pool_statistics.pna_degree_statistics(HISTOGRAM)
    module = aggr.DegreeScalerAggregation("mean", "identity", torch.from_numpy(HISTOGRAM))
    # PyG takes the logarithms in float32; these are float64.
    np.testing.assert_allclose(statistics["avg_degree"], module.init_avg_deg_lin, rtol=1e-7)
    np.testing.assert_allclose(statistics["avg_log_degree"], module.init_avg_deg_log,
                               rtol=1e-6)


# --------------------------------------------------------------------------------------
# Learned readouts: PyG's weights ported into the Flax variables
# --------------------------------------------------------------------------------------


def perturbed(module, seed: int):
    """PyG's module with every parameter moved off its initial value (biases start at 0,
    norms at 1): ``0.5 * N(0, 1)`` added, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def array(tensor) -> np.ndarray:
    return tensor.detach().numpy().astype(np.float32)


def dense(linear) -> dict:
    return {"kernel": array(linear.weight).T, "bias": array(linear.bias)}


def layer_norm(norm) -> dict:
    return {"scale": array(norm.weight), "bias": array(norm.bias)}


def attention_block(block) -> dict:
    """PyG's ``MultiheadAttentionBlock`` -> ``pool_learned.MultiheadAttentionBlock``."""
    weights = np.split(array(block.attn.in_proj_weight), 3)
    biases = np.split(array(block.attn.in_proj_bias), 3)
    params = {name: {"kernel": w.T, "bias": b}
              for name, w, b in zip(("query", "key", "value"), weights, biases)}
    params["out"] = dense(block.attn.out_proj)
    params["lin"] = dense(block.lin)
    if block.layer_norm1 is not None:
        params["norm1"] = layer_norm(block.layer_norm1)
        params["norm2"] = layer_norm(block.layer_norm2)
    return params


def pooling_block(pma) -> dict:
    return {"lin": dense(pma.lin), "seed": array(pma.seed)[0], "mab": attention_block(pma.mab)}


def port_set_transformer(module) -> dict:
    params = {f"encoders_{i}": attention_block(sab.mab) for i, sab in enumerate(module.encoders)}
    params.update({f"decoders_{i}": attention_block(sab.mab)
                   for i, sab in enumerate(module.decoders)})
    params["pma"] = pooling_block(module.pma)
    return params


def port_gmt(module) -> dict:
    params = {f"encoders_{i}": attention_block(sab.mab) for i, sab in enumerate(module.encoders)}
    params["pma1"] = pooling_block(module.pma1)
    params["pma2"] = pooling_block(module.pma2)
    return params


def port_set2set(module) -> dict:
    lstm = module.lstm
    return {f"cells_{layer}": {
        "ih": {"kernel": array(getattr(lstm, f"weight_ih_l{layer}")).T,
               "bias": array(getattr(lstm, f"bias_ih_l{layer}"))},
        "hh": {"kernel": array(getattr(lstm, f"weight_hh_l{layer}")).T,
               "bias": array(getattr(lstm, f"bias_hh_l{layer}"))},
    } for layer in range(lstm.num_layers)}


def port_sequential(sequential) -> dict:
    linears = [layer for layer in sequential if isinstance(layer, torch.nn.Linear)]
    return {f"dense{i}": dense(linear) for i, linear in enumerate(linears)}


def port_deepsets(module) -> dict:
    return {"local_nn": port_sequential(module.local_nn),
            "global_nn": port_sequential(module.global_nn)}


def port_softmax(module) -> dict:
    t = array(module.t)
    return {"t": t if module.channels > 1 else t.reshape(())}


def deepsets_reference(hidden: int, features: int):
    linear, relu = torch.nn.Linear, torch.nn.ReLU
    return aggr.DeepSetsAggregation(
        local_nn=torch.nn.Sequential(linear(C, hidden), relu(), linear(hidden, hidden), relu()),
        global_nn=torch.nn.Sequential(linear(hidden, hidden), relu(), linear(hidden, features)))


LEARNED = {
    "softmax_learn_t": ("softmax", {"learn_t": True, "t": 0.8},
                        lambda: aggr.SoftmaxAggregation(t=0.8, learn=True), port_softmax),
    "softmax_per_channel": ("softmax", {"learn_t": True, "per_channel": True},
                            lambda: aggr.SoftmaxAggregation(learn=True, channels=C),
                            port_softmax),
    "set2set_two_layers": ("set2set", {"steps": 2, "num_layers": 2},
                           lambda: aggr.Set2Set(C, processing_steps=2, num_layers=2),
                           port_set2set),
    "deepsets": ("deepsets", {"hidden": 6, "features": 5}, lambda: deepsets_reference(6, 5),
                 port_deepsets),
    "set_transformer_full": (
        "set_transformer",
        {"seeds": 2, "encoder_blocks": 2, "decoder_blocks": 1, "heads": 2, "layer_norm": True},
        lambda: aggr.SetTransformerAggregation(C, num_seed_points=2, num_encoder_blocks=2,
                                               num_decoder_blocks=1, heads=2, layer_norm=True),
        port_set_transformer),
    "set_transformer_mean": (
        "set_transformer", {"seeds": 3, "concat": False, "heads": 4},
        lambda: aggr.SetTransformerAggregation(C, num_seed_points=3, heads=4, concat=False),
        port_set_transformer),
    "gmt_full": ("gmt", {"k": 2, "encoder_blocks": 2, "heads": 2, "layer_norm": True},
                 lambda: aggr.GraphMultisetTransformer(C, k=2, num_encoder_blocks=2, heads=2,
                                                       layer_norm=True), port_gmt),
}


@pytest.mark.parametrize("case", sorted(LEARNED))
def test_learned_readouts_equal_pyg_on_the_same_weights(case):
    name, options, reference, port = LEARNED[case]
    torch.manual_seed(0)
    theirs_module = perturbed(reference(), seed=1)
    x, index = random_batch(2)
    module = make_pool(name, **options)
    variables = jax.eval_shape(functools.partial(module.init, num_segments=NUM_GRAPHS,
                                                 method="segment"), jax.random.key(0), x, index)
    ported = {"params": port(theirs_module)}
    # Same tree, same shapes: every Flax parameter has its PyG counterpart and back.
    assert jax.tree.structure(ported) == jax.tree.structure(variables), case
    for ours_leaf, theirs_leaf in zip(jax.tree.leaves(variables), jax.tree.leaves(ported)):
        assert ours_leaf.shape == theirs_leaf.shape, case

    ours = np.asarray(jax.jit(functools.partial(module.apply, method="segment"),
                              static_argnums=3, compiler_options=FAST_COMPILE)(
                                  ported, x, index, NUM_GRAPHS))
    theirs = pyg_readout(theirs_module, x, index)
    assert ours.shape == theirs.shape == (NUM_GRAPHS, module.output_width(C))
    real = np.asarray(SIZES) > 0
    np.testing.assert_allclose(ours[real], theirs[real], **TOLERANCE, err_msg=case)
    # An empty graph reads out zeros here; PyG's softmax gives zeros too, its other learned
    # readouts a non-zero constant of the weights.
    np.testing.assert_array_equal(ours[EMPTY], 0.0)
    if name != "softmax":
        assert np.abs(theirs[EMPTY]).max() > 0, case
