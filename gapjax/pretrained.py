"""Pretrained weights: torchvision / timm weight files <-> gapjax variables.

``load(name, path)`` reads a ``.safetensors`` file (no torch needed) or a ``.pth`` /
``.pt`` / ``.bin`` state dict (torch imported only then) and returns ``(model,
variables)``; ``save(name, variables, path)`` writes a ``.safetensors`` file in the torch
naming that torchvision / timm accept with ``load_state_dict(strict=True)``.

Loading is strict: every tensor of the file is used exactly once, every gapjax leaf is
filled, every shape is checked, and a mismatch names the key and both shapes. When the
requested ``num_classes`` differs from the file's, the classifier is re-initialised and
one line says so (``reinit_head=True`` re-initialises the whole head, e.g. a GAP head
with a GeM pool on a torchvision trunk).

Extension point: ``LAYOUTS``
----------------------------
The mapping between the two namings is data, in one place: a ``Layout`` per architecture
family, registered in ``LAYOUTS`` under a model-name prefix (``"resnet"``, ``"seresnet"``,
``"vgg"``, ``"vit_"``; the longest registered prefix of a model name wins). A layout turns
the gapjax variable tree (flattened to ``{"params/layer1_0/conv1/kernel": shape}``) into a
list of ``TorchTensor(key, leaves, transform)`` rows: one torch state-dict key, the gapjax
leaves it holds (usually one; a fused tensor such as a ViT's ``qkv`` may hold several) and
the ``Transform`` between the two layouts (``CONV`` OIHW <-> HWIO, ``DENSE`` [out, in] <->
[in, out], ``CONV1X1_DENSE`` for timm's 1x1-conv SE layers, ``FlattenDense`` for a dense
layer after an NCHW flatten, ``COUNTER`` for BatchNorm's ``num_batches_tracked``, which
gapjax does not keep). Most layouts are written as module renames (regex on the gapjax
module path -> torch module path) plus per-module kernel transforms, and
``Layout.tensors`` fills in the leaf names (kernel -> weight, scale -> weight, mean ->
running_mean, ...). A new family (e.g. ``vit_`` in timm's naming) adds

    LAYOUTS.add("vit_", Layout(source="timm", renames=..., kernels=..., tensors_fn=...))

where ``tensors_fn(shapes) -> list[TorchTensor]`` may replace the generic builder
entirely. ``describe(name)`` returns a model's table (torch key, shape, gapjax leaves,
transform).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gapjax.registry import Registry

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
#: Keys under which training scripts wrap the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "state", "net",
                "module", "params")
#: Prefixes that wrappers add to every key (DataParallel, torch.compile).
KEY_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------
# Transforms: one torch tensor <-> the gapjax leaves it holds
# --------------------------------------------------------------------------------------


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
        height, width = self.grid
        channels = fan_in // (height * width)
        grid = tensor.reshape(fan_out, channels, height, width)
        return (np.transpose(grid, (2, 3, 1, 0)).reshape(fan_in, fan_out),)

    def to_torch(self, leaves):
        kernel = np.asarray(leaves[0])
        fan_in, fan_out = kernel.shape
        height, width = self.grid
        channels = fan_in // (height * width)
        grid = kernel.reshape(height, width, channels, fan_out)
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
CONV1X1_DENSE = _Conv1x1Dense()
COUNTER = _Counter()


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """One row of a layout: torch ``key`` <-> gapjax ``leaves`` (``"params/a/b/kernel"``)
    via ``transform``."""

    key: str
    leaves: tuple[str, ...]
    transform: Transform


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------

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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one architecture family is named and laid out in torch.

    Attributes:
      source: where the weights come from (``"torchvision"``, ``"timm"``), for messages.
      renames: ``(regex, replacement)`` pairs applied in order (``re.sub``) to a gapjax
        module path (``"layer1_0/downsample_conv"``); ``/`` then becomes ``.``. Or a
        function of the flattened shapes returning such pairs.
      kernels: ``(regex, Transform)`` pairs on the gapjax module path choosing a kernel's
        transform (first match); default ``CONV`` for rank 4, ``DENSE`` for rank 2. Or a
        function of the shapes returning such pairs.
      tensors_fn: replaces the generic builder: ``shapes -> list[TorchTensor]``.
      torch_models: the names under which ``source`` builds these models (documentation
        and tests), e.g. ``"torchvision.models.<name>"``.
    """

    source: str
    renames: RulesOrFn = ()
    kernels: RulesOrFn = ()
    tensors_fn: Callable[[Mapping[str, Shape]], list[TorchTensor]] | None = None
    torch_models: str = ""

    def tensors(self, shapes: Mapping[str, Shape]) -> list[TorchTensor]:
        """The torch tensors of a gapjax variable tree, ``shapes = {"params/..": shape}``."""
        if self.tensors_fn is not None:
            return self.tensors_fn(shapes)
        renames = self.renames(shapes) if callable(self.renames) else self.renames
        kernels = self.kernels(shapes) if callable(self.kernels) else self.kernels
        rows: list[TorchTensor] = []
        for path, shape in shapes.items():
            collection, *modules, leaf = path.split("/")
            module = "/".join(modules)
            torch_module = module
            for pattern, replacement in renames:
                torch_module = re.sub(pattern, replacement, torch_module)
            torch_module = torch_module.replace("/", ".")
            transform: Transform = IDENTITY
            if leaf == "kernel":
                transform = next(
                    (t for pattern, t in kernels if re.search(pattern, module)),
                    CONV if len(shape) == 4 else DENSE if len(shape) == 2 else IDENTITY,
                )
            torch_leaf = LEAF_NAMES.get((collection, leaf), leaf)
            prefix = f"{torch_module}." if torch_module else ""
            rows.append(TorchTensor(prefix + torch_leaf, (path,), transform))
            if (collection, leaf) == ("batch_stats", "mean"):
                rows.append(TorchTensor(prefix + "num_batches_tracked", (), COUNTER))
        return rows


