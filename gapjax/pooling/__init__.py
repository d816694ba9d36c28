"""Global pooling: one family of operators that reduce a set of feature vectors to one.

Every pool takes ``x [B, *spatial, C]`` (an image ``[B, H, W, C]``, a set ``[B, N, C]``, or
any number of spatial axes) and an optional boolean ``mask [B, *spatial]`` (True = real
position) and returns ``[B, width]``. The package:

* ``functions``: the pure functions (``gap``, ``gmp``, ``gsp``, ``avgmax``, ``catavgmax``,
  ``gem``, ``lse``, ``weighted``, ``attention``, ``first_token``) and their conventions;
* ``segments``: ``Segments``, the reductions of the graph (segment) forms;
* ``base``: the ``POOLS`` registry, the ``Pool`` base class (what a pool declares: its
  weighting, exact contributions, width, segment form), ``make_pool`` and ``pool``;
* ``builtin``: the built-in pools; ``map``: multihead attention pooling (MAP).

A pool registered once, in any module, works in image heads, SE squeezes, masked sets,
graph readouts and CAM. Importing this package registers every built-in pool.
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
    as_sets,
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
    real_counts,
    result_dtype,
    weighted,
    zero_masked,
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
    "as_sets",
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
    "real_counts",
    "result_dtype",
    "weighted",
    "zero_masked",
]
