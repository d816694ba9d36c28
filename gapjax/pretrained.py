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

This module is the engine; the mapping between the two namings is data that lives beside
each model: a ``Layout`` per family in ``gapjax.models.layouts.LAYOUTS`` (see that module
for how a family adds one and for the transforms; ``LAYOUTS`` and ``Layout`` are
re-exported here). ``describe(name)`` returns a
model's table (torch key, shape, gapjax leaves, transform).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

from gapjax import models
from gapjax.models.layouts import IDENTITY, LAYOUTS, Layout, Shape, TorchTensor, Transform

logger = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
#: Keys under which training scripts wrap the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "state", "net",
                "module", "params")
#: Prefixes that wrappers add to every key (DataParallel, torch.compile).
KEY_PREFIXES = ("module.", "_orig_mod.")


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
    prefixes = LAYOUTS.names()
    return [name for name in models.names() if any(name.startswith(p) for p in prefixes)]


#: gapjax's own naming, for a gapjax run's variables as a state dict (``gapjax_state_dict``):
#: the key of ``params/layer1_0/conv1/kernel`` is ``layer1_0.conv1.kernel``.
GAPJAX_NAMING = Layout(source="gapjax", tensors_fn=lambda shapes: [
    TorchTensor(".".join(path.split("/")[1:]), (path,), IDENTITY) for path in shapes])


def gapjax_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``variables`` (``params``, ``batch_stats``) keyed in ``GAPJAX_NAMING``."""
    flat = traverse_util.flatten_dict(
        {key: variables[key] for key in ("params", "batch_stats") if variables.get(key)})
    return {".".join(path[1:]): np.asarray(leaf) for path, leaf in flat.items()}


def flatten_shapes(variables: Mapping[str, Any]) -> dict[str, Shape]:
    """``{"params/layer1_0/conv1/kernel": shape}`` of a variable tree (or of shapes)."""
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    return {path: tuple(int(n) for n in np.shape(leaf)) for path, leaf in flat.items()}


def _checked_tensors(name: str, shapes: Mapping[str, Shape], layout: Layout | None = None
                     ) -> list[TorchTensor]:
    """The rows of ``layout`` (default: model ``name``'s), checked to cover every leaf
    exactly once with unique keys."""
    rows = (layout or layout_for(name)).tensors(shapes)
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
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    return {path: np.asarray(leaf) for path, leaf in flat.items()
            if path.split("/")[1:2] == ["head"]}


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
    layout: Layout | None = None,
) -> tuple[dict[str, np.ndarray], list[str], str | None]:
    """The gapjax leaves of ``model`` held by a torch ``state`` dict, checked strictly.

    ``skip_head``: None (load everything), ``"classifier"`` or ``"head"`` (leave those
    leaves out and ignore the file's tensors for them), or ``"auto"`` (the least of these
    that fits the file). ``new_modules``: top-level gapjax modules a fine-tuning run adds
    to the published network (WSOL's ``conv6_1`` on VGG-16); those the file does not hold
    are skipped like the head, those it holds are loaded. Returns ``(flat leaves
    {"params/..": array}, skipped leaf paths, the resolved skip_head)``. ``shapes``
    (``flatten_shapes`` of the model's variables) defaults to the model traced at 224x224
    (32x32 for the cifar stem). ``layout``: the file's naming (default: model ``name``'s;
    ``GAPJAX_NAMING`` for a gapjax run). Raises ValueError on missing or unexpected keys and
    on any shape mismatch, naming keys and shapes.
    """
    if shapes is None:
        shapes = flatten_shapes(_abstract_variables(model))
    layout = layout or layout_for(name)
    rows = _checked_tensors(name, shapes, layout)
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
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))


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
    flat_values = {path: np.asarray(leaf) for path, leaf
                   in traverse_util.flatten_dict(variables, sep="/").items()}
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
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise ValueError(f"save writes safetensors: the path must end in {SAFETENSORS_SUFFIX}; "
                         f"got {str(path)!r}")
    state = state_dict_from_variables(name, variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written through open() so the file honours the umask (safetensors' save_file makes
    # it 0600).
    path.write_bytes(safetensors.numpy.save(state, metadata={"format": "pt",
                                                             "gapjax_model": name}))
    return path


# --------------------------------------------------------------------------------------
# Reading files
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
    prefixes are unwrapped). Half-precision tensors are returned as float32. A missing,
    truncated or unreadable file raises one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *TORCH_SUFFIXES):
        raise ValueError(f"weight file {str(path)!r}: unknown suffix {suffix!r}; choose one "
                         f"of: {SAFETENSORS_SUFFIX}, {', '.join(TORCH_SUFFIXES)}")
    if suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"weight file {str(path)!r} ({suffix}) needs PyTorch to read: pip install -e "
                '".[reference]", or convert it to .safetensors, which needs no torch') from None
    try:
        if suffix == SAFETENSORS_SUFFIX:
            state = dict(safetensors.numpy.load_file(str(path)))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            state = {str(key): _torch_to_numpy(value)
                     for key, value in _unwrap(obj, str(path)).items()
                     if isinstance(value, torch.Tensor)}
    except ValueError:
        raise
    except Exception as error:  # safetensors' and torch's errors on a damaged file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"weight file {str(path)!r} is truncated or corrupt ({reason}); "
                         "download or convert it again") from None
    return _strip_prefixes(state)


__all__ = ["GAPJAX_NAMING", "LAYOUTS", "Layout", "TorchTensor", "Transform", "describe",
           "flatten_shapes", "gapjax_state_dict", "layout_for", "load", "load_leaves", "names",
           "read_state_dict", "save", "state_dict_from_variables", "variables_from_state_dict"]