#: Model-name prefix -> Layout. The longest registered prefix of a model name wins.
LAYOUTS: Registry[Layout] = Registry("weight layout")


def layout_for(name: str) -> Layout:
    """The layout of model ``name`` (longest matching prefix of ``LAYOUTS``)."""
    matches = [prefix for prefix in LAYOUTS.names() if name.startswith(prefix)]
    if not matches:
        raise ValueError(
            f"no pretrained weight layout for model {name!r}; supported: {', '.join(names())}"
        )
    return LAYOUTS.get(max(matches, key=len))


def names() -> list[str]:
    """Registered model names that have a weight layout."""
    from gapjax import models

    prefixes = LAYOUTS.names()
    return [name for name in models.names() if any(name.startswith(p) for p in prefixes)]


# ResNet (torchvision) and SE-ResNet (timm): the same names, timm adds se.fc1 / se.fc2
# (1x1 convolutions with bias).
_RESNET_RENAMES = (
    (r"layer(\d+)_(\d+)", r"layer\1.\2"),
    (r"downsample_conv", "downsample.0"),
    (r"downsample_bn", "downsample.1"),
    (r"se/reduce", "se/fc1"),
    (r"se/expand", "se/fc2"),
    (r"^head/classifier$", "fc"),
)
_RESNET_KERNELS = ((r"(^|/)se/(reduce|expand)$", CONV1X1_DENSE),)

LAYOUTS.add("resnet", Layout(
    source="torchvision", renames=_RESNET_RENAMES, kernels=_RESNET_KERNELS,
    torch_models="torchvision.models.<name>()"))
LAYOUTS.add("seresnet", Layout(
    source="timm", renames=_RESNET_RENAMES, kernels=_RESNET_KERNELS,
    torch_models="timm.create_model('<name>')"))


def _modules(shapes: Mapping[str, Shape]) -> dict[str, dict[str, Shape]]:
    """``{module path: {leaf: shape}}`` of the ``params`` collection."""
    modules: dict[str, dict[str, Shape]] = {}
    for path, shape in shapes.items():
        collection, *parts, leaf = path.split("/")
        if collection == "params":
            modules.setdefault("/".join(parts), {})[leaf] = shape
    return modules


