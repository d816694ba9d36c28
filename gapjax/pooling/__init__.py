"""Global pooling: one family of operators that reduce a set of feature vectors to one.

``x [B, *spatial, C]`` (an image, a set ``[B, N, C]``, any number of spatial axes) and an
optional ``mask [B, *spatial]`` (True = real) -> ``[B, width]``. Modules: ``functions`` (the
pure functions and their conventions), ``segments`` (graph forms), ``base`` (``POOLS``,
``Pool``: what a pool declares, ``make_pool``, ``pool``), ``builtin`` and ``map`` (the
classic pools), ``statistics`` and ``learned`` (readouts of sets and graphs: std, var, min,
median, softmax, vpa, sort, multi, pna; set2set, deepsets, set_transformer, gmt). Importing
the package registers every built-in pool; one registered in any module works in image
heads, SE squeezes, masked sets, graph readouts and CAM.
"""

from gapjax.pooling.base import POOLS, WEIGHTINGS, Contributions, Pool, make_pool, pool
from gapjax.pooling.builtin import (
    AttentionPool,
    AvgMaxPool,
    CatAvgMaxPool,
    ClassTokenPool,
    GeMPool,
    GlobalAvgPool,
    GlobalMaxPool,
    GlobalSumPool,
    LSEPool,
    WeightedPool,
)
from gapjax.pooling.functions import (
    attention,
    attention_weights,
    avgmax,
    catavgmax,
    check_positive,
    first_token,
    gap,
    gem,
    gmp,
    gsp,
    lse,
    normalize_weights,
    weighted,
)
from gapjax.pooling.learned import (
    DeepSetsPool,
    GraphMultisetTransformerPool,
    Set2SetPool,
    SetTransformerPool,
)
from gapjax.pooling.map import MAPPool
from gapjax.pooling.segments import Segments
from gapjax.pooling.statistics import (
    gmin,
    median,
    multi,
    pna,
    pna_degree_statistics,
    softmax,
    sort_pool,
    std,
    var,
    vpa,
)

__all__ = [
    "POOLS",
    "WEIGHTINGS",
    "AttentionPool",
    "AvgMaxPool",
    "CatAvgMaxPool",
    "ClassTokenPool",
    "Contributions",
    "DeepSetsPool",
    "GeMPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GlobalSumPool",
    "GraphMultisetTransformerPool",
    "LSEPool",
    "MAPPool",
    "Pool",
    "Segments",
    "Set2SetPool",
    "SetTransformerPool",
    "WeightedPool",
    "attention",
    "attention_weights",
    "avgmax",
    "catavgmax",
    "check_positive",
    "first_token",
    "gap",
    "gem",
    "gmin",
    "gmp",
    "gsp",
    "lse",
    "make_pool",
    "median",
    "multi",
    "normalize_weights",
    "pna",
    "pna_degree_statistics",
    "pool",
    "softmax",
    "sort_pool",
    "std",
    "var",
    "vpa",
    "weighted",
]
