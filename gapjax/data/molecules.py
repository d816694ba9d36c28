"""``molecules``: real molecules as graphs with targets RDKit computes (the ``chem`` extra).

The source is a SMILES file, by default the sample of ~5,000 NCI molecules that ships
inside RDKit (``RDConfig.RDDataDir/NCI/first_5K.smi``); ``config.dataset.source_file``
names another (one molecule per line, SMILES first; blank and ``#`` lines ignored).
Prepared once as ArrayRecord (TFDS builder ``gapjax_molecules``): RDKit parses every
SMILES (an unparsable one, or one with more than ``MAX_ATOMS`` heavy atoms, is skipped and
counted in one summary line) and computes its targets; a fixed permutation (seed 0) puts
20% of the molecules in ``test``, the rest in ``train``.

Graphs: heavy atoms are nodes, bonds are edges in both directions. Node features
(``atom_features``, NumPy only) concatenate one-hots of the element (``ELEMENTS`` plus
other), the heavy-atom degree (0-5), the attached hydrogens (0-4), the formal charge
(-1, 0, +1) and aromaticity: ``NUM_FEATURES`` = 25 floats. The hydrogens are there
because edges carry no bond order: with them, a carbon's hybridisation (needed for
``sp3_carbon_fraction``) and the molecular weight are functions of the nodes.

Targets (``TARGETS``), of three kinds for the readout study:

* additive (a sum over atoms: a sum readout can represent them exactly):
  ``heavy_atoms``, ``molecular_weight`` (average mass, hydrogens included), ``tpsa``
  (topological polar surface area, Ertl's atom contributions);
* intensive (a mean over atoms: a mean readout can): ``aromatic_fraction`` (aromatic heavy
  atoms / heavy atoms), ``sp3_carbon_fraction`` (RDKit's ``FractionCSP3``: sp3 carbons /
  carbons), ``mean_atomic_mass`` (mean mass of the heavy atoms);
* presence (a max over atoms: a max readout can): ``has_halogen`` (F, Cl, Br or I),
  ``has_sulfur`` (0 or 1).

The learning task is regression (``gapjax.tasks.regression``, task ``graph_regression``)
for every target, presence targets included: each target is standardised with the
training split's mean and standard deviation, the loss is the mean squared error, and
evaluation reports R^2 per target (``eval/r2_<k>``) and their mean (``eval/r2``). One
loss and one scale-free score serve all three kinds, so sum / mean / max readouts compare
on equal terms; for a 0/1 target the squared error is the Brier score and R^2 its skill
over predicting the base rate. ``config.dataset.targets``: a name, a comma-separated list
or ``"all"`` (default ``molecular_weight``); the model has one output per target.

Batches (``collate``): the fields of ``gapjax.graph.GraphBatch`` (budgets ``MAX_ATOMS``
nodes and ``MAX_EDGES`` directed edges per graph), ``label float32 [G, K]`` (standardised
targets) and ``weight [G]``. Only building needs RDKit; reading needs NumPy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import wrapped
from gapjax.data.pipeline import DatasetError
from gapjax.data.spec import DatasetSpec, register
from gapjax.graph import batch_graphs

NAME = "molecules"
#: Elements with their own one-hot column, by atomic number; every other is "other".
ELEMENTS = {6: "C", 7: "N", 8: "O", 9: "F", 15: "P", 16: "S", 17: "Cl", 35: "Br", 53: "I"}
HALOGENS = (9, 17, 35, 53)
SULFUR = 16
MAX_DEGREE = 5
MAX_HYDROGENS = 4
CHARGES = (-1, 0, 1)
NUM_FEATURES = len(ELEMENTS) + 1 + (MAX_DEGREE + 1) + (MAX_HYDROGENS + 1) + len(CHARGES) + 1
#: Stored atom columns: atomic number, heavy-atom degree, hydrogens, formal charge, aromatic.
ATOM_COLUMNS = ("atomic_number", "degree", "hydrogens", "formal_charge", "aromatic")
MAX_ATOMS = 64
MAX_EDGES = 4 * MAX_ATOMS  # directed; a molecule has at most ~1.25 bonds per atom
TARGETS = {
    "heavy_atoms": "additive",
    "molecular_weight": "additive",
    "tpsa": "additive",
    "aromatic_fraction": "intensive",
    "sp3_carbon_fraction": "intensive",
    "mean_atomic_mass": "intensive",
    "has_halogen": "presence",
    "has_sulfur": "presence",
}
TARGET_NAMES = tuple(TARGETS)
DEFAULT_TARGETS = ("molecular_weight",)
TEST_FRACTION = 0.2
SPLIT_SEED = 0
#: The stored data's config name for RDKit's bundled NCI sample.
DEFAULT_BUILD_NAME = "rdkit_nci_first_5k"


# --------------------------------------------------------------------------------------
# Graphs from atoms and bonds (NumPy only)
# --------------------------------------------------------------------------------------


def atom_features(atoms: np.ndarray) -> np.ndarray:
    """Stored atoms ``int [n, 5]`` (``ATOM_COLUMNS``) -> node features ``float32 [n, 25]``.

    One-hots of the element (``ELEMENTS`` + other), degree (clipped to 0..5), hydrogens
    (clipped to 0..4), formal charge (clipped to -1..1) and the aromatic flag.
    """
    atoms = np.asarray(atoms, np.int64).reshape(-1, len(ATOM_COLUMNS))
    count = len(atoms)
    element_index = {number: index for index, number in enumerate(ELEMENTS)}
    elements = np.array([element_index.get(int(z), len(ELEMENTS)) for z in atoms[:, 0]],
                        np.int64)
    parts = [
        np.eye(len(ELEMENTS) + 1, dtype=np.float32)[elements],
        np.eye(MAX_DEGREE + 1, dtype=np.float32)[np.clip(atoms[:, 1], 0, MAX_DEGREE)],
        np.eye(MAX_HYDROGENS + 1, dtype=np.float32)[np.clip(atoms[:, 2], 0, MAX_HYDROGENS)],
        np.eye(len(CHARGES), dtype=np.float32)[np.clip(atoms[:, 3], -1, 1) + 1],
        (atoms[:, 4:5] > 0).astype(np.float32),
    ]
    return np.concatenate(parts, axis=1).reshape(count, NUM_FEATURES)


def bond_edges(bonds: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Undirected bonds ``(i, j)`` -> ``(senders, receivers)`` int32 ``[2b]`` holding both
    directions of every bond."""
    pairs = np.asarray(list(bonds), np.int32).reshape(-1, 2)
    return (np.concatenate([pairs[:, 0], pairs[:, 1]]),
            np.concatenate([pairs[:, 1], pairs[:, 0]]))


