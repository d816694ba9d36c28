"""Weight layouts: how each model family is named and laid out in torch (data, not code).

``gapjax.pretrained`` (the engine: strict checks, file I/O) finds a model's ``Layout`` in
``LAYOUTS``, which the model files fill beside their models, keyed by model-name prefix
(``"resnet"``, ``"seresnet"``, ``"vgg"``, ``"vit_"``; the longest matching prefix wins). A
layout turns the flattened variable tree (``{"params/layer1_0/conv1/kernel": shape}``)
into ``TorchTensor(key, leaves, transform)`` rows. A new family is one block in its model
file: module renames and kernel transforms (see ``Layout``), e.g.::

    LAYOUTS.add("efficientnet_", Layout(source="timm", renames=((r"^stem_conv$", "conv_stem"),),
                                        kernels=((r"/se/(reduce|expand)$", "conv1x1_dense"),)))

Transforms may be named by string (``TRANSFORMS``), so rule lists can live in modules
below this floor; the attention modules of ``gapjax.attention`` need none (their module
paths are timm's and their kernels take the defaults by rank). ``Layout.extend`` adds
rules to a family's layout (a variant such as ResNet-D).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gapjax.registry import Registry

#: Messages about a file adapted on load (the engine's logger).
logger = logging.getLogger("gapjax.pretrained")

Shape = tuple[int, ...]


class Transform:
    """Converts between a torch tensor and gapjax leaves (NumPy arrays).

    ``torch_shape(leaf_shapes)`` is the torch shape the leaves need, ``to_flax(tensor,
    leaf_shapes) -> tuple of leaves`` and ``to_torch(leaves) -> tensor`` convert values.
    ``adapt(tensor, leaf_shapes)`` runs first on load and may resize a file's tensor to the
    model (a ViT's position embeddings at another image size); default: unchanged.
    """

    name = "identity"

    def adapt(self, tensor: np.ndarray, shapes: Sequence[Shape]) -> np.ndarray:
        return tensor

    def torch_shape(self, shapes: Sequence[Shape]) -> Shape:
        return tuple(shapes[0])

    def to_flax(self, tensor: np.ndarray, shapes: Sequence[Shape]) -> tuple[np.ndarray, ...]:
        return (tensor.reshape(shapes[0]),)

    def to_torch(self, leaves: Sequence[np.ndarray]) -> np.ndarray:
        return np.asarray(leaves[0])

    def __repr__(self) -> str:
        return self.name


class _Permute(Transform):
    """A transpose: gapjax axes ``perm`` give the torch layout (and the inverse back)."""

    def __init__(self, name: str, perm: tuple[int, ...]):
        self.name, self.perm = name, perm
        self.inverse = tuple(int(i) for i in np.argsort(perm))

    def torch_shape(self, shapes):
        return tuple(shapes[0][axis] for axis in self.perm)

    def to_flax(self, tensor, shapes):
        return (np.transpose(tensor, self.inverse),)

    def to_torch(self, leaves):
        return np.transpose(np.asarray(leaves[0]), self.perm)


class _Conv1x1Dense(Transform):
    """A Dense kernel ``[in, out]`` held by torch as a 1x1 convolution ``[out, in, 1, 1]``."""

    name = "conv1x1_dense"

    def torch_shape(self, shapes):
        fan_in, fan_out = shapes[0]
        return (fan_out, fan_in, 1, 1)

    def to_flax(self, tensor, shapes):
        return (tensor[:, :, 0, 0].T,)

    def to_torch(self, leaves):
        return np.asarray(leaves[0]).T[:, :, None, None]


@dataclasses.dataclass(frozen=True)
class FlattenDense(Transform):
    """A Dense layer after a flatten: gapjax flattens NHWC (``h, w, c``), torch NCHW
    (``c, h, w``), so the kernel rows are permuted: ``[h*w*C, out] <-> [out, C*h*w]``."""

    grid: tuple[int, int]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"flatten_dense{self.grid}"

    def torch_shape(self, shapes):
        fan_in, fan_out = shapes[0]
        return (fan_out, fan_in)

    def to_flax(self, tensor, shapes):
        fan_in, fan_out = shapes[0]
        grid = tensor.reshape(fan_out, fan_in // (self.grid[0] * self.grid[1]), *self.grid)
        return (np.transpose(grid, (2, 3, 1, 0)).reshape(fan_in, fan_out),)

    def to_torch(self, leaves):
        kernel = np.asarray(leaves[0])
        fan_in, fan_out = kernel.shape
        grid = kernel.reshape(*self.grid, fan_in // (self.grid[0] * self.grid[1]), fan_out)
        return np.transpose(grid, (3, 2, 0, 1)).reshape(fan_out, fan_in)


class _Counter(Transform):
    """BatchNorm's ``num_batches_tracked``: read and dropped (gapjax keeps no counter),
    written as 0 (it only matters to torch's ``momentum=None``)."""

    name = "counter"

    def torch_shape(self, shapes):
        return ()

    def to_flax(self, tensor, shapes):
        return ()

    def to_torch(self, leaves):
        return np.zeros((), np.int64)


IDENTITY = Transform()
CONV = _Permute("conv", (3, 2, 0, 1))  # HWIO -> OIHW
DENSE = _Permute("dense", (1, 0))  # [in, out] -> [out, in]
CONV1D = _Permute("conv1d", (2, 1, 0))  # [k, in, out] -> torch Conv1d's [out, in, k]
CONV1X1_DENSE = _Conv1x1Dense()
COUNTER = _Counter()
#: Transforms a kernel rule may name by string.
TRANSFORMS = {t.name: t for t in (IDENTITY, CONV, CONV1D, DENSE, CONV1X1_DENSE)}
#: The transform of a kernel no rule names, by its rank.
DEFAULT_KERNELS = {4: CONV, 3: CONV1D, 2: DENSE}


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """One row of a layout: torch ``key`` <-> gapjax ``leaves`` (``"params/a/b/kernel"``)
    via ``transform``."""

    key: str
    leaves: tuple[str, ...]
    transform: Transform


Rules = Sequence[tuple[str, Any]]
RulesOrFn = Rules | Callable[[Mapping[str, Shape]], Rules]

#: gapjax leaf name -> torch parameter name, per collection.
LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def module_shapes(shapes: Mapping[str, Shape]) -> dict[str, dict[str, Shape]]:
    """``{module path: {leaf: shape}}`` of the ``params`` collection."""
    modules: dict[str, dict[str, Shape]] = {}
    for path, shape in shapes.items():
        collection, *parts, leaf = path.split("/")
        if collection == "params":
            modules.setdefault("/".join(parts), {})[leaf] = shape
    return modules


def _rules(rules: RulesOrFn, shapes: Mapping[str, Shape]) -> list[tuple[str, Any]]:
    return list(rules(shapes) if callable(rules) else rules)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one architecture family is named and laid out in torch.

    Attributes:
      source: where the weights come from (``"torchvision"``, ``"timm"``), for messages.
      renames: ``(regex, replacement)`` pairs applied in order (``re.sub``) to a gapjax
        module path (``"layer1_0/downsample_conv"``); ``/`` then becomes ``.``. Or a
        function of the flattened shapes returning such pairs.
      kernels: ``(regex, Transform or TRANSFORMS name)`` pairs on the gapjax module path
        choosing a kernel's transform (first match); default ``CONV`` for rank 4,
        ``CONV1D`` for rank 3 (ECA's channel convolutions), ``DENSE`` for rank 2. Or a
        function of the shapes returning such pairs.
      tensors_fn: replaces the generic builder: ``shapes -> list[TorchTensor]``.
      torch_models: the names under which ``source`` builds these models (documentation
        and tests), e.g. ``"torchvision.models.<name>()"``.
    """

    source: str
    renames: RulesOrFn = ()
    kernels: RulesOrFn = ()
    tensors_fn: Callable[[Mapping[str, Shape]], list[TorchTensor]] | None = None
    torch_models: str = ""

    def extend(self, renames: Rules = (), kernels: Rules = (), **fields: Any) -> Layout:
        """This layout with ``renames`` applied first and ``kernels`` tried first (a
        family's variant), and other fields replaced."""
        return dataclasses.replace(
            self, renames=lambda s: [*renames, *_rules(self.renames, s)],
            kernels=lambda s: [*kernels, *_rules(self.kernels, s)], **fields)

    def tensors(self, shapes: Mapping[str, Shape]) -> list[TorchTensor]:
        """The torch tensors of a gapjax variable tree, ``shapes = {"params/..": shape}``."""
        if self.tensors_fn is not None:
            return self.tensors_fn(shapes)
        renames, kernels = _rules(self.renames, shapes), _rules(self.kernels, shapes)
        rows: list[TorchTensor] = []
        for path, shape in shapes.items():
            collection, *modules, leaf = path.split("/")
            module = torch_module = "/".join(modules)
            for pattern, replacement in renames:
                torch_module = re.sub(pattern, replacement, torch_module)
            prefix = torch_module.replace("/", ".") + "." if torch_module else ""
            transform = IDENTITY
            if leaf == "kernel":
                chosen = next((t for pattern, t in kernels if re.search(pattern, module)),
                              DEFAULT_KERNELS.get(len(shape), IDENTITY))
                transform = TRANSFORMS[chosen] if isinstance(chosen, str) else chosen
            rows.append(TorchTensor(prefix + LEAF_NAMES.get((collection, leaf), leaf), (path,),
                                    transform))
            if (collection, leaf) == ("batch_stats", "mean"):
                rows.append(TorchTensor(prefix + "num_batches_tracked", (), COUNTER))
        return rows


#: Model-name prefix -> Layout, filled by the model files. The longest prefix wins.
LAYOUTS: Registry[Layout] = Registry("weight layout")

__all__ = ["CONV", "CONV1D", "CONV1X1_DENSE", "COUNTER", "DEFAULT_KERNELS", "DENSE", "IDENTITY",
           "LAYOUTS", "LEAF_NAMES", "TRANSFORMS", "FlattenDense", "Layout", "TorchTensor",
           "Transform", "module_shapes"]
