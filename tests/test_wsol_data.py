"""The WSOL benchmark readers on a synthetic tree in the reference's metadata layout."""

from __future__ import annotations

import os

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers.wsol_tree import make_tree

from gapjax import data, imagenet, wsol
from gapjax.data import wsol_benchmarks as wb


def _config(name, root, **extra):
    config = ml_collections.ConfigDict({
        "name": name, "image_root": os.path.join(root, "images"),
        "metadata_root": os.path.join(root, "metadata"), "image_size": 32,
        "resize_size": 40, "data_dir": os.path.join(root, "tfds")})
    config.update(extra)
    return config


def _all(config, split, batch_size=4):
    batches = list(data.make_iterator(config, split, batch_size=batch_size, seed=0,
                                      train=False))
    real = np.concatenate([b["weight"] for b in batches]) > 0
    return {key: np.concatenate([b[key] for b in batches])[real] for key in batches[0]}


@pytest.fixture(scope="module")
def box_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cub"))
    return root, make_tree(root, "boxes")


@pytest.fixture(scope="module")
def mask_tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("openimages"))
    return root, make_tree(root, "masks", split_sizes={"train": 4, "val": 5, "test": 3})


def test_metadata_reader_parses_every_file(box_tree):
    root, written = box_tree
    meta = wb.read_metadata(os.path.join(root, "metadata", "val"))
    assert list(meta.image_ids) == [r["id"] for r in written["val"]]
    assert list(meta.labels) == [r["label"] for r in written["val"]]
    assert list(meta.sizes) == [r["size"] for r in written["val"]]
    assert [list(b) for b in meta.boxes] == [r["boxes"] for r in written["val"]]
    assert len(meta.boxes[0]) == 2  # several lines of one image are several boxes
    with pytest.raises(FileNotFoundError, match="metadata_root must be the benchmark"):
        wb.read_metadata(os.path.join(root, "metadata"))


def test_box_benchmark_batches_and_exact_box_round_trip(box_tree):
    root, written = box_tree
    config = _config("wsol_cub", root)
    info = data.dataset_info(config)
    assert (info.num_classes, info.input_shape) == (200, (32, 32, 3))
    assert (info.train_split, info.eval_split) == ("train", "train_fullsup")
    assert info.num_examples == {"train": 12, "train_fullsup": 6}
    for split, folder in (("train_fullsup", "val"), ("test", "test")):
        got = _all(config, split)
        assert got["image"].shape == (6, 32, 32, 3) and got["image"].dtype == np.float32
        assert got["label"].tolist() == [r["label"] for r in written[folder]]
        assert got["image_size"].tolist() == [[r["size"][1], r["size"][0]]
                                              for r in written[folder]]
        for bbox, size, record in zip(got["bbox"], got["image_size"], written[folder]):
            real = bbox[(bbox >= 0).all(axis=1)]
            # Stored as float32 normalised boxes; the compatibility mode gets the pixels back.
            assert wsol.boxes_to_reference(real, size).tolist() == \
                [list(b) for b in record["boxes"]]
            x0, y0, x1, y1 = record["boxes"][0]
            width, height = record["size"]
            np.testing.assert_allclose(real[0], [y0 / height, x0 / width, (y1 + 1) / height,
                                                 (x1 + 1) / width], rtol=1e-6)
    train = next(iter(data.make_iterator(config, "train", batch_size=5, seed=1, train=True)))
    assert set(train) == {"image", "label", "weight"}
    assert train["image"].shape == (5, 32, 32, 3)


def test_evaluation_images_are_resized_like_the_reference(box_tree):
    from PIL import Image

    root, written = box_tree
    config = _config("wsol_cub", root)
    got = _all(config, "test")
    record = written["test"][0]
    with Image.open(os.path.join(root, "images", record["id"])) as image:
        expected = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR))
    restored = got["image"][0] * np.array(imagenet.STD) + np.array(imagenet.MEAN)
    np.testing.assert_allclose(restored * 255, expected, atol=1e-3)


