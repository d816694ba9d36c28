"""Fine-tuning: ``config.init_from`` (weight file or gapjax workdir) and the head's
learning-rate multiplier.

A tiny ResNet-18 (one block per stage, width 4, cifar stem) on the embedded 8x8 digits
stands in for an ImageNet network: its "pretrained" weights are written with
``gapjax.pretrained.save`` for 5 classes, so the 10-class run re-initialises the
classifier. No torch needed.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_digits

from gapjax import models, pretrained
from gapjax.train import init_from
from gapjax.train.loop import run
from gapjax.train.optim import make_optimizer, new_layer_mask
from gapjax.train.state import NO_BAD_STEP, TrainState, zero_sums

TINY_RESNET = {"name": "resnet18", "base_width": 4, "stage_sizes": (1, 1, 1, 1),
               "stem": "cifar", "pool": "gap"}


def tiny_config(steps: int, **overrides):
    config = tiny_digits.get_config(str(steps))
    config.model = dict(TINY_RESNET)
    config.optimizer.schedule = "constant"  # the first steps do not depend on total_steps
    config.optimizer.warmup_steps = 0
    config.checkpoint_every = 2
    config.eval_every = 100
    config.log_every = 2
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def model_kwargs():
    return {k: v for k, v in TINY_RESNET.items() if k != "name"}


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    """A 5-class tiny resnet18 written in torchvision's naming; returns (path, variables)."""
    model = models.get("resnet18", num_classes=5, **model_kwargs())
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(
        lambda s: (0.5 + rng.random(s.shape, np.float32)) if s.ndim == 1
        else 0.2 * rng.standard_normal(s.shape, np.float32), shapes)
    path = pretrained.save("resnet18", variables, tmp_path_factory.mktemp("w") / "r18.safetensors")
    return path, variables


