"""gapjax: global pooling and everything built on it, in JAX/Flax.

Submodules: ``pooling`` (the pool family and ``POOLS``), ``graph`` (graph readouts and
padded graph batches), ``layers`` and ``models`` (heads, SE, ResNet/VGG/CNN/GIN/ViT),
``cam`` and ``wsol`` (class activation maps and localization metrics), ``gradflow``
(gradient spread and conflict), ``data`` (embedded TFDS datasets, grain input), ``train``
(the training loop) and ``experiments`` (one module per claim, plus the report).
Importing ``gapjax`` registers every built-in pool, ``map`` and ``token`` included.
"""

from gapjax import pooling, registry
from gapjax.pooling import POOLS
from gapjax.registry import Registry

__version__ = "0.1.0"

__all__ = ["POOLS", "Registry", "__version__", "pooling", "registry"]