def _vgg_renames(shapes: Mapping[str, Shape]) -> list[tuple[str, str]]:
    """torchvision's ``features.<i>`` indices (conv, [bn], relu per layer, a max pool per
    block) and ``classifier.<3 n>`` for the n-th Dense of the head."""
    modules = _modules(shapes)
    convs = sorted(
        (tuple(int(n) for n in match.groups()), path)
        for path in modules if (match := re.fullmatch(r"conv(\d+)_(\d+)", path))
    )
    renames, index, block = [], 0, None
    for (block_index, conv_index), _ in convs:
        if block is not None and block_index != block:
            index += 1  # the max pool closing the previous block
        block = block_index
        renames.append((rf"^conv{block_index}_{conv_index}$", f"features.{index}"))
        index += 1
        bn = f"bn{block_index}_{conv_index}"
        if bn in modules or any(p.startswith(f"batch_stats/{bn}/") for p in shapes):
            renames.append((rf"^{bn}$", f"features.{index}"))
            index += 1
        index += 1  # ReLU
    hidden = sorted(int(m.group(1)) for path in modules
                    if (m := re.fullmatch(r"head/fc(\d+)", path)))
    for position, number in enumerate(hidden):
        renames.append((rf"^head/fc{number}$", f"classifier.{3 * position}"))
    renames.append((r"^head/classifier$", f"classifier.{3 * len(hidden)}"))
    return renames


def _vgg_kernels(shapes: Mapping[str, Shape]) -> list[tuple[str, Transform]]:
    """The head's first Dense reads the NCHW flatten of a square grid in torch."""
    modules = _modules(shapes)
    convs = [path for path in modules if re.fullmatch(r"conv\d+_\d+", path)]
    if not convs:
        return []
    last = max(convs, key=lambda p: tuple(int(n) for n in p[4:].split("_")))
    channels = modules[last]["kernel"][-1]
    first = "head/fc1" if "head/fc1" in modules else "head/classifier"
    fan_in = modules.get(first, {}).get("kernel", (channels,))[0]
    cells = fan_in // channels
    side = math.isqrt(cells)
    if cells > 1 and side * side == cells and fan_in == cells * channels:
        return [(rf"^{first}$", FlattenDense((side, side)))]
    return []


LAYOUTS.add("vgg", Layout(
    source="torchvision", renames=_vgg_renames, kernels=_vgg_kernels,
    torch_models="torchvision.models.<name>()"))


# --------------------------------------------------------------------------------------
# ViT (timm naming): vit_ti16 / vit_s16 / vit_b16 / vit_l16 <-> timm vit_*_patch16_*
# --------------------------------------------------------------------------------------
# gapjax names follow timm's module for module (blocks_3/attn/qkv <-> blocks.3.attn.qkv);
# the head is gathered under ``head``: head/classifier <-> head, head/fc_norm <-> fc_norm,
# head/pool (the MAP pool) <-> attn_pool. Learned position embeddings saved at another
# image size are resampled on load (class-token row kept, patch rows resized on their
# square grid, bicubic with antialiasing, as timm's resample_abs_pos_embed).

_VIT_RENAMES = (
    (r"^blocks_(\d+)", r"blocks.\1"),
    (r"^patch_embed$", "patch_embed/proj"),
    (r"^head/classifier$", "head"),
    (r"^head/fc_norm$", "fc_norm"),
    (r"^head/pool", "attn_pool"),
)


@dataclasses.dataclass(frozen=True)
class ResamplePosEmbed(Transform):
    """A ViT's learned ``pos_embed [1, P + n * n, C]``: identical when the file's grid is
    the model's; otherwise the ``num_prefix_tokens`` rows are kept and the patch rows
    resampled from the file's square grid to the model's
    (``gapjax.models.vit.resample_pos_embed``)."""

    num_prefix_tokens: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pos_embed(prefix={self.num_prefix_tokens})"

    def adapt(self, tensor, shapes):
        from gapjax.models.vit import resample_pos_embed

        want = tuple(shapes[0])
        if tensor.ndim != 3 or tensor.shape == want or tensor.shape[-1] != want[-1]:
            return tensor  # equal, or a mismatch the shape check reports
        patches = want[1] - self.num_prefix_tokens
        side = math.isqrt(patches)
        if side * side != patches:
            raise ValueError(f"pos_embed: resampling needs a square patch grid; the model has "
                             f"{patches} patches (image_size not square)")
        logger.warning("pos_embed: resampling %d position embeddings to %d (a %dx%d grid)",
                       tensor.shape[1] - self.num_prefix_tokens, patches, side, side)
        return resample_pos_embed(tensor, (side, side),
                                  num_prefix_tokens=self.num_prefix_tokens)


