"""Weakly supervised object localization (Choe et al., CVPR 2020), re-exported by name.

``metrics``: MaxBoxAcc, MaxBoxAccV2, PxAP, GT-known and top-1 localization under the
gapjax protocol (the definitions, their conventions) or ``protocol="wsolevaluation"``;
``reference``: the wsolevaluation-compatible computation and box conventions;
``evaluator``: ``LocalizationEvaluator``, which the training loop runs; ``overlay``:
pictures of maps and boxes; ``metadata``: the benchmarks' metadata files and saved score
maps scored against them (``python -m gapjax.wsol``, the command line of
``gapjax.cli.wsol``). See docs/wsol.md.
"""

from gapjax.wsol import evaluator, metadata, metrics, overlay, reference
from gapjax.wsol.evaluator import *  # noqa: F403
from gapjax.wsol.metadata import *  # noqa: F403
from gapjax.wsol.metrics import *  # noqa: F403
from gapjax.wsol.overlay import *  # noqa: F403
from gapjax.wsol.reference import *  # noqa: F403

__all__ = [*evaluator.__all__, *metadata.__all__, *metrics.__all__, *overlay.__all__,
           *reference.__all__]
