"""``gapjax.experiments.real_readouts`` end to end on a few SMILES (tiny settings)."""

from __future__ import annotations

import json

import pytest

from gapjax.data import molecules
from gapjax.data.pipeline import DatasetError
from gapjax.experiments import real_readouts

# Halogens, sulfur, aromatic rings and sp3 carbons on both sides of the split.
SMILES = ["CCO", "CS", "c1ccccc1", "CC(=O)O", "ClCCl", "C1CCCCC1", "CCN", "OCC(O)CO",
          "c1ccncc1", "CSC", "CCCCCCCC", "FC(F)F", "c1ccsc1", "Brc1ccccc1", "CC(C)S",
          "OC(=O)c1ccccc1", "ClC(Cl)(Cl)Cl", "CCOC(=O)C", "CSSC", "c1ccc2ccccc2c1"]


def test_real_readouts_tiny_run(tmp_path):
    pytest.importorskip("rdkit")
    source = tmp_path / "few.smi"
    source.write_text("\n".join(SMILES) + "\n")
    section = real_readouts.run(tmp_path / "out", quick=True, data_dir=tmp_path / "tfds",
                                source_file=source, seeds=2, steps=2, batch_size=4,
                                num_layers=1, hidden=8, readouts=("pna",))
    numbers = section["numbers"]
    assert list(numbers["readouts"]) == ["sum", "mean", "max", "pna"]
    record = numbers["readouts"]["sum"]
    assert set(record["r2"]) == set(molecules.TARGET_NAMES)
    assert set(record["kinds"]) == set(real_readouts.KINDS)
    assert len(record["kinds"]["additive"]["runs"]) == 2
    rows = numbers["claim_comparisons"]
    assert [(row["kind"], row["claimed"]) for row in rows[::2]] == list(
        real_readouts.CLAIMED.items())
    assert section["holds"] in (True, False, None) and section["verdict"]
    saved = json.loads((tmp_path / "out" / "real_readouts.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert "quoted" in (tmp_path / "out" / "real_readouts.md").read_text()


def test_decision_rule_unknown_settings_and_missing_rdkit(monkeypatch):
    def row(outcome):
        return {"outcome": outcome}
    assert real_readouts.decide([row("helps")] * 6) is True
    assert real_readouts.decide([row("helps")] * 5 + [row("tied")]) is None
    assert real_readouts.decide([row("helps")] * 5 + [row("hurts")]) is False
    with pytest.raises(ValueError, match="real_readouts: unknown settings"):
        real_readouts.run("/nonexistent-out", bogus=1)
    real_find_spec = real_readouts.importlib.util.find_spec
    monkeypatch.setattr(real_readouts.importlib.util, "find_spec",
                        lambda name, *args: None if name == "rdkit" else real_find_spec(name))
    with pytest.raises(DatasetError, match=r"needs RDKit.*gapjax\[chem\]") as error:
        real_readouts.run("/nonexistent-out")
    assert "\n" not in str(error.value)
