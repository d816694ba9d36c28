"""GIN regression of RDKit-computed targets of real molecules (the ``chem`` extra).

    python train.py --config configs/molecules.py --workdir runs/mol_sum
    python train.py --config configs/molecules.py:mean,aromatic_fraction --workdir runs/mol

``model.pool``: the graph readout (sum | mean | max, any ``POOLS`` name);
``dataset.targets``: one or more of heavy_atoms, molecular_weight, tpsa (additive),
aromatic_fraction, sp3_carbon_fraction, mean_atomic_mass (intensive), has_halogen,
has_sulfur (presence), comma-separated, or ``all``. Metrics: ``eval/r2`` (mean R^2 over
the targets), ``eval/r2_<k>``, ``eval/mae`` and ``eval/loss`` (MSE), all on standardised
targets (``gapjax.data.molecules``, docs/datasets.md). Graph batches are packed: use
``parallel="jit"``.
"""

from __future__ import annotations

import ml_collections

from gapjax.train.defaults import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config; ``arg`` optionally ``"READOUT,TARGET[,TARGET...]"``."""
    config = base_config()
    config.batch_size = 64
    config.total_steps = 2000
    config.eval_every = 500
    config.checkpoint_every = 500

    config.dataset.name = "molecules"
    config.dataset.targets = "molecular_weight"
    # A typed None, so that --config.dataset.source_file=FILE.smi can set it.
    config.dataset.source_file = ml_collections.config_dict.placeholder(str)
    config.dataset.augment = False  # readouts are invariant to atom order

    config.model.name = "gin"
    config.model.pool = "sum"
    config.model.aggregator = "sum"
    config.model.num_layers = 3
    config.model.hidden = 64
    config.model.jumping_knowledge = True

    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 50

    if arg:
        readout, _, targets = arg.partition(",")
        config.model.pool = readout
        if targets:
            config.dataset.targets = targets
    return config
