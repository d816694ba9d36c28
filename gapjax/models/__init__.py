"""Model zoo: one file per family, each registering its presets in ``MODELS`` (``zoo``)
and its torch weight layout in ``LAYOUTS`` (``layouts``).

``get(name, num_classes=K, **kwargs)`` builds one; ``from_config(config, num_classes)``
builds what a training config describes.
"""

from gapjax.models.layouts import LAYOUTS, Layout
from gapjax.models.zoo import MODELS, from_config, get, names, register_preset

# isort: split
# Importing the family modules registers their models and layouts (after the names above,
# which they import from this package).
from gapjax.models import cnn, convnext, efficientnet, gnn, mobilenetv3, regnet, resnet, vgg, vit

__all__ = ["LAYOUTS", "MODELS", "Layout", "cnn", "convnext", "efficientnet", "from_config", "get",
           "gnn", "mobilenetv3", "names", "register_preset", "regnet", "resnet", "vgg", "vit"]