def create_train_state(model, tx, images, seed):
    """A fresh train state with NumPy-random parameters, without compiling ``init`` (the
    random number generator's compile would dominate these tests)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "mean" in name or "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        if "var" in name or "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape, np.float32))

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                      sums=zero_sums(), first_bad_step=jnp.full((), NO_BAD_STEP, jnp.int32))


def _leaves(tree, collection):
    return {f"{collection}/{jax.tree_util.keystr(p)}": np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_initialize_loads_the_trunk_and_keeps_a_fresh_classifier(weight_file, caplog):
    path, source = weight_file
    config = tiny_config(4, init_from=str(path))
    model = models.get("resnet18", num_classes=10, **model_kwargs())
    tx = make_optimizer(config.optimizer, 4)
    fresh = create_train_state(model, tx, jnp.zeros((1, 8, 8, 1)), seed=0)
    with caplog.at_level(logging.WARNING, logger="gapjax.train.init_from"):
        state = init_from.initialize(fresh, model, tx, config)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "head/classifier freshly initialised" in line
    for collection in ("params", "batch_stats"):
        got, want = _leaves(getattr(state, collection), collection), _leaves(
            source[collection], collection)
        new = _leaves(getattr(fresh, collection), collection)
        for key, value in got.items():
            if "classifier" in key:
                np.testing.assert_array_equal(value, new[key])  # the run's own init
                assert value.shape[-1] == 10
            else:
                np.testing.assert_array_equal(value, want[key])


def test_init_from_another_architecture_names_the_keys(weight_file):
    config = tiny_config(4, init_from=str(weight_file[0]))

    def attempt(name, **kwargs):
        config.model.name = name
        model = models.get(name, num_classes=10, **{**model_kwargs(), **kwargs})
        tx = make_optimizer(config.optimizer, 4)
        fresh = create_train_state(model, tx, jnp.zeros((1, 8, 8, 1)), seed=0)
        return init_from.initialize(fresh, model, tx, config)

    with pytest.raises(ValueError, match=r"'bn1\.bias' has shape \(4,\) in .*r18\.safetensors; "
                                         r"the model expects \(8,\)"):
        attempt("resnet18", base_width=8)
    with pytest.raises(ValueError, match=r"does not hold a seresnet18 in timm's naming: keys "
                                         r"16 missing \(layer1\.0\.se\.fc1\.bias"):
        attempt("seresnet18")
    config.init_from = "/no/such/weights.pth"
    with pytest.raises(FileNotFoundError, match=r"config.init_from='/no/such/weights.pth'"):
        attempt("resnet18")


def test_head_lr_multiplier_scales_exactly_the_head_updates():
    params = {"conv1": {"kernel": jnp.ones((3, 3, 1, 4))},
              "head": {"classifier": {"kernel": jnp.ones((4, 10)), "bias": jnp.ones(10)}}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    options = tiny_config(4).optimizer
    options.weight_decay = 1e-3
    base, boosted = make_optimizer(options, 10), None
    options.head_lr_multiplier = 10.0
    boosted = make_optimizer(options, 10)
    state_a, state_b = base.init(params), boosted.init(params)
    for _ in range(3):  # momentum accumulates: the ratio holds at every step
        update_a, state_a = base.update(grads, state_a, params)
        update_b, state_b = boosted.update(grads, state_b, params)
        np.testing.assert_allclose(update_b["head"]["classifier"]["kernel"],
                                   10 * update_a["head"]["classifier"]["kernel"], rtol=1e-6)
        np.testing.assert_array_equal(update_b["conv1"]["kernel"], update_a["conv1"]["kernel"])
    assert new_layer_mask(params)["head"]["classifier"]["bias"] is True
    assert new_layer_mask(params)["conv1"]["kernel"] is False
    options.head_lr_multiplier = -1.0
    with pytest.raises(ValueError, match=r"head_lr_multiplier=-1.0 must be positive"):
        make_optimizer(options, 10)


def test_resume_after_init_from_is_exact(weight_file, tmp_path):
    import shutil

    path, _ = weight_file
    config = tiny_config(4, init_from=str(path), **{"optimizer.head_lr_multiplier": 5.0})
    straight = run(config, tmp_path / "straight")
    # Preempted right after the step-2 checkpoint: the same workdir without what followed.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    metrics = tmp_path / "resumed" / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(True)
                               if json.loads(line)["step"] <= 2))
    resumed = run(config, tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(straight.variables), jax.tree.leaves(resumed.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert metrics.read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    moved = straight.variables["params"]["conv1"]["kernel"]
    assert not np.array_equal(np.asarray(moved), weight_file[1]["params"]["conv1"]["kernel"])

    # A gapjax workdir is a source too: the trunk of the finished run, a 10-class head.
    config = tiny_config(4, init_from=str(tmp_path / "straight"))
    model = models.get("resnet18", num_classes=10, **model_kwargs())
    tx = optax.sgd(0.1)
    fresh = create_train_state(model, tx, jnp.zeros((1, 8, 8, 1)), seed=1)
    state = init_from.initialize(fresh, model, tx, config)
    for a, b in zip(jax.tree.leaves(state.variables()), jax.tree.leaves(straight.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_new_layers_the_file_lacks_keep_their_fresh_init(tmp_path):
    """WSOL's VGG-16 adds conv6_1: declared new (optimizer.head_modules), it starts fresh
    while every published layer loads; undeclared, its absence is an error naming it."""
    images = jnp.zeros((1, 32, 32, 3))
    source = models.get("vgg16", num_classes=10, base_width=8, stem="cifar", head="gap")
    published = source.init(jax.random.key(0), images)
    path = tmp_path / "vgg16.safetensors"
    pretrained.save("vgg16", published, path)
    target = models.get("vgg16", num_classes=5, base_width=8, stem="cifar", head="gap",
                        pool_after=(1, 2, 3, 4), extra_convs=(16,))
    fresh = {f"params/{jax.tree_util.keystr(p, simple=True, separator='/')}": leaf
             for p, leaf in jax.tree_util.tree_leaves_with_path(
                 target.init(jax.random.key(1), images)["params"])}
    with pytest.raises(ValueError, match=r"2 missing \(features\.31\.bias, features\.31\.weight"):
        init_from.initial_leaves(path, "vgg16", target, fresh)
    loaded, kept = init_from.initial_leaves(path, "vgg16", target, fresh, ("head", "conv6_1"))
    assert sorted(kept) == ["params/conv6_1/bias", "params/conv6_1/kernel",
                            "params/head/classifier/bias", "params/head/classifier/kernel"]
    assert set(loaded) | set(kept) == set(fresh)
    np.testing.assert_array_equal(loaded["params/conv5_3/kernel"],
                                  published["params"]["conv5_3"]["kernel"])