def target_values(names: Iterable[str]) -> tuple[int, ...]:
    """Indices into ``TARGET_NAMES`` of ``names`` (checked)."""
    indices = []
    for name in names:
        if name not in TARGETS:
            raise ValueError(f"config.dataset.targets names {name!r}; choose from: "
                             f"{', '.join(TARGET_NAMES)} (or 'all')")
        indices.append(TARGET_NAMES.index(name))
    return tuple(indices)


# --------------------------------------------------------------------------------------
# RDKit (building only)
# --------------------------------------------------------------------------------------


def default_source_file() -> str:
    """RDKit's bundled NCI sample, ``RDConfig.RDDataDir/NCI/first_5K.smi``."""
    try:
        from rdkit import RDConfig
    except ImportError:
        raise DatasetError(f"config.dataset.name={NAME!r} needs RDKit to build its graphs; "
                           "install the chem extra (`pip install gapjax[chem]`)") from None
    return os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def read_smiles(path: str) -> list[str]:
    """The first field of every non-blank, non-``#`` line of a SMILES file."""
    try:
        with open(path) as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise DatasetError(f"config.dataset.source_file={path!r} cannot be read "
                           f"({error.strerror or error})") from None
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


def molecule_record(smiles: str) -> dict[str, np.ndarray] | None:
    """RDKit's view of one SMILES: ``atoms int32 [n, 5]``, ``senders`` / ``receivers``
    int32 ``[2b]`` and ``targets float32 [8]`` (``TARGET_NAMES`` order); None when RDKit
    cannot parse it or it has no heavy atom."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import Descriptors, rdMolDescriptors

    RDLogger.DisableLog("rdApp.*")  # a failed parse is counted, not printed
    molecule = Chem.MolFromSmiles(smiles)
    if molecule is None or molecule.GetNumAtoms() == 0:
        return None
    atom_list = list(molecule.GetAtoms())
    atoms = np.array([[atom.GetAtomicNum(), atom.GetDegree(), atom.GetTotalNumHs(),
                       atom.GetFormalCharge(), int(atom.GetIsAromatic())]
                      for atom in atom_list], np.int32)
    senders, receivers = bond_edges((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())
                                    for bond in molecule.GetBonds())
    numbers = atoms[:, 0]
    values = {
        "heavy_atoms": molecule.GetNumHeavyAtoms(),
        "molecular_weight": Descriptors.MolWt(molecule),
        "tpsa": rdMolDescriptors.CalcTPSA(molecule),
        "aromatic_fraction": float(atoms[:, 4].mean()),
        "sp3_carbon_fraction": rdMolDescriptors.CalcFractionCSP3(molecule),
        "mean_atomic_mass": float(np.mean([atom.GetMass() for atom in atom_list])),
        "has_halogen": float(np.isin(numbers, HALOGENS).any()),
        "has_sulfur": float((numbers == SULFUR).any()),
    }
    return {"atoms": atoms, "senders": senders, "receivers": receivers,
            "targets": np.array([values[name] for name in TARGET_NAMES], np.float32)}


# --------------------------------------------------------------------------------------
# The ArrayRecord builder
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class MoleculesBuildConfig(tfds.core.BuilderConfig):
    """One SMILES file (its content's digest is in the name)."""

    source_file: str = ""


def split_of(count: int) -> np.ndarray:
    """``bool [count]``: True for the molecules (by line) in ``test`` (seeded permutation)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(count)
    is_test = np.zeros(count, bool)
    is_test[order[:round(TEST_FRACTION * count)]] = True
    return is_test


class GapjaxMolecules(tfds.core.GeneratorBasedBuilder):
    """Molecules of a SMILES file as graphs: ``atoms [n, 5]``, ``senders``, ``receivers``,
    ``targets [8]``, ``line`` (the molecule's index among the file's SMILES)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__,
            features=tfds.features.FeaturesDict({
                "atoms": tfds.features.Tensor(shape=(None, len(ATOM_COLUMNS)), dtype=np.int32),
                "senders": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "receivers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "targets": tfds.features.Tensor(shape=(len(TARGET_NAMES),), dtype=np.float32),
                "line": tfds.features.Scalar(dtype=np.int32),
            }),
            # Filled while building: the training targets' mean / std, skipped molecules.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the file is local
        source_file = self.builder_config.source_file or default_source_file()
        smiles = read_smiles(source_file)
        records, skipped = {}, {"unparsable": 0, "too_large": 0}
        for line, text in enumerate(smiles):
            record = molecule_record(text)
            if record is None:
                skipped["unparsable"] += 1
            elif len(record["atoms"]) > MAX_ATOMS or len(record["senders"]) > MAX_EDGES:
                skipped["too_large"] += 1
            else:
                records[line] = record
        if not records:
            raise DatasetError(f"config.dataset.source_file={source_file!r} holds no molecule "
                               "RDKit can parse")
        is_test = split_of(len(smiles))
        lines = {"train": [i for i in records if not is_test[i]],
                 "test": [i for i in records if is_test[i]]}
        train_targets = np.stack([records[i]["targets"] for i in lines["train"]] or
                                 [np.zeros(len(TARGET_NAMES), np.float32)])
        self.info.metadata["mean"] = [float(v) for v in train_targets.mean(axis=0)]
        self.info.metadata["std"] = [float(max(v, 1e-6)) for v in train_targets.std(axis=0)]
        self.info.metadata["skipped"] = skipped
        print(f"{NAME} {source_file}: {len(lines['train'])} train, "
              f"{len(lines['test'])} test molecules ({skipped['unparsable']} unparsable, "
              f"{skipped['too_large']} over {MAX_ATOMS} heavy atoms skipped)",
              file=sys.stderr, flush=True)
        return {split: self._generate_examples(records, members)
                for split, members in lines.items()}

    def _generate_examples(self, records: Mapping[int, dict], lines: list[int]):
        for line in lines:
            yield line, {**records[line], "line": line}


# --------------------------------------------------------------------------------------
# Pipeline hooks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoleculesConfig:
    """The pipeline's config: the SMILES file (by content) and the targets."""

    name: str
    build_name: str  # the stored data's config: the file's stem and content digest
    source_file: str  # "" = RDKit's bundled sample
    targets: tuple[int, ...]


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()[:16]
    except OSError as error:
        raise DatasetError(f"config.dataset.source_file={path!r} cannot be read "
                           f"({error.strerror or error})") from None


def builder_config(dataset_config: Any) -> MoleculesConfig:
    """``config.dataset`` -> ``MoleculesConfig`` (keys ``source_file``, ``targets``)."""
    source_file = dataset_config.get("source_file")
    if source_file:  # the file's content names the stored data
        source_file = os.path.abspath(os.path.expanduser(str(source_file)))
        stem = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(source_file)).strip("_")[:32]
        build_name = f"{stem or 'smiles'}_{_file_digest(source_file)}"
    else:  # RDKit's sample: found (and RDKit needed) only when building
        source_file, build_name = "", DEFAULT_BUILD_NAME
    requested = dataset_config.get("targets") or DEFAULT_TARGETS
    if isinstance(requested, str):
        requested = TARGET_NAMES if requested == "all" else [
            part.strip() for part in requested.split(",") if part.strip()]
    targets = target_values(requested)
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"config.dataset.targets={dataset_config.get('targets')!r} must name "
                         f"distinct targets from: {', '.join(TARGET_NAMES)}")
    name = f"{build_name}_targets" + "-".join(map(str, targets))
    return MoleculesConfig(name, build_name, source_file, targets)


