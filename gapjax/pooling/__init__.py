"""Global pooling: one family of operators that reduce a set of feature vectors to one.

``x [B, *spatial, C]`` (an image, a set ``[B, N, C]``, any number of spatial axes) and an
optional ``mask [B, *spatial]`` (True = real) -> ``[B, width]``. Modules: ``functions`` (the
pure functions and their conventions), ``segments`` (graph forms), ``base`` (``POOLS``,
``Pool``: what a pool declares, ``make_pool``, ``pool``), ``builtin`` and ``map`` (the
pools). Importing the package registers every built-in pool; one registered in any module
works in image heads, SE squeezes, masked sets, graph readouts and CAM.
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
from gapjax.pooling.map import MAPPool
from gapjax.pooling.segments import Segments

__all__ = [
    "POOLS",
    "WEIGHTINGS",
    "AttentionPool",
    "AvgMaxPool",
    "CatAvgMaxPool",
    "ClassTokenPool",
    "Contributions",
    "GeMPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GlobalSumPool",
    "LSEPool",
    "MAPPool",
    "Pool",
    "Segments",
    "WeightedPool",
    "attention",
    "attention_weights",
    "avgmax",
    "catavgmax",
    "check_positive",
    "first_token",
    "gap",
    "gem",
    "gmp",
    "gsp",
    "lse",
    "make_pool",
    "normalize_weights",
    "pool",
    "weighted",
]