def _vit_tensors(shapes: Mapping[str, Shape]) -> list[TorchTensor]:
    prefix = 1 if "params/cls_token" in shapes else 0
    rows = Layout(source="timm", renames=_VIT_RENAMES).tensors(shapes)
    return [dataclasses.replace(row, transform=ResamplePosEmbed(prefix))
            if row.leaves == ("params/pos_embed",) else row for row in rows]


LAYOUTS.add("vit_", Layout(
    source="timm", tensors_fn=_vit_tensors,
    torch_models="timm.create_model('vit_{tiny,small,base,large}_patch16_224', "
                 "global_pool='token'|'avg'|'map', class_token=..., img_size=...)"))


# --------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------


def _torch_to_numpy(value: Any) -> np.ndarray:
    import torch

    tensor = value.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()
    return tensor.numpy()


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    """The state dict inside a checkpoint (``{"state_dict": ...}``, ``{"model": ...}``)."""
    import torch

    for _ in range(4):  # wrappers nest at most a few levels
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
        if any(isinstance(value, torch.Tensor) for value in obj.values()):
            return obj
        inner = next((key for key in WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"{path} holds no tensors at its top level and none of the wrapper keys "
                f"{', '.join(WRAPPER_KEYS)}; its keys are: {', '.join(map(str, list(obj)[:10]))}"
            )
        obj = obj[inner]
    raise ValueError(f"{path}: no state dict found within 4 levels of wrapping")


def _strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in KEY_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{torch key: NumPy array}`` from a ``.safetensors`` file (no torch needed) or a
    ``.pth`` / ``.pt`` / ``.bin`` file (needs torch; wrapped checkpoints and ``module.``
    prefixes are unwrapped). Half-precision tensors are returned as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        state = dict(load_file(str(path)))
    elif suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading {path.name} ({suffix}) needs PyTorch: pip install -e \".[reference]\" "
                "(or convert the file to .safetensors, which needs no torch)"
            ) from None
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        state = {str(key): _torch_to_numpy(value)
                 for key, value in _unwrap(obj, str(path)).items()
                 if isinstance(value, torch.Tensor)}
    else:
        raise ValueError(
            f"weight file {str(path)!r}: unknown suffix {suffix!r}; choose one of: "
            f"{SAFETENSORS_SUFFIX}, {', '.join(TORCH_SUFFIXES)}"
        )
    return _strip_prefixes(state)


# --------------------------------------------------------------------------------------
# Variables <-> tensors
# --------------------------------------------------------------------------------------


def flatten_shapes(variables: Mapping[str, Any]) -> dict[str, Shape]:
    """``{"params/layer1_0/conv1/kernel": shape}`` of a variable tree (or of shapes)."""
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        flat[path] = tuple(int(n) for n in leaf.shape)
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _checked_tensors(name: str, shapes: Mapping[str, Shape]) -> list[TorchTensor]:
    """The layout's rows, checked to cover every leaf exactly once with unique keys."""
    rows = layout_for(name).tensors(shapes)
    covered = [leaf for row in rows for leaf in row.leaves]
    keys = [row.key for row in rows]
    problems = []
    if sorted(covered) != sorted(shapes):
        missing = sorted(set(shapes) - set(covered))
        twice = sorted({leaf for leaf in covered if covered.count(leaf) > 1})
        problems.append(f"leaves not covered {missing[:5]}, covered twice {twice[:5]}")
    if len(set(keys)) != len(keys):
        twice = sorted({key for key in keys if keys.count(key) > 1})
        problems.append(f"duplicate torch keys {twice[:5]}")
    if problems:
        raise RuntimeError(f"the weight layout of {name!r} is inconsistent: {'; '.join(problems)}")
    return rows


def describe(name: str, **model_kwargs: Any) -> list[tuple[str, Shape, tuple[str, ...], str]]:
    """Rows ``(torch key, torch shape, gapjax leaves, transform)`` for model ``name``
    with 1000 classes (or ``model_kwargs``)."""
    model = _build(name, model_kwargs.pop("num_classes", 1000), model_kwargs)
    shapes = flatten_shapes(_abstract_variables(model))
    return [(row.key, row.transform.torch_shape([shapes[leaf] for leaf in row.leaves]),
             row.leaves, row.transform.name) for row in _checked_tensors(name, shapes)]


def _build(name: str, num_classes: int, model_kwargs: Mapping[str, Any]) -> Any:
    from gapjax import models

    return models.get(name, num_classes=int(num_classes), **model_kwargs)


