"""Real data prepared offline: fashion_mnist, image_folder, the Fashion-MNIST canvases,
molecules and the OGB molecule datasets (gapjax.data), and their tasks.

Every dataset is built from small files the tests write (IDX files, an image folder with a
corrupt image and a boxes.csv, a few SMILES), so the suite needs neither Debian's
Fashion-MNIST files nor RDKit's bundled data; one test reads the Debian files when present.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers.fashion_files import fake_items, write_fashion_source, write_idx

from gapjax import data, models, tasks
from gapjax.data import (
    canvas,
    fashion_canvas,
    fashion_mnist,
    image_folder,
    molecules,
    ogb,
    pipeline,
)


def dataset_config(name: str, directory, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "data_dir": str(directory), **extra})


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------
# IDX files and fashion_mnist
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fashion_source(tmp_path_factory):
    """Four tiny IDX files (train 20, test 10 images); gzip for train, plain for test."""
    return write_fashion_source(tmp_path_factory.mktemp("fashion_idx"), train=20, test=10)


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("real_tfds")


@pytest.fixture
def no_debian_files(tmp_path, monkeypatch):
    empty = tmp_path / "no-debian"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(empty))
    return empty


def test_read_idx_round_trip_and_one_line_errors(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "images.gz", array)
    np.testing.assert_array_equal(fashion_mnist.read_idx(str(tmp_path / "images.gz"), 3), array)
    write_idx(tmp_path / "labels", np.array([1, 2, 3]))
    # A labels file where images are expected: the magic number says rank 1, not 3.
    with pytest.raises(data.DatasetError, match="magic number 0x00000801, expected 0x00000803"):
        fashion_mnist.read_idx(str(tmp_path / "labels"), 3)
    # Fewer bytes than the header promises.
    raw = (tmp_path / "labels").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(data.DatasetError) as raised:
        fashion_mnist.read_idx(str(tmp_path / "short"), 1)
    assert one_line(raised.value).startswith(str(tmp_path / "short"))
    # A cut gzip stream.
    packed = (tmp_path / "images.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(data.DatasetError) as raised:
        fashion_mnist.read_idx(str(tmp_path / "cut.gz"), 3)
    assert "not a readable gzip-compressed IDX file" in one_line(raised.value)


def test_fashion_mnist_prepared_once_from_source_dir(fashion_source, real_data_dir,
                                                     no_debian_files):
    config = dataset_config("fashion_mnist", real_data_dir, source_dir=str(fashion_source))
    info = data.dataset_info(config)
    assert (info.task, info.num_classes, info.input_shape) == ("classification", 10, (28, 28, 1))
    assert info.num_examples == {"train": 20, "test": 10}
    # Stored exactly: the multiset of (image, label) pairs of the files.
    images, labels = fashion_mnist.load_split("test", source_dir=str(fashion_source),
                                              directory=str(real_data_dir))
    expected = fake_items(10, seed=10)
    assert sorted(zip(map(bytes, images), labels)) == sorted(zip(map(bytes, expected[0]),
                                                                 expected[1]))
    batch = next(data.make_iterator(config, "test", batch_size=4, seed=0, train=False))
    assert batch["image"].shape == (4, 28, 28, 1) and batch["label"].dtype == np.int32
    # Prepared once: found again without any IDX file (Debian's folder is empty here).
    assert fashion_mnist.find_source(None, str(real_data_dir)).is_prepared()
    # 32x32 is the same data zero-padded by 2 pixels (normalised zero = -mean / std).
    padded = dataset_config("fashion_mnist", real_data_dir, image_size=32, augment=False)
    assert data.dataset_info(padded).input_shape == (32, 32, 1)
    wide = next(data.make_iterator(padded, "test", batch_size=4, seed=0, train=False))
    np.testing.assert_allclose(wide["image"][:, 2:30, 2:30], batch["image"], atol=1e-6)
    np.testing.assert_allclose(wide["image"][:, :2], -fashion_mnist.MEAN / fashion_mnist.STD,
                               rtol=1e-6)


def test_fashion_mnist_missing_files_name_every_place(tmp_path, no_debian_files):
    with pytest.raises(data.DatasetError) as raised:
        data.dataset_info(dataset_config("fashion_mnist", tmp_path / "tfds"))
    message = one_line(raised.value)
    for part in (str(no_debian_files), str(tmp_path / "tfds"), "no TFDS fashion_mnist",
                 "apt-get install dataset-fashion-mnist", "--config.dataset.source_dir=DIR",
                 "t10k-labels-idx1-ubyte"):
        assert part in message
    partial = tmp_path / "partial"
    partial.mkdir()
    write_idx(partial / "train-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(data.DatasetError) as raised:
        data.dataset_info(dataset_config("fashion_mnist", tmp_path / "tfds",
                                         source_dir=str(partial)))
    message = one_line(raised.value)
    assert str(partial) in message and "missing train-images-idx3-ubyte[.gz]" in message
    assert "train-labels-idx1-ubyte[.gz]," not in message


def test_fashion_mnist_reads_a_tfds_prepared_copy(tmp_path, no_debian_files):
    with tfds.testing.mock_data(num_examples=6):
        config = dataset_config("fashion_mnist", tmp_path)
        info = data.dataset_info(config)
        assert info.num_classes == 10 and info.input_shape == (28, 28, 1)
        batch = next(data.make_iterator(config, "train", batch_size=4, seed=0, train=True))
        assert batch["image"].shape == (4, 28, 28, 1) and np.isfinite(batch["image"]).all()


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_files_have_the_published_split():
    paths, missing = fashion_mnist.idx_paths(fashion_mnist.DEBIAN_DIR)
    assert not missing
    for split, count in (("train", 60_000), ("test", 10_000)):
        labels = fashion_mnist.read_idx(paths[split][1], 1)
        # Balanced classes: 6,000 / 1,000 of each of the 10.
        assert np.bincount(labels, minlength=10).tolist() == [count // 10] * 10
    assert fashion_mnist.read_idx(paths["test"][0], 3).shape == (10_000, 28, 28)


# --------------------------------------------------------------------------------------
# image_folder
# --------------------------------------------------------------------------------------


def make_folder(root, *, gray: bool = False, boxes: bool = True):
    """train/{boot,coat}: 3 images each (+ a corrupt file), test/{boot,coat}: 2 each; every
    image a different size and one flat value (so a test can find it again)."""
    from PIL import Image

    values = {}
    for split, count in (("train", 3), ("test", 2)):
        for class_index, name in enumerate(("coat", "boot")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                value = 30 + 60 * class_index + 15 * index + (5 if split == "test" else 0)
                shape = (20 + 4 * index, 30) if gray else (20 + 4 * index, 30, 3)
                pixels = np.full(shape, value, np.uint8)
                path = f"{split}/{name}/{index}.png"
                Image.fromarray(pixels).save(root / path)
                values[path] = value
    (root / "train" / "coat" / "broken.png").write_bytes(b"not an image")
    if boxes:
        (root / "boxes.csv").write_text(
            "path,x0,y0,x1,y1\n"
            "test/boot/0.png,0,0,15,10\n"
            "test/boot/0.png,15,10,30,20\n"
            "test/coat/1.png,3,6,9,12\n")
    return values


def test_image_folder_prepared_with_boxes_and_scored(tmp_path, capfd):
    values = make_folder(tmp_path / "photos")
    config = dataset_config("image_folder", tmp_path / "tfds", source_dir=str(tmp_path / "photos"),
                            image_size=16)
    info = data.dataset_info(config)
    # Classes sorted by name: boot = 0, coat = 1; the corrupt file is skipped.
    assert (info.num_classes, info.input_shape, info.eval_split) == (2, (16, 16, 3), "test")
    assert info.num_examples == {"train": 6, "test": 4}
    stderr = capfd.readouterr().err
    assert f"skipped unreadable image {tmp_path / 'photos' / 'train/coat/broken.png'}" in stderr
    assert "6 train, 4 test images in 2 classes (1 unreadable skipped; 3 boxes on 2 images)" \
        in stderr

    batch = next(data.make_iterator(config, "test", batch_size=4, seed=0, train=False))
    assert batch["bbox"].shape == (4, 2, 4)
    source = pipeline._source(pipeline._resolve(config), "test")
    stored = {int(source[i]["image"][0, 0, 0]): i for i in range(len(source))}
    boot = source[stored[values["test/boot/0.png"]]]
    assert int(boot["label"]) == 0
    np.testing.assert_allclose(boot["bbox"], [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]])
    coat = source[stored[values["test/coat/1.png"]]]
    np.testing.assert_allclose(coat["bbox"], [[6 / 24, 3 / 30, 12 / 24, 9 / 30], [-1] * 4],
                               rtol=1e-6)
    # Normalised with the training split's statistics.
    train = next(data.make_iterator(config, "train", batch_size=6, seed=0, train=False))
    assert abs(float(train["image"].mean())) < 1e-4


def load_config(name: str, argument: str = ""):
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument)


def test_image_folder_config_trains_and_scores_localization(tmp_path):
    """configs/image_folder.py end to end: the loop's localization evaluator scores the
    class activation maps against boxes.csv."""
    from gapjax.train import run

    make_folder(tmp_path / "photos")
    config = load_config("image_folder")
    config.dataset.update(source_dir=str(tmp_path / "photos"), data_dir=str(tmp_path / "tfds"),
                          image_size=16)
    config.model.update(widths=(4, 8), strides=(1, 2))
    config.eval.localization = True
    config.update(batch_size=4, total_steps=1, log_every=1, eval_every=1, checkpoint_every=1,
                  progress="none")
    metrics = run(config, tmp_path / "run").metrics
    assert metrics["step"] == 1 and 0.0 <= metrics["eval/max_box_acc"] <= 1.0
    assert np.isfinite(metrics["train/loss"])


def test_fashion_mnist_config_variants():
    cnn, resnet = load_config("fashion_mnist"), load_config("fashion_mnist", "resnet18")
    assert (cnn.dataset.name, cnn.model.name, cnn.model.head) == ("fashion_mnist", "cnn", "gap")
    assert (resnet.model.name, resnet.model.stem, resnet.dataset.image_size) == (
        "resnet18", "cifar", 32)
    with pytest.raises(ValueError, match="choose one of: cnn, resnet18"):
        load_config("fashion_mnist", "vgg")


def test_image_folder_prepares_again_only_when_the_folder_changes(tmp_path):
    from PIL import Image

    make_folder(tmp_path / "photos", gray=True, boxes=False)
    config = dataset_config("image_folder", tmp_path / "tfds", source_dir=str(tmp_path / "photos"),
                            image_size=8)
    info = data.dataset_info(config)
    assert info.input_shape == (8, 8, 1) and info.num_examples["train"] == 6  # all gray
    assert "bbox" not in next(data.make_iterator(config, "test", batch_size=2, seed=0,
                                                 train=False))
    first = image_folder.builder_config(config)
    assert image_folder.ImageFolderBuilder(first, str(tmp_path / "tfds")).is_prepared()
    assert image_folder.builder_config(config) == first  # unchanged: the same prepared data
    Image.fromarray(np.full((9, 9), 7, np.uint8)).save(tmp_path / "photos/train/boot/new.png")
    changed = image_folder.builder_config(config)
    assert changed.name != first.name
    assert not image_folder.ImageFolderBuilder(changed, str(tmp_path / "tfds")).is_prepared()
    assert data.dataset_info(config).num_examples["train"] == 7


@pytest.mark.parametrize(("layout", "expected"), [
    ({}, "not a folder"),
    ({"test/a/x.png": b""}, "no train/ folder"),
    ({"train/a/x.png": b""}, "no held-out split folder"),
    ({"train/x.png": b"", "test/a/y.png": b""}, "train/x.png is not inside a class folder"),
    ({"train/a/x.png": b"", "test/b/y.png": b""}, "class folder test/b is not a class"),
    ({"train/a/x.png": b"", "val/a/y.png": b"", "boxes.csv": b"val/a/y.png,1,2,x,4\n"},
     "boxes.csv:1: coordinates must be numbers"),
    ({"train/a/x.png": b"", "val/a/y.png": b"",
      "boxes.csv": b"path,x0,y0,x1,y1\nval/a/z.png,1,2,3,4\n"},
     "boxes.csv:2: 'val/a/z.png' is not an image of the folder"),
    ({"train/a/x.png": b"", "val/a/y.png": b"", "boxes.csv": b"val/a/y.png,5,2,3,4\n"},
     "an empty box"),
])
def test_image_folder_misshapen_folders_are_one_line(tmp_path, layout, expected):
    root = tmp_path / "folder"
    for path, content in layout.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    with pytest.raises(data.DatasetError) as raised:
        image_folder.scan_folder(str(root))
    assert expected in one_line(raised.value)


def test_image_folder_training_shift_and_flip_move_boxes_with_the_image():
    rng = np.random.default_rng(0)
    mask = np.zeros((16, 16), bool)
    mask[3:9, 2:12] = True
    example = {"image": (mask[..., None] * 200).astype(np.uint8), "label": 1,
               "bbox": np.stack([canvas.mask_box(mask), np.full(4, -1.0, np.float32)]),
               "mean_": np.zeros(1, np.float32), "std_": np.ones(1, np.float32),
               "max_shift_": 3, "flip_": True}
    flips = 0
    for _ in range(12):
        out = image_folder.preprocess(example, rng)
        moved = out["image"][..., 0] > 0.5
        np.testing.assert_allclose(out["bbox"][0], canvas.mask_box(moved), atol=1e-6)
        np.testing.assert_array_equal(out["bbox"][1], -1.0)
        flips += not np.array_equal(moved[:, ::-1], moved)
    assert flips > 0


# --------------------------------------------------------------------------------------
# fashion_canvas and fashion_mosaic
# --------------------------------------------------------------------------------------


def test_fashion_canvas_item_box_mask_and_label_are_exact():
    images, labels = fake_items(30, seed=1)
    kwargs = {"canvas_size": 64, "num_pieces": 6, "noise": 0.06}
    first = fashion_canvas.cluttered_item_canvas(np.random.default_rng([12, 3]), images,
                                                 labels, **kwargs)
    second = fashion_canvas.cluttered_item_canvas(np.random.default_rng([12, 3]), images,
                                                  labels, **kwargs)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    mask = first["segmentation"].astype(bool)
    np.testing.assert_array_equal(first["bbox"], canvas.mask_box(mask))
    for seed in range(8):
        clean = fashion_canvas.cluttered_item_canvas(
            np.random.default_rng([12, seed]), images, labels, canvas_size=56, num_pieces=0,
            noise=0.0)
        pixels, mask = clean["image"][..., 0], clean["segmentation"].astype(bool)
        assert not pixels[~mask].any() or pixels[~mask].max() < pixels[mask].max() / 2
        # The item's brightness tells its class (40 + 20 k): the label is the drawn item's.
        brightness = np.median(pixels[mask])
        assert abs(brightness - (40 + 20 * clean["label"])) <= 12
        # The item (18 of its 28 rows) is scaled to 3/8-5/8 of the canvas.
        height = clean["bbox"][2] - clean["bbox"][0]
        assert 3 / 8 * 18 / 28 - 0.04 <= height <= 5 / 8 * 18 / 28 + 0.04


def test_fashion_mosaic_items_sit_in_distinct_cells():
    images, labels = fake_items(30, seed=2)
    for seed in range(10):
        example = fashion_canvas.item_mosaic(np.random.default_rng([14, seed]), images, labels,
                                             canvas_size=56)
        boxes, items = example["bbox"], example["items"]
        assert 2 <= len(items) <= 4 and len(set(items.tolist())) == len(items)
        assert example["label"].sum() == len(items) and example["label"][items].all()
        cells = {(int(box[0] >= 0.5), int(box[1] >= 0.5)) for box in boxes}
        assert len(cells) == len(items)
        for box in boxes:  # each box inside one cell
            assert (box[0] >= 0.5) == (box[2] > 0.5) and (box[1] >= 0.5) == (box[3] > 0.5)


def test_fashion_canvas_and_mosaic_batches(fashion_source, real_data_dir):
    common = {"source_dir": str(fashion_source), "canvas_size": 56, "num_train": 6,
              "num_test": 4}
    config = dataset_config("fashion_canvas", real_data_dir, clutter="low", **common)
    info = data.dataset_info(config)
    assert (info.task, info.num_classes, info.input_shape) == ("classification", 10,
                                                               (56, 56, 1))
    assert info.num_examples == {"train": 6, "test": 4}
    batch = next(data.make_iterator(config, "train", batch_size=4, seed=0, train=True))
    assert batch["bbox"].shape == (4, 1, 4) and batch["segmentation"].shape == (4, 56, 56)
    for mask, box in zip(batch["segmentation"], batch["bbox"][:, 0]):  # aligned after shifts
        np.testing.assert_allclose(canvas.mask_box(mask > 0.5), box, atol=1e-6)
    mosaic = dataset_config("fashion_mosaic", real_data_dir, **common)
    info = data.dataset_info(mosaic)
    assert (info.task, info.num_classes) == ("multilabel", 10)
    batch = next(data.make_iterator(mosaic, "test", batch_size=4, seed=0, train=False))
    assert batch["label"].shape == (4, 10) and batch["bbox"].shape == (4, 4, 4)
    np.testing.assert_array_equal((batch["bbox"][..., 0] >= 0).sum(1), batch["label"].sum(1))


# --------------------------------------------------------------------------------------
# molecules
# --------------------------------------------------------------------------------------


def test_atom_features_and_bond_edges_need_no_rdkit():
    # Columns: atomic number, degree, hydrogens, formal charge, aromatic.
    atoms = np.array([[6, 4, 0, 0, 0], [8, 1, 1, 0, 0], [26, 9, 7, 3, 1], [7, 2, 0, -2, 1]])
    features = molecules.atom_features(atoms)
    assert features.shape == (4, molecules.NUM_FEATURES) == (4, 25)
    np.testing.assert_array_equal(features.sum(axis=1), [4, 4, 5, 5])
    elements = features[:, :10].argmax(axis=1)
    assert elements.tolist() == [0, 2, 9, 1]  # C, O, other (Fe), N
    np.testing.assert_array_equal(features[:, 10:16].argmax(1), [4, 1, 5, 2])  # degree, clipped
    np.testing.assert_array_equal(features[:, 16:21].argmax(1), [0, 1, 4, 0])  # hydrogens
    np.testing.assert_array_equal(features[:, 21:24].argmax(1), [1, 1, 2, 0])  # charge -1..1
    senders, receivers = molecules.bond_edges([(0, 1), (1, 2)])
    assert sorted(zip(senders.tolist(), receivers.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]


def test_molecule_batches_have_static_budgets():
    stored = {"atoms": np.array([[6, 1, 3, 0, 0], [8, 1, 1, 0, 0]]), "senders": [0, 1],
              "receivers": [1, 0], "targets": np.arange(8, dtype=np.float32),
              "targets_": np.array([0, 7]), "mean_": np.array([1.0, 2.0], np.float32),
              "std_": np.array([2.0, 4.0], np.float32)}
    graph = molecules.preprocess(stored, None)
    np.testing.assert_allclose(graph["label"], [(0 - 1) / 2, (7 - 2) / 4])
    batch = molecules.collate([graph, graph], 3)
    assert batch["node_features"].shape == (3 * molecules.MAX_ATOMS, 25)
    assert batch["senders"].shape == (3 * 4 * molecules.MAX_ATOMS,)
    np.testing.assert_array_equal(batch["weight"], [1, 1, 0])
    np.testing.assert_allclose(batch["label"][2], 0.0)
    with pytest.raises(ValueError, match="choose from: heavy_atoms"):
        molecules.builder_config({"targets": "weight", "source_file": __file__})


def test_rdkit_targets_of_known_molecules():
    pytest.importorskip("rdkit")
    names = molecules.TARGET_NAMES
    ethanol = dict(zip(names, molecules.molecule_record("CCO")["targets"]))
    assert ethanol["heavy_atoms"] == 3 and abs(ethanol["molecular_weight"] - 46.069) < 1e-2
    assert abs(ethanol["tpsa"] - 20.23) < 1e-2 and ethanol["sp3_carbon_fraction"] == 1.0
    assert abs(ethanol["mean_atomic_mass"] - (2 * 12.011 + 15.999) / 3) < 1e-3
    assert ethanol["aromatic_fraction"] == 0 and ethanol["has_halogen"] == 0
    chlorobenzene = molecules.molecule_record("Clc1ccccc1")
    values = dict(zip(names, chlorobenzene["targets"]))
    assert abs(values["aromatic_fraction"] - 6 / 7) < 1e-6 and values["has_halogen"] == 1
    assert values["has_sulfur"] == 0 and values["sp3_carbon_fraction"] == 0
    assert len(chlorobenzene["senders"]) == 2 * 7  # 7 bonds, both directions
    assert molecules.molecule_record("C1CC") is None  # unclosed ring: RDKit cannot parse it


SMILES = ["CCO", "CS", "c1ccccc1", "CC(=O)O", "ClCCl", "C1CCCCC1", "CCN", "OCC(O)CO",
          "c1ccncc1", "CSC", "not a molecule", "CCCCCCCC", "FC(F)F"]


def test_molecules_through_the_pipeline_and_a_jitted_step(tmp_path):
    pytest.importorskip("rdkit")
    from gapjax.train.state import create_train_state
    from gapjax.train.steps import train_step

    (tmp_path / "few.smi").write_text("# a header line\n" + "\n".join(SMILES) + "\n")
    config = dataset_config("molecules", tmp_path / "tfds", source_file=str(tmp_path / "few.smi"),
                            targets="heavy_atoms,has_sulfur")
    info = data.dataset_info(config)
    assert (info.task, info.num_classes, info.input_shape) == ("graph_regression", 2, (25,))
    assert sum(info.num_examples.values()) == len(SMILES) - 1
    train = next(data.make_iterator(config, "train", batch_size=16, seed=0, train=False))
    real = train["label"][train["weight"] > 0]
    np.testing.assert_allclose(real.mean(axis=0), 0.0, atol=1e-5)  # standardised on train
    task = tasks.get(info.task, num_classes=info.num_classes)
    model = models.get("gin", num_classes=2, hidden=8, num_layers=1, pool="sum")
    import optax

    tx = optax.adam(1e-2)
    state = create_train_state(model, tx, task.init_inputs(train), seed=0)
    step = jax.jit(lambda state, batch: train_step(state, batch, model=model, tx=tx,
                                                   task=task))
    for _ in range(3):
        state = step(state, train)
    assert np.isfinite(float(state.sums["loss_sum"]))


# --------------------------------------------------------------------------------------
# Tasks: regression and multi-label with unmeasured labels
# --------------------------------------------------------------------------------------


def test_regression_task_loss_accuracy_and_r2():
    task = tasks.get("graph_regression", num_classes=2)
    logits = jnp.array([[0.0, 1.0], [2.0, 0.1], [1.0, -1.0]])
    labels = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, -1.0]])
    np.testing.assert_allclose(task.losses(logits, labels), [0.5, 0.505, 0.0], rtol=1e-6)
    np.testing.assert_allclose(task.correct(logits, labels), [0.5, 0.5, 1.0])
    metrics = task.summarize(np.asarray(labels), np.asarray(labels))
    assert metrics["r2"] == 1.0 and metrics["r2_0"] == 1.0
    mean_only = task.summarize(np.tile(np.asarray(labels).mean(0), (3, 1)), np.asarray(labels))
    assert abs(mean_only["r2"]) < 1e-12
    with pytest.raises(ValueError, match="label_smoothing"):
        tasks.get("regression", num_classes=1, label_smoothing=0.1)


def test_graph_multilabel_ignores_unmeasured_labels():
    task = tasks.get("graph_multilabel", num_classes=3)
    logits = jnp.array([[2.0, -1.0, 5.0], [0.5, 0.5, 0.5]])
    labels = jnp.array([[1.0, np.nan, 0.0], [np.nan, np.nan, np.nan]])
    losses = task.losses(logits, labels)
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(5.0))) / 2
    np.testing.assert_allclose(losses, [expected, 0.0], rtol=1e-6)
    np.testing.assert_allclose(task.correct(logits, labels), [0.5, 0.0])
    many = np.array([[1, np.nan, 0], [0, 1, np.nan], [1, 0, 1], [0, np.nan, 0]], np.float32)
    scores = np.array([[3, 9, 0], [-1, 2, 9], [2, -2, 1], [0, 9, -1]], np.float32)
    metrics = task.summarize(scores, many)
    assert metrics["ap_0"] == 1.0 and metrics["roc_auc"] == 1.0 and metrics["map"] == 1.0


# --------------------------------------------------------------------------------------
# OGB molecules prepared by TFDS
# --------------------------------------------------------------------------------------


def ogb_example(rng: np.random.Generator, labels: int) -> dict[str, np.ndarray]:
    count = int(rng.integers(3, 9))
    chain = np.stack([np.arange(count - 1), np.arange(1, count)], axis=1)
    label = rng.integers(0, 2, size=labels).astype(np.float32)
    label[rng.random(labels) < 0.3] = np.nan
    return {"node_feat": rng.integers(0, 5, size=(count, 9)).astype(np.float32),
            "edge_index": chain.astype(np.int64), "labels": label,
            "edge_feat": np.zeros((count - 1, 3), np.float32),
            "num_nodes": np.array([count]), "num_edges": np.array([count - 1])}


def test_ogbg_molpcba_by_name_through_mock_data(tmp_path):
    def as_data_source(builder, split, **kwargs):
        del builder, kwargs
        rng = np.random.default_rng(len(split))
        return [ogb_example(rng, 128) for _ in range(6)]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        config = dataset_config("ogbg_molpcba", tmp_path)
        info = data.dataset_info(config)
        assert (info.task, info.num_classes, info.eval_split) == ("graph_multilabel", 128,
                                                                 "validation")
        assert info.input_shape == (ogb.NUM_FEATURES,) == (174,)
        batch = next(data.make_iterator(config, "validation", batch_size=4, seed=0,
                                        train=False))
    assert batch["node_features"].shape == (4 * 64 + ogb.MAX_NODES, 174)
    assert batch["label"].shape == (4, 128) and np.isnan(batch["label"]).any()
    mask = batch["edge_mask"]
    pairs = set(zip(batch["senders"][mask].tolist(), batch["receivers"][mask].tolist()))
    assert pairs == {(r, s) for s, r in pairs}  # every bond in both directions, once
    sizes = np.bincount(batch["node_graph"][batch["node_mask"]], minlength=4)[:4]
    assert mask.sum() == 2 * (sizes - 1).sum()  # chains: n - 1 bonds each


class OgbgMolhiv(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny stand-in written with ogbg_molpcba's features (TFDS 4.9 has no molhiv)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "node_feat": tfds.features.Tensor(shape=(None, 9), dtype=np.float32),
            "edge_index": tfds.features.Tensor(shape=(None, 2), dtype=np.int64),
            "edge_feat": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
            "num_nodes": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "num_edges": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "labels": tfds.features.Tensor(shape=(1,), dtype=np.float32),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(seed) for seed, split in
                enumerate(("train", "validation", "test"))}

    def _generate_examples(self, seed):
        rng = np.random.default_rng(seed)
        for index in range(5):
            example = ogb_example(rng, 1)
            example["labels"] = np.array([index % 2], np.float32)
            yield index, example


def test_ogbg_molhiv_read_by_name_from_its_prepared_files(tmp_path):
    config = dataset_config("ogbg_molhiv", tmp_path)
    with pytest.raises(data.DatasetError) as raised:
        data.dataset_info(config)
    assert "tfds build ogbg_molhiv" in one_line(raised.value)
    with pipeline._quiet_tfds():
        OgbgMolhiv(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    pipeline._RESOLVED.clear()
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_examples["validation"]) == (1, 5)
    batch = next(data.make_iterator(config, "test", batch_size=8, seed=0, train=False))
    assert batch["label"].shape == (8, 1) and batch["weight"].sum() == 5
    # Each chain of n atoms has n - 1 bonds, read in both directions.
    sizes = np.bincount(batch["node_graph"][batch["node_mask"]], minlength=8)[:5]
    assert batch["edge_mask"].sum() == 2 * (sizes - 1).sum()
