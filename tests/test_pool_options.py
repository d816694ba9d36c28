"""Pool options from the command line: ``--config.model.pool_kwargs.<option>=<value>``."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from gapjax import models
from gapjax.train.defaults import apply_open_overrides, split_open_overrides

DIGITS = str(Path(__file__).resolve().parents[1] / "configs" / "digits.py")


def _config(*overrides: str):
    """The config ``train.py`` would build from ``--config`` and ``overrides`` (it hands
    ml_collections, which reads overrides from ``sys.argv``, the arguments left after the
    open overrides)."""
    argv, open_overrides = split_open_overrides(["train.py", *overrides])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", DIGITS, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    config = values.config
    apply_open_overrides(config, open_overrides)
    return config


def _head_pool_params(config):
    model = models.from_config(config, num_classes=10)
    return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]["head"]["pool"]


def test_pool_kwargs_override_changes_gems_p():
    default = _config(f"--config={DIGITS}:gem")
    assert float(_head_pool_params(default)["p"]) == 3.0
    config = _config(f"--config={DIGITS}:gem", "--config.model.pool_kwargs.p=5",
                     "--config.model.pool_kwargs.per_channel=True")
    assert config.model.pool_kwargs.to_dict() == {"p": 5, "per_channel": True}
    p = _head_pool_params(config)["p"]
    assert p.shape == (128,)
    np.testing.assert_array_equal(p, 5.0)


def test_an_option_the_pool_does_not_have_is_one_clear_error():
    config = _config(f"--config={DIGITS}:lse", "--config.model.pool_kwargs.p=5")
    with pytest.raises(ValueError, match=r"pool 'lse' has no option 'p'.*valid options: .*r"):
        _head_pool_params(config)


def test_other_overrides_are_left_to_ml_collections():
    argv, open_overrides = split_open_overrides(
        ["train.py", "--config.model.pool=gem", "--config.model.pool_kwargs.p=2.5",
         "--config.model.attn_kwargs.reduction=8", "--config.evals.loc.type=localization"])
    assert argv == ["train.py", "--config.model.pool=gem"]
    assert open_overrides == {"model.pool_kwargs.p": "2.5", "model.attn_kwargs.reduction": "8",
                              "evals.loc.type": "localization"}


@pytest.mark.parametrize("order", [1, -1])
def test_open_overrides_combine_with_any_other_in_any_order(order):
    overrides = ["--config.model.pool_kwargs.p=4", "--config.model.pool=gem",
                 "--config.total_steps=3", "--config.model.attn_kwargs.reduction=8",
                 "--config.evals.loc.type=localization", "--config.evals.loc.every=2"]
    config = _config(f"--config={DIGITS}", *overrides[::order])
    assert (config.model.pool, config.total_steps) == ("gem", 3)
    assert config.model.pool_kwargs.to_dict() == {"p": 4}
    assert config.model.attn_kwargs.to_dict() == {"reduction": 8}  # a section it lacked
    assert config.evals.to_dict() == {"loc": {"type": "localization", "every": 2}}