def _sample_images(model: Any) -> jax.ShapeDtypeStruct:
    size = 32 if getattr(model, "stem", "imagenet") == "cifar" else 224
    image_size = getattr(model, "image_size", None)  # models built for one size (ViT)
    height, width = (size, size) if image_size is None else (
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
    return jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)


@functools.lru_cache(maxsize=8)
def _abstract_variables(model: Any) -> dict[str, Any]:
    """The model's variable shapes (traced once per model configuration)."""
    return jax.eval_shape(model.init, jax.random.key(0), _sample_images(model))


def _is_classifier(row: TorchTensor) -> bool:
    return any(leaf.startswith("params/head/classifier/") for leaf in row.leaves)


def _is_head(row: TorchTensor) -> bool:
    return any(leaf.split("/")[1:2] == ["head"] for leaf in row.leaves)


def _file_num_classes(rows: Sequence[TorchTensor], shapes: Mapping[str, Shape],
                      state: Mapping[str, np.ndarray]) -> int | None:
    """The class count of the file's classifier, when the model's classifier reads the
    same features (its kernel matches but for the class axis); None otherwise."""
    kernel = next((r for r in rows if r.leaves == ("params/head/classifier/kernel",)), None)
    bias = next((r for r in rows if r.leaves == ("params/head/classifier/bias",)), None)
    if kernel is None or bias is None or kernel.key not in state or bias.key not in state:
        return None
    want = kernel.transform.torch_shape([shapes[leaf] for leaf in kernel.leaves])
    found = np.shape(state[kernel.key])
    if len(found) != len(want) or tuple(found[1:]) != tuple(want[1:]):
        return None
    return int(np.shape(state[bias.key])[0])