class MoleculesBuilder(wrapped.WrappedBuilder):
    """``molecules`` behind the pipeline's builder interface: one output per target."""

    eval_split = "test"

    def __init__(self, config: MoleculesConfig, data_dir: str, file_format: str = ""):
        super().__init__(config, data_dir, file_format)
        self.num_classes = len(config.targets)
        build_config = MoleculesBuildConfig(name=config.build_name,
                                            description=config.source_file or "RDKit NCI",
                                            source_file=config.source_file)
        self.inner = GapjaxMolecules(config=build_config, data_dir=data_dir,
                                     file_format="array_record")

    def extra_fields(self, split: str) -> dict[str, Any]:
        metadata, targets = self.inner.info.metadata, list(self.builder_config.targets)
        return {"targets_": np.asarray(targets, np.int64),
                "mean_": np.asarray(metadata["mean"], np.float32)[targets],
                "std_": np.asarray(metadata["std"], np.float32)[targets]}


def preprocess(example: Mapping[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """Stored molecule -> one graph: ``node_features float32 [n, 25]``, ``senders``,
    ``receivers`` and ``label float32 [K]`` (standardised targets). ``rng`` is unused:
    readouts are invariant to atom order, so there is nothing to augment."""
    del rng
    targets = np.asarray(example["targets"], np.float32)
    chosen = np.asarray(example.get("targets_", np.arange(len(targets))), np.int64)
    mean = np.asarray(example.get("mean_", 0.0), np.float32)
    std = np.asarray(example.get("std_", 1.0), np.float32)
    return {
        "node_features": atom_features(example["atoms"]),
        "senders": np.asarray(example["senders"], np.int32),
        "receivers": np.asarray(example["receivers"], np.int32),
        "label": ((targets[chosen] - mean) / std).astype(np.float32),
    }


def collate(examples: list[Mapping[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    """Preprocessed molecules -> a static-shape batch: ``GraphBatch`` fields (``MAX_ATOMS``
    nodes and ``MAX_EDGES`` edges per graph slot), ``label float32 [G, K]``, ``weight [G]``."""
    if len(examples) > batch_size:
        raise ValueError(f"collate got {len(examples)} graphs for batch_size={batch_size}")
    graphs = batch_graphs(examples, batch_size * MAX_ATOMS, batch_size * MAX_EDGES, batch_size)
    batch = graphs.to_dict()
    if not examples:  # keep the feature width even for an all-padding batch
        batch["node_features"] = np.zeros((graphs.node_budget, NUM_FEATURES), np.float32)
    width = len(examples[0]["label"]) if examples else 1
    label = np.zeros((batch_size, width), np.float32)
    label[:len(examples)] = [np.asarray(example["label"], np.float32) for example in examples]
    batch["label"] = label
    batch["weight"] = graphs.graph_mask.astype(np.float32)
    return batch


SPEC = register(DatasetSpec(
    name=NAME,
    builder_class=MoleculesBuilder,
    task="graph_regression",
    num_classes=None,
    input_shape=(NUM_FEATURES,),
    builder_config=builder_config,
    preprocess=preprocess,
    collate=collate,
))

__all__ = [
    "ATOM_COLUMNS",
    "ELEMENTS",
    "MAX_ATOMS",
    "NAME",
    "NUM_FEATURES",
    "SPEC",
    "TARGETS",
    "TARGET_NAMES",
    "GapjaxMolecules",
    "MoleculesBuilder",
    "atom_features",
    "bond_edges",
    "builder_config",
    "collate",
    "default_source_file",
    "molecule_record",
    "preprocess",
    "read_smiles",
    "split_of",
    "target_values",
]
