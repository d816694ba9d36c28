"""Training: optimizers, losses, steps, the loop on the embedded digits, errors, configs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import train_runs
from helpers.tiny_digits import get_config as tiny_config

from gapjax.registry import UnknownNameError
from gapjax.tasks import Classification, top_k_correct
from gapjax.train import NonFiniteLossError, TrainResult, base_config, run
from gapjax.train.optim import make_optimizer, make_schedule, weight_decay_mask
from gapjax.train.parallel import BatchSizeError, check_batch_size
from gapjax.train.state import create_train_state
from gapjax.train.steps import train_step

# --------------------------------------------------------------------------------------
# Optimizers and schedules
# --------------------------------------------------------------------------------------


def test_weight_decay_skips_biases_and_norm_scales():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 4))}, "bn": {"scale": jnp.ones(4)},
              "dense": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)}}
    mask = weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False},
                    "dense": {"kernel": True, "bias": False}}
    options = base_config().optimizer
    options.update(name="adamw", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    tx = make_optimizer(options, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # With zero gradients only the decay moves parameters: kernels shrink, the rest stay.
    assert float(updates["dense"]["kernel"][0, 0]) == pytest.approx(-0.05)
    assert float(updates["dense"]["bias"][0]) == 0.0
    assert float(updates["bn"]["scale"][0]) == 0.0


def test_schedules_warm_up_then_decay():
    options = base_config().optimizer
    options.update(learning_rate=1.0, warmup_steps=10, schedule="cosine")
    cosine = make_schedule(options, 110)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    options.update(schedule="step", step_boundaries=(0.5,), step_factor=0.1)
    step = make_schedule(options, 110)
    assert float(step(40)) == pytest.approx(1.0) and float(step(80)) == pytest.approx(0.1)
    options.update(schedule="constant")
    assert float(make_schedule(options, 110)(100)) == pytest.approx(1.0)


def test_sgd_clipping_bounds_the_update():
    options = base_config().optimizer
    options.update(name="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                   schedule="constant", grad_clip=1.0)
    tx = make_optimizer(options, 10)
    params = {"w": jnp.zeros((2, 2))}
    updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("field,value,choices", [
    ("name", "rmsprop", "adamw, sgd"), ("schedule", "linear", "constant, cosine, step")])
def test_unknown_optimizer_or_schedule_lists_choices(field, value, choices):
    options = base_config().optimizer
    options[field] = value
    with pytest.raises(UnknownNameError, match=f"{value!r}; choose one of: {choices}"):
        make_optimizer(options, 10)


# --------------------------------------------------------------------------------------
# Losses and the step
# --------------------------------------------------------------------------------------


def test_label_smoothing_and_top_k():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    labels = jnp.array([0, 1])
    task = Classification(num_classes=3, label_smoothing=0.3)
    plain = task.losses(logits, labels)  # evaluation: never smoothed
    assert np.allclose(plain, -jax.nn.log_softmax(logits)[jnp.arange(2), labels], atol=1e-6)
    smooth = task.losses(logits, labels, train=True)
    expected = -(0.8 * jax.nn.log_softmax(logits)[jnp.arange(2), labels]
                 + 0.1 * jax.nn.log_softmax(logits).sum(-1) - 0.1
                 * jax.nn.log_softmax(logits)[jnp.arange(2), labels])
    assert np.allclose(smooth, expected, atol=1e-5)
    assert top_k_correct(logits, labels, 1).tolist() == [1.0, 0.0]
    assert top_k_correct(logits, labels, 2).tolist() == [1.0, 1.0]


class _TinyNet:
    """A Dense classifier with the model interface the step expects."""

    def __init__(self):
        import flax.linen as nn

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x, train=False):
                return nn.Dense(3)(x.reshape(x.shape[0], -1))

        self.module = Net()


def test_padding_rows_never_change_the_update():
    model = _TinyNet().module
    options = base_config().optimizer
    options.update(schedule="constant", learning_rate=0.1)
    tx = make_optimizer(options, 10)
    x = np.random.default_rng(0).normal(size=(4, 2, 2, 1)).astype(np.float32)
    state = create_train_state(model, tx, x[:1], seed=0)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx,
                                     task=Classification(num_classes=3)))
    real = {"image": x[:2], "label": np.array([0, 1], np.int32), "weight": np.ones(2, np.float32)}
    garbage = np.full((2, 2, 2, 1), 1e6, np.float32)
    padded = {"image": np.concatenate([x[:2], garbage]), "label": np.array([0, 1, 2, 2], np.int32),
              "weight": np.array([1, 1, 0, 0], np.float32)}
    a, b = step(state, real), step(state, padded)
    assert np.allclose(a.params["Dense_0"]["kernel"], b.params["Dense_0"]["kernel"], atol=1e-6)
    assert float(a.sums["loss_sum"]) == pytest.approx(float(b.sums["loss_sum"]), rel=1e-6)


def test_batch_size_must_divide_over_devices():
    check_batch_size(32, 4, 2)
    with pytest.raises(BatchSizeError, match=r"config.batch_size=30 .* multiple of 4"):
        check_batch_size(30, 4, 1)


# --------------------------------------------------------------------------------------
# The loop on the embedded digits (in process, one device)
# --------------------------------------------------------------------------------------


def test_run_writes_metrics_checkpoints_and_resumes(tmp_path):
    config = tiny_config("12")
    result = run(config, tmp_path)
    assert isinstance(result, TrainResult) and result.workdir == tmp_path
    records = train_runs.read_records(tmp_path)
    assert [r["step"] for r in records] == [5, 6, 10, 12]
    for record in records:
        assert isinstance(record["step"], int)
        assert all(isinstance(v, float) for k, v in record.items() if k != "step")
        assert all(k == "step" or k.startswith(("train/", "eval/")) for k in record)
    assert {"train/loss", "train/accuracy"} <= set(records[0])
    assert {"eval/loss", "eval/accuracy", "eval/top5_accuracy"} <= set(records[-1])
    assert result.metrics["eval/loss"] == records[-1]["eval/loss"]
    assert train_runs.saved_steps(tmp_path) == [8, 12]  # keep_checkpoints = 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    logits = result.model.apply(result.variables, jnp.zeros((2, 8, 8, 1)))
    assert logits.shape == (2, 10)

    # --eval_only restores the latest checkpoint, evaluates it and appends its record.
    evaluated = run(config, tmp_path, eval_only=True)
    assert train_runs.read_records(tmp_path)[:-1] == records
    assert evaluated.metrics["step"] == 12
    assert evaluated.metrics["eval/loss"] == records[-1]["eval/loss"]  # same checkpoint


@pytest.mark.parametrize("section,key,value,needle", [
    ("model", "name", "resnet7", "unknown model 'resnet7'; choose one of:"),
    ("model", "pool", "avg", "unknown pool 'avg'; choose one of:"),
    ("optimizer", "name", "lamb", "unknown optimizer 'lamb'; choose one of: adamw, sgd"),
    ("dataset", "name", "no_such_dataset", "no_such_dataset"),
    ("", "batch_size", 0, "config.batch_size=0 is not divisible"),
    ("", "parallel", "xmap", "config.parallel='xmap' is not a parallel mode"),
    ("evals", "mine", {"type": "mine"}, "unknown evaluator 'mine'; choose one of:"),
    ("", "imports", ("no_such_fork_module",), "config.imports: no module named "
                                               "'no_such_fork_module'"),
    ("", "imports", ("/no/such/fork.py",), "config.imports: no such file: /no/such/fork.py"),
])
def test_bad_config_raises_one_clear_error(tmp_path, section, key, value, needle):
    config = tiny_config("2")
    target = config[section] if section else config
    target[key] = value
    with pytest.raises((ValueError, KeyError)) as error:
        run(config, tmp_path)
    assert needle in str(error.value) and "\n" not in str(error.value)
    if key == "batch_size":
        assert isinstance(error.value, BatchSizeError)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config("12")
    # An infinite step makes every parameter inf or NaN: the loss of step 2 is NaN.
    config.optimizer.update(learning_rate=float("inf"), warmup_steps=0, schedule="constant")
    config.log_every = 1
    config.checkpoint_every = 1
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step (\d+)") as error:
        run(config, tmp_path)
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    assert train_runs.saved_steps(tmp_path)[-1] == bad_step - 1
    assert f"last good checkpoint (step {bad_step - 1})" in str(error.value)


# --------------------------------------------------------------------------------------
# The CLI: one-line errors and locked overrides
# --------------------------------------------------------------------------------------


def test_cli_prints_one_line_errors(tmp_path):
    bad_pool = train_runs.run_train(tmp_path, "--config.model.pool=avgg",
                                    "--config.model.pool_kwargs.p=3")
    assert bad_pool.returncode == 1
    assert bad_pool.stderr.startswith("error: unknown pool 'avgg'; choose one of: ")
    assert len(bad_pool.stderr.strip().splitlines()) == 1
    typo = train_runs.run_train(tmp_path, "--config.model.pooll=gmp")
    assert typo.returncode == 1
    assert typo.stderr.strip() == ('error: --config.model.pooll: unknown or invalid config '
                                   'override: pooll; Did you mean "pool" instead of "pooll"?')


# --------------------------------------------------------------------------------------
# Configs for real datasets build and run one step on mock data
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("module,image_size", [("cifar10_resnet18", None),
                                               ("imagenet_seresnet50", 32)])
def test_real_dataset_configs_run_a_step_on_mock_data(tmp_path, module, image_size):
    import importlib.util

    import tensorflow_datasets as tfds

    path = train_runs.REPO / "configs" / f"{module}.py"
    spec = importlib.util.spec_from_file_location(module, path)
    config_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_module)
    config = config_module.get_config()
    config.update(batch_size=2, total_steps=1, log_every=1, eval_every=1,
                  checkpoint_every=1, progress="none")
    if image_size:
        config.dataset.image_size = image_size
    with tfds.testing.mock_data(num_examples=4):
        result = run(config, tmp_path)
    assert result.metrics["step"] == 1
    assert math.isfinite(result.metrics["train/loss"])
    assert math.isfinite(result.metrics["eval/loss"])
    assert train_runs.saved_steps(tmp_path) == [1]