def _initial_head(model: Any, abstract: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Freshly initialised ``params/head/...`` leaves (only the head is initialised when
    the model has the ``forward_head`` entry point, else the whole model)."""
    key = jax.random.key(seed)
    images = _sample_images(model)
    if hasattr(model, "forward_head"):
        features = jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False, method="forward_features"),
            abstract, images)
        variables = jax.jit(lambda k, f: model.init(k, f, train=False, method="forward_head"))(
            key, jnp.zeros(features.shape, features.dtype))
    else:
        variables = jax.jit(model.init)(key, jnp.zeros(images.shape, images.dtype))
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if path.split("/")[1:2] == ["head"]:
            flat[path] = np.asarray(leaf)
    return flat


def _sample(keys: Sequence[str], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _resolve_skip(rows: Sequence[TorchTensor], shapes: Mapping[str, Shape],
                  state: Mapping[str, np.ndarray]) -> str | None:
    """``skip_head="auto"``: None when the file's head fits the model's, ``"classifier"``
    when only the classifier differs (another class count), else ``"head"``. The file's
    head tensors are those under the torch modules that hold the model's head."""

    def fits(row: TorchTensor) -> bool:
        if row.key not in state:
            return False
        want = row.transform.torch_shape([shapes[leaf] for leaf in row.leaves])
        adapted = row.transform.adapt(np.asarray(state[row.key]),
                                      [shapes[leaf] for leaf in row.leaves])
        return tuple(adapted.shape) == tuple(want)

    head_rows = [row for row in rows if _is_head(row)]
    roots = {row.key.split(".")[0] for row in head_rows}
    expected = {row.key for row in rows}
    extra = [key for key in state if key.split(".")[0] in roots and key not in expected]
    if not extra and all(fits(row) for row in head_rows):
        return None
    if not extra and all(fits(row) for row in head_rows if not _is_classifier(row)):
        return "classifier"
    return "head"


def load_leaves(
    name: str,
    model: Any,
    state: Mapping[str, np.ndarray],
    *,
    skip_head: str | None = None,
    source: str = "the file",
    shapes: Mapping[str, Shape] | None = None,
    new_modules: Sequence[str] = (),
) -> tuple[dict[str, np.ndarray], list[str], str | None]:
    """The gapjax leaves of ``model`` held by a torch ``state`` dict, checked strictly.

    ``skip_head``: None (load everything), ``"classifier"`` or ``"head"`` (leave those
    leaves out and ignore the file's tensors for them), or ``"auto"`` (the least of these
    that fits the file). ``new_modules``: top-level gapjax modules a fine-tuning run adds
    to the published network (WSOL's ``conv6_1`` on VGG-16); those the file does not hold
    are skipped like the head, those it holds are loaded. Returns ``(flat leaves
    {"params/..": array}, skipped leaf paths, the resolved skip_head)``. ``shapes``
    (``flatten_shapes`` of the model's variables) defaults to the model traced at 224x224
    (32x32 for the cifar stem). Raises ValueError on missing or unexpected keys and on any
    shape mismatch, naming keys and shapes.
    """
    if shapes is None:
        shapes = flatten_shapes(_abstract_variables(model))
    rows = _checked_tensors(name, shapes)
    absent_new = {row.key for row in rows if row.key not in state
                  and any(leaf.split("/")[1:2] == [module] for leaf in row.leaves
                          for module in new_modules)}
    if skip_head == "auto":
        skip_head = _resolve_skip([row for row in rows if row.key not in absent_new], shapes,
                                  state)
    head_skipped = {
        None: lambda row: False, "classifier": _is_classifier, "head": _is_head,
    }[skip_head]

    def skipped(row: TorchTensor) -> bool:
        return row.key in absent_new or head_skipped(row)

    used = [row for row in rows if not skipped(row)]
    dropped = {row.key for row in rows if skipped(row)}
    if skip_head == "head":  # the file's own head, whatever its shape
        roots = {row.key.split(".")[0] for row in rows if _is_head(row)}
        dropped |= {key for key in state if key.split(".")[0] in roots}
    expected = {row.key for row in used}
    missing = expected - set(state)
    unexpected = set(state) - expected - dropped
    layout = layout_for(name)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_sample(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_sample(unexpected)})")
        head_roots = {row.key.split(".")[0] for row in rows if _is_head(row)}
        if all(key.split(".")[0] in head_roots for key in missing | unexpected):
            parts.append("only the head differs: reinit_head=True loads the rest")
        raise ValueError(
            f"{source} does not hold a {name} in {layout.source}'s naming: keys "
            + "; ".join(parts)
        )
    flat: dict[str, np.ndarray] = {}
    for row in used:
        leaf_shapes = [shapes[leaf] for leaf in row.leaves]
        tensor = row.transform.adapt(np.asarray(state[row.key]), leaf_shapes)
        want = row.transform.torch_shape(leaf_shapes)
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(
                f"{name}: {row.key!r} has shape {tuple(tensor.shape)} in {source}; the model "
                f"expects {tuple(want)} (gapjax {', '.join(row.leaves) or '-'})"
            )
        for leaf, value in zip(row.leaves, row.transform.to_flax(tensor, leaf_shapes)):
            flat[leaf] = np.ascontiguousarray(value, dtype=np.float32)
    skipped_leaves = [leaf for row in rows if skipped(row) for leaf in row.leaves]
    return flat, skipped_leaves, skip_head


def variables_from_state_dict(
    name: str,
    model: Any,
    state: Mapping[str, np.ndarray],
    *,
    skip_head: str | None = None,
    seed: int = 0,
    source: str = "the file",
) -> dict[str, Any]:
    """gapjax variables of ``model`` (registered as ``name``) from a torch state dict.

    ``skip_head`` as in ``load_leaves``; skipped leaves are freshly initialised with
    ``seed``. Raises ValueError on missing or unexpected keys and on any shape mismatch.
    """
    flat, skipped, _ = load_leaves(name, model, state, skip_head=skip_head, source=source)
    if skipped:
        fresh = _initial_head(model, _abstract_variables(model), seed)
        for leaf in skipped:
            flat[leaf] = fresh[leaf]
    return jax.tree.map(jnp.asarray, _unflatten(flat))


