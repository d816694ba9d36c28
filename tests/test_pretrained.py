"""gapjax.pretrained against torchvision and timm: every supported model, random weights.

For each model a randomly initialised torch model (BatchNorm affine parameters and running
statistics made non-trivial) is saved as .pth and .safetensors; ``pretrained.load`` of
either file gives the same variables, the same eval-mode logits (relative error <= 1e-5)
and the same predicted classes; ``pretrained.save`` writes a file the torch model loads
with ``strict=True`` and the round trip returns every tensor bit for bit.

Cost: the ResNets run at 64x64 (batch 2; the 101-layer ones batch 1), the VGGs at 64x64
with the published trunk; vgg16 keeps its full 4096-wide head (one test with the 138M
parameters), the other VGGs a 64-wide head (the same flatten permutation). Programs
compile with the fast XLA options of tests/test_models.py.
"""

from __future__ import annotations

import logging
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.torch_reference import import_timm, import_torchvision, randomize_

from gapjax import pretrained

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
SERESNETS = ("seresnet18", "seresnet34", "seresnet50", "seresnet101")
VGGS = ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn")
#: The VGGs tested with a narrow head: torch model classifier widths and gapjax options.
NARROW_HEAD = 64


def torch_model(name: str, num_classes: int = 1000, narrow: bool = False) -> torch.nn.Module:
    """torchvision's resnet* / vgg*, timm's seresnet*, random weights; ``narrow`` gives a
    VGG a ``NARROW_HEAD``-wide classifier (same flatten layout, 1/1500 of the weights)."""
    torch.manual_seed(0)
    if name.startswith("seresnet"):
        model = import_timm().create_model(name, pretrained=False, num_classes=num_classes)
    else:
        model = getattr(import_torchvision().models, name)(num_classes=num_classes)
    if narrow:
        model.classifier[0] = torch.nn.Linear(512 * 7 * 7, NARROW_HEAD)
        model.classifier[3] = torch.nn.Linear(NARROW_HEAD, NARROW_HEAD)
        model.classifier[6] = torch.nn.Linear(NARROW_HEAD, num_classes)
    return randomize_(model, seed=len(name))


def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def gapjax_logits(model, variables, images: np.ndarray) -> np.ndarray:
    def apply(variables, images):
        return model.apply(variables, images, train=False)

    compiled = jax.jit(apply).lower(variables, images).compile(FAST_COMPILE)
    return np.asarray(compiled(variables, jnp.asarray(images)))


def images_for(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)


def save_both(model: torch.nn.Module, directory) -> tuple:
    from safetensors.torch import save_file

    pth, safetensors = directory / "weights.pth", directory / "weights.safetensors"
    state = model.state_dict()
    torch.save(state, pth)
    save_file({k: v.contiguous() for k, v in state.items()}, str(safetensors))
    return pth, safetensors


def assert_trees_equal(first, second) -> None:
    assert jax.tree.structure(first) == jax.tree.structure(second)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def check_model(name, tmp_path, *, batch=2, size=64, narrow=False, **gapjax_kwargs):
    reference = torch_model(name, narrow=narrow)
    pth, safetensors = save_both(reference, tmp_path)
    model, variables = pretrained.load(name, safetensors, **gapjax_kwargs)
    _, from_pth = pretrained.load(name, pth, **gapjax_kwargs)
    assert_trees_equal(variables, from_pth)

    images = images_for(batch, size)
    expected = torch_logits(reference, images)
    actual = gapjax_logits(model, variables, images)
    assert actual.shape == expected.shape == (batch, 1000)
    relative = np.abs(actual - expected).max() / np.abs(expected).max()
    assert relative <= 1e-5, f"{name}: relative logit error {relative:.2e}"
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))

    # save -> torch strict load -> every tensor unchanged (counters are written as 0).
    written = pretrained.save(name, variables, tmp_path / "gapjax.safetensors")
    from safetensors.torch import load_file

    clone = torch_model(name, narrow=narrow)
    clone.load_state_dict(load_file(str(written)), strict=True)
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(clone.state_dict()[key], value, rtol=0, atol=0)
    return model, variables


@pytest.mark.parametrize("name", [n for n in RESNETS + SERESNETS if not n.endswith("101")])
def test_resnets_match_torch(name, tmp_path):
    check_model(name, tmp_path)


@pytest.mark.parametrize("name", ["resnet101", "seresnet101"])
def test_deep_resnets_match_torch(name, tmp_path):
    check_model(name, tmp_path, batch=1)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg16_bn"])
def test_vggs_match_torch(name, tmp_path):
    check_model(name, tmp_path, narrow=True, fc_widths=(NARROW_HEAD, NARROW_HEAD))


def test_vgg16_with_its_full_head_matches_torch(tmp_path):
    check_model("vgg16", tmp_path, batch=1)


def test_round_trip_through_torch_is_exact(tmp_path):
    reference = torch_model("seresnet18")
    _, safetensors = save_both(reference, tmp_path)
    _, variables = pretrained.load("seresnet18", safetensors)
    written = pretrained.save("seresnet18", variables, tmp_path / "out.safetensors")
    clone = torch_model("seresnet18")
    from safetensors.torch import load_file

    clone.load_state_dict(load_file(str(written)), strict=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in clone.state_dict().items()},
                "epoch": 3}, tmp_path / "wrapped.pth")
    _, again = pretrained.load("seresnet18", tmp_path / "wrapped.pth")
    assert_trees_equal(variables, again)