def test_nearest_resize_matches_opencv():
    rng = np.random.default_rng(0)
    for source_h, source_w, target in ((500, 375, 224), (37, 91, 32), (224, 224, 224),
                                       (7, 300, 64), (1000, 999, 224)):
        array = rng.random((source_h, source_w)).astype(np.float32)
        expected = cv2.resize(array, (target, target), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal(wb.resize_nearest(array, target, target), expected)


def test_mask_benchmark_gives_reference_masks_and_pxap(mask_tree):
    root, written = mask_tree
    config = _config("wsol_openimages", root)
    got = _all(config, "train_fullsup")
    assert "bbox" not in got
    masks = got["segmentation"]
    assert masks.shape == (5, 32, 32) and set(np.unique(masks)) <= {0, 1, 255}
    for mask, record in zip(masks, written["val"]):
        images = os.path.join(root, "images")
        gray = cv2.imread(os.path.join(images, record["masks"][0]), cv2.IMREAD_GRAYSCALE)
        foreground = cv2.resize(np.float32(gray), (32, 32),
                                interpolation=cv2.INTER_NEAREST) > 0.5
        ignore = cv2.resize(np.float32(cv2.imread(os.path.join(images, record["ignore"]),
                                                  cv2.IMREAD_GRAYSCALE)),
                            (32, 32), interpolation=cv2.INTER_NEAREST) > 0.5
        expected = foreground.astype(np.uint8) + 255 * (ignore & ~foreground).astype(np.uint8)
        assert np.array_equal(mask, expected)
    assert (masks == 255).any() and (masks == 1).any()
    perfect = (masks == 1).astype(np.float64)
    assert wsol.pxap(perfect, masks) == pytest.approx(1.0)
    assert wsol.pxap(perfect, masks, protocol="wsolevaluation") == pytest.approx(100.0)


def test_missing_keys_and_splits_fail_clearly(box_tree):
    root, _ = box_tree
    with pytest.raises(ValueError, match=r"config.dataset.image_root is required"):
        data.dataset_info(ml_collections.ConfigDict({"name": "wsol_cub",
                                                     "metadata_root": root}))


def test_tfds_caltech_birds_route():
    config = ml_collections.ConfigDict({"name": "wsol_cub_tfds", "image_size": 32,
                                        "resize_size": 40})
    with tfds.testing.mock_data(num_examples=6):
        info = data.dataset_info(config)
        assert (info.num_classes, info.eval_split, info.input_shape) == (200, "test",
                                                                         (32, 32, 3))
        batch = next(iter(data.make_iterator(config, "test", batch_size=3, seed=0,
                                             train=False)))
        assert batch["image"].shape == (3, 32, 32, 3)
        assert batch["bbox"].shape == (3, 1, 4) and batch["image_size"].shape == (3, 2)
        train = next(iter(data.make_iterator(config, "train", batch_size=2, seed=0,
                                             train=True)))
        assert set(train) == {"image", "label", "weight"}


def test_training_methods_in_the_pipeline(box_tree):
    root, _ = box_tree
    has = _config("wsol_cub", root, wsol_method="has", has_grid_size=8)
    batch = next(iter(data.make_iterator(has, "train", batch_size=4, seed=0, train=True)))
    patches = batch["image"].reshape(4, 4, 8, 4, 8, 3)
    hidden = ~patches.any(axis=(2, 4, 5))  # whole 8x8 patches at 0 (the mean colour)
    assert 0.2 < hidden.mean() < 0.8
    cutmix = _config("wsol_cub", root, wsol_method="cutmix")
    batches = data.make_iterator(cutmix, "train", batch_size=4, seed=0, train=True)
    batch = next(iter(batches))
    assert set(batch) == {"image", "label", "label_mix", "mix", "weight"}
    assert np.all((batch["mix"] > 0) & (batch["mix"] <= 1)) and len(set(batch["mix"])) == 1
    assert sorted(batch["label_mix"]) == sorted(batch["label"])  # a permutation of the batch
    with pytest.raises(ValueError, match="wsol_method='spg' is not one of"):
        data.dataset_info(_config("wsol_cub", root, wsol_method="spg"))