def load(
    name: str,
    path: str | Path,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    seed: int = 0,
    **model_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """Builds model ``name`` and fills it from a torchvision / timm weight file.

    Args:
      name: a gapjax model name with a layout (``names()``), e.g. ``"resnet50"``.
      path: ``.safetensors`` (no torch needed) or ``.pth`` / ``.pt`` / ``.bin``.
      num_classes: None = the file's class count. Another count re-initialises the
        classifier (``head/classifier``, seeded by ``seed``) and logs one line saying so.
      reinit_head: re-initialise the whole head and ignore the file's head tensors (a
        different head or pool than the file's).
      model_kwargs: further ``gapjax.models.get`` options (``dtype``, ``pool``, ...).

    Returns ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``
    (float32); ``model.apply(variables, images [B, H, W, 3], train=False)`` gives the
    logits the torch model gives for the same NCHW images.
    """
    state = read_state_dict(path)
    model = _build(name, 1000 if num_classes is None else num_classes, model_kwargs)
    shapes = flatten_shapes(_abstract_variables(model))
    file_classes = _file_num_classes(_checked_tensors(name, shapes), shapes, state)
    classes = num_classes if num_classes is not None else file_classes
    if classes is None:
        if reinit_head:
            raise ValueError(f"{path}: its head does not fit the model's, so it does not "
                             "tell the class count; pass num_classes=K with reinit_head=True")
        classes = model.num_classes  # the strict check below names what does not fit
    if int(classes) != model.num_classes:
        model = _build(name, classes, model_kwargs)
    skip = None
    if reinit_head:
        skip = "head"
        logger.warning("%s: the head is re-initialised (reinit_head=True, seed %d); the "
                       "file's head tensors are not used", name, seed)
    elif file_classes is not None and int(classes) != file_classes:
        skip = "classifier"
        logger.warning("%s: %s has %d classes, the model %d: the classifier "
                       "(head/classifier) is re-initialised (seed %d)",
                       name, Path(path).name, file_classes, int(classes), seed)
    elif file_classes is None and not any(
            _is_classifier(row) and row.key in state for row in _checked_tensors(name, shapes)):
        skip = "classifier"
        logger.warning("%s: %s has no classifier: head/classifier is initialised for %d "
                       "classes (seed %d)", name, Path(path).name, int(classes), seed)
    variables = variables_from_state_dict(name, model, state, skip_head=skip, seed=seed,
                                          source=str(path))
    return model, variables


def state_dict_from_variables(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{torch key: NumPy array}`` of gapjax ``variables`` of model ``name``."""
    variables = {key: value for key, value in variables.items()
                 if key in ("params", "batch_stats")}
    flat_values = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        flat_values["/".join(str(getattr(k, "key", k)) for k in key_path)] = np.asarray(leaf)
    shapes = {path: tuple(value.shape) for path, value in flat_values.items()}
    state = {}
    for row in _checked_tensors(name, shapes):
        tensor = row.transform.to_torch([flat_values[leaf] for leaf in row.leaves])
        state[row.key] = np.array(tensor, order="C")  # keeps 0-d counters 0-d
    return state


def save(name: str, variables: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``variables`` of model ``name`` to ``path`` (``.safetensors``) in the torch
    naming: ``torchvision.models.<name>()`` / ``timm.create_model(name)`` accept it with
    ``load_state_dict(..., strict=True)`` (BatchNorm counters are written as 0)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"save writes safetensors: the path must end in {SAFETENSORS_SUFFIX}; "
                         f"got {str(path)!r}")
    state = state_dict_from_variables(name, variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt", "gapjax_model": name})
    return path


__all__ = [
    "CONV",
    "CONV1X1_DENSE",
    "COUNTER",
    "DENSE",
    "IDENTITY",
    "LAYOUTS",
    "FlattenDense",
    "Layout",
    "TorchTensor",
    "Transform",
    "describe",
    "layout_for",
    "load",
    "load_leaves",
    "names",
    "read_state_dict",
    "save",
    "state_dict_from_variables",
    "variables_from_state_dict",
]


# --------------------------------------------------------------------------------------
# Modern GAP backbones (EfficientNet, MobileNetV3, RegNetY, ConvNeXt): each model file
# holds its timm layout as data (TIMM_LAYOUTS: renames, named kernel transforms); they
# are registered here until the layouts move beside their models.
# --------------------------------------------------------------------------------------

from gapjax.models import convnext, efficientnet, mobilenetv3, regnet  # noqa: E402

_TRANSFORMS = {"conv": CONV, "dense": DENSE, "conv1x1_dense": CONV1X1_DENSE}
for _family in (efficientnet, mobilenetv3, regnet, convnext):
    for _prefix, _spec in _family.TIMM_LAYOUTS.items():
        LAYOUTS.add(_prefix, Layout(
            source="timm", renames=_spec["renames"],
            kernels=tuple((pattern, _TRANSFORMS[kind]) for pattern, kind in _spec["kernels"]),
            torch_models=_spec["torch_models"]))