# --------------------------------------------------------------------------------------
# Class counts, strictness, errors (no compilation)
# --------------------------------------------------------------------------------------


def test_other_class_count_reinitialises_the_classifier_and_says_so(tmp_path, caplog):
    reference = torch_model("resnet18")
    _, safetensors = save_both(reference, tmp_path)
    _, full = pretrained.load("resnet18", safetensors)
    with caplog.at_level(logging.WARNING, logger="gapjax.pretrained"):
        model, variables = pretrained.load("resnet18", safetensors, num_classes=10)
    lines = [r.getMessage() for r in caplog.records if r.name == "gapjax.pretrained"]
    assert len(lines) == 1 and "1000 classes, the model 10" in lines[0]
    assert "re-initialised" in lines[0]
    assert model.num_classes == 10
    classifier = variables["params"]["head"]["classifier"]
    assert classifier["kernel"].shape == (512, 10) and classifier["bias"].shape == (10,)
    assert float(jnp.std(classifier["kernel"])) > 0
    del variables["params"]["head"], full["params"]["head"]
    assert_trees_equal(variables, full)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.numpy import save_file

    state = pretrained.read_state_dict(save_both(torch_model("resnet18"), tmp_path)[1])
    broken = dict(state)
    del broken["layer2.0.conv1.weight"]
    broken["extra.weight"] = np.zeros(3, np.float32)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing \(layer2\.0\.conv1\.weight\).*"
                                         r"1 unexpected \(extra\.weight\)"):
        pretrained.load("resnet18", tmp_path / "broken.safetensors")
    misshaped = dict(state, **{"layer3.1.bn2.running_var": np.ones(7, np.float32)})
    save_file(misshaped, str(tmp_path / "misshaped.safetensors"))
    with pytest.raises(ValueError, match=r"'layer3\.1\.bn2\.running_var' has shape \(7,\).*"
                                         r"expects \(256,\)"):
        pretrained.load("resnet18", tmp_path / "misshaped.safetensors")
    with pytest.raises(ValueError, match=r"does not hold a resnet34 in torchvision's naming"):
        pretrained.load("resnet34", tmp_path / "weights.safetensors")


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[reference\]"'):
        pretrained.read_state_dict(tmp_path / "w.pth")


def test_damaged_files_are_named_and_saved_files_honour_the_umask(tmp_path):
    model = pretrained.models.get("resnet18", num_classes=3, base_width=2)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables = jax.tree.map(lambda leaf: np.full(leaf.shape, 0.5, leaf.dtype), shapes)
    previous = os.umask(0o027)
    try:
        path = pretrained.save("resnet18", variables, tmp_path / "w.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    whole = path.read_bytes()
    for name, content in (("cut.safetensors", whole[:len(whole) // 2]),
                          ("cut.pth", b"\x80\x02garbage")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"weight file '.*{name}' is truncated or corrupt"):
            pretrained.read_state_dict(tmp_path / name)


def test_unknown_names_and_suffixes_list_the_choices(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown suffix '\.npz'; choose one of: \.safetensors"):
        pretrained.read_state_dict(tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"no pretrained weight layout for model 'cnn'; "
                                         r"supported: .*resnet101"):
        pretrained.layout_for("cnn")
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        pretrained.save("resnet18", {}, tmp_path / "out.pth")


def test_layout_table_names_torch_keys_shapes_and_transforms():
    rows = {key: (shape, leaves, transform)
            for key, shape, leaves, transform in pretrained.describe("vgg16_bn")}
    assert rows["features.1.running_var"] == ((64,), ("batch_stats/bn1_1/var",), "identity")
    assert rows["features.40.weight"][0] == (512, 512, 3, 3)  # the last conv, then its BN
    assert rows["features.41.weight"][1] == ("params/bn5_3/scale",)
    assert rows["classifier.0.weight"] == ((4096, 25088), ("params/head/fc1/kernel",),
                                           "flatten_dense(7, 7)")
    assert rows["classifier.6.weight"][0] == (1000, 4096)
    se = {key: transform for key, _, _, transform in pretrained.describe("seresnet50")}
    assert se["layer4.2.se.fc1.weight"] == "conv" and se["fc.weight"] == "dense"


def test_reinit_head_puts_a_gap_head_on_a_torchvision_vgg_trunk(tmp_path, caplog):
    _, safetensors = save_both(torch_model("vgg11", narrow=True), tmp_path)
    _, fc = pretrained.load("vgg11", safetensors, fc_widths=(NARROW_HEAD, NARROW_HEAD))
    with pytest.raises(ValueError, match=r"4 unexpected \(classifier\.3\.bias.*; only the head "
                                         r"differs: reinit_head=True loads the rest"):
        pretrained.load("vgg11", safetensors, head="gap")
    with pytest.raises(ValueError, match=r"pass num_classes=K with reinit_head=True"):
        pretrained.load("vgg11", safetensors, head="gap", reinit_head=True)
    with caplog.at_level(logging.WARNING, logger="gapjax.pretrained"):
        model, gap = pretrained.load("vgg11", safetensors, head="gap", reinit_head=True,
                                     num_classes=1000)
    assert "the head is re-initialised" in caplog.records[-1].getMessage()
    assert model.head == "gap"
    assert gap["params"]["head"]["classifier"]["kernel"].shape == (512, 1000)
    del gap["params"]["head"], fc["params"]["head"]
    assert_trees_equal(gap, fc)
