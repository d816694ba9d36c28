"""Embedded TFDS datasets and the grain input pipeline (gapjax.data).

Small variants are built once per session into a temporary data directory.
"""

from __future__ import annotations

import threading

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gapjax import data, tasks
from gapjax.data import canvas, cluttered_digits, digits, pipeline


def dataset_config(name: str, directory, **extra) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {"name": name, "data_dir": str(directory), "augment": True, **extra}
    )


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def digits_config(data_dir):
    return dataset_config("gapjax_digits", data_dir)


@pytest.fixture(scope="session")
def cluttered_config(data_dir):
    return dataset_config(
        "gapjax_cluttered_digits",
        data_dir,
        canvas_size=32,
        clutter="low",
        num_train=48,
        num_test=20,
    )


@pytest.fixture(scope="session")
def multilabel_config(data_dir):
    return dataset_config(
        "gapjax_multilabel_digits", data_dir, canvas_size=32, num_train=48, num_test=20
    )


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------
# gapjax_digits
# --------------------------------------------------------------------------------------


def test_digits_split_is_stratified_disjoint_and_complete():
    train_images, train_labels = canvas.digits_split("train")
    test_images, test_labels = canvas.digits_split("test")
    assert (len(train_labels), len(test_labels)) == (1438, 359)
    # scikit-learn's digits: its known class counts, and 20% of each class in test.
    all_counts = np.bincount(np.concatenate([train_labels, test_labels]), minlength=10)
    assert all_counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    test_counts = np.bincount(test_labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 0.5)
    # The two splits together are exactly the bundled digits.
    images, _ = canvas.sklearn_digits()
    together = np.concatenate([train_images, test_images]).reshape(len(images), -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, images.reshape(len(images), -1)))
    assert train_images.dtype == np.uint8 and train_images.max() == 255


def test_digits_info_and_training_batches(digits_config):
    info = data.dataset_info(digits_config)
    assert info == data.DatasetInfo(
        name="gapjax_digits",
        task="classification",
        num_classes=10,
        input_shape=(16, 16, 1),
        num_examples={"train": 1438, "test": 359},
        train_split="train",
        eval_split="test",
    )
    batch = next(data.make_iterator(digits_config, "train", batch_size=64, seed=0, train=True))
    assert batch["image"].shape == (64, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["weight"], np.ones(64, np.float32))
    # Normalised: roughly zero mean, unit spread.
    assert abs(float(batch["image"].mean())) < 0.3 and 0.7 < float(batch["image"].std()) < 1.3
    assert set(np.unique(batch["label"])) <= set(range(10))


def test_digits_native_resolution_config(data_dir):
    config = dataset_config("gapjax_digits", data_dir, image_size=8)
    info = data.dataset_info(config)
    assert info.input_shape == (8, 8, 1)
    batch = next(data.make_iterator(config, "test", batch_size=8, seed=0, train=False))
    assert batch["image"].shape == (8, 8, 8, 1)
    # The stored images are the bundled test digits themselves (in TFDS's file order).
    images, _ = canvas.digits_split("test")
    source = pipeline._source(pipeline._resolve(config), "test")
    stored = [bytes(example["image"]) for example in pipeline._read(source, range(len(source)))]
    assert sorted(stored) == sorted(bytes(image[..., None]) for image in images)


def test_restored_iterator_replays_exactly(digits_config):
    """A resumed run sees exactly the batches of an uninterrupted one, across epochs."""
    kwargs = {"batch_size": 100, "seed": 3, "train": True}
    # 1438 examples, 100 per batch: the epoch boundary falls inside batch 15.
    uninterrupted = take(data.make_iterator(digits_config, "train", **kwargs), 18)
    first = data.make_iterator(digits_config, "train", **kwargs)
    take(first, 12)
    state = first.get_state()
    resumed = data.make_iterator(digits_config, "train", **kwargs)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), uninterrupted[12:])


def test_seeds_epochs_and_augmentation(digits_config):
    def stream(seed, count=2, **extra):
        config = dataset_config("gapjax_digits", digits_config.data_dir, **extra)
        return take(
            data.make_iterator(config, "train", batch_size=64, seed=seed, train=True), count
        )

    assert_batches_equal(stream(1), stream(1))
    assert not np.array_equal(stream(1)[0]["label"], stream(2)[0]["label"])
    # Without augmentation a training epoch holds exactly the evaluation images.
    plain = take(
        data.make_iterator(
            dataset_config("gapjax_digits", digits_config.data_dir, augment=False),
            "train",
            batch_size=719,
            seed=0,
            train=True,
        ),
        4,
    )
    evaluation = list(
        data.make_iterator(digits_config, "train", batch_size=719, seed=0, train=False)
    )
    rows = lambda batches: sorted(bytes(row) for b in batches for row in b["image"])
    assert rows(plain[:2]) == rows(evaluation)
    # The second epoch is shuffled differently from the first.
    assert not np.array_equal(plain[0]["label"], plain[2]["label"])
    # Augmentation changes images but never labels.
    augmented = stream(0, count=1)[0]
    unaugmented = stream(0, count=1, augment=False)[0]
    np.testing.assert_array_equal(augmented["label"], unaugmented["label"])
    assert not np.array_equal(augmented["image"], unaugmented["image"])


def test_evaluation_pass_is_ordered_and_padded(digits_config):
    batches = list(data.make_iterator(digits_config, "test", batch_size=100, seed=0, train=False))
    assert len(batches) == 4
    weights = np.concatenate([b["weight"] for b in batches])
    np.testing.assert_array_equal(weights, (np.arange(400) < 359).astype(np.float32))
    assert np.all(batches[-1]["image"][59:] == 0) and np.all(batches[-1]["label"][59:] == 0)
    again = list(data.make_iterator(digits_config, "test", batch_size=100, seed=7, train=False))
    assert_batches_equal(batches, again)


def test_evaluation_process_shards(digits_config):
    """Each process evaluates its own shard, in the same number of steps as every other."""

    def evaluation(index, count, batch_size=64):
        return list(
            data.make_iterator(
                digits_config,
                "test",
                batch_size=batch_size,
                seed=0,
                train=False,
                process_index=index,
                process_count=count,
            )
        )

    full = evaluation(0, 1)
    parts = [evaluation(index, 3) for index in range(3)]
    assert len({len(part) for part in parts}) == 1
    real = lambda batches: [row for b in batches for row, w in zip(b["image"], b["weight"]) if w]
    assert sum(len(real(part)) for part in parts) == 359
    assert sorted(bytes(r) for p in parts for r in real(p)) == sorted(bytes(r) for r in real(full))
    # 359 over 7 processes: shards of 52 (processes 0-1) or 51. With batches of 51 every
    # process yields two; a 51-example shard's second batch is all padding.
    small = [evaluation(index, 7, batch_size=51) for index in range(7)]
    assert {len(part) for part in small} == {2}
    second_weights = [float(part[1]["weight"].sum()) for part in small]
    assert second_weights == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert sum(float(b["weight"].sum()) for part in small for b in part) == 359.0


@pytest.mark.parametrize("process_count", [2, 3])
def test_processes_split_the_global_batches_of_one_process(digits_config, process_count):
    """P processes of ``b`` rows read, side by side, the one-process batches of ``P * b``
    rows: the same examples and augmentations, across an epoch boundary and a resume."""

    def stream(batch_size, index=0, count=1):
        return data.make_iterator(
            digits_config,
            "train",
            batch_size=batch_size,
            seed=5,
            train=True,
            process_index=index,
            process_count=count,
        )

    # 1438 examples in global batches of 200 / 300: the first epoch ends in batch 8 / 5.
    steps, per_process = 8, 100
    single = take(stream(per_process * process_count), steps)
    parts = [take(stream(per_process, i, process_count), steps) for i in range(process_count)]
    joined = [
        {key: np.concatenate([part[t][key] for part in parts]) for key in single[t]}
        for t in range(steps)
    ]
    assert_batches_equal(joined, single)
    # The last process, restored mid-run, continues with its own rows.
    last = stream(per_process, process_count - 1, process_count)
    take(last, 3)
    resumed = stream(per_process, process_count - 1, process_count)
    resumed.set_state(last.get_state())
    assert_batches_equal(take(resumed, steps - 3), parts[-1][3:])


def test_model_inputs_inside_jit(digits_config):
    info = data.dataset_info(digits_config)
    batch = next(data.make_iterator(digits_config, "test", batch_size=4, seed=0, train=False))
    task = tasks.get(info.task, num_classes=info.num_classes)
    inputs = jax.jit(task.model_inputs)(batch)
    np.testing.assert_array_equal(np.asarray(inputs), batch["image"])


def test_concurrent_first_builds_share_one_dataset(tmp_path):
    """Two workers building the same variant at once: one builds, the other reuses it."""
    builders, errors = [], []

    def build():
        try:
            builders.append(pipeline.prepare_embedded(digits.GapjaxDigits, "8", str(tmp_path)))
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    workers = [threading.Thread(target=build) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors
    assert all(builder.is_prepared() for builder in builders)
    versions = list((tmp_path / "gapjax_digits" / "8").iterdir())
    # One version directory and no leftover temporary one.
    assert [v.name for v in versions] == [str(digits.GapjaxDigits.VERSION)]
    sources = [builder.as_data_source("test") for builder in builders]
    np.testing.assert_array_equal(sources[0][5]["image"], sources[1][5]["image"])


# --------------------------------------------------------------------------------------
# gapjax_cluttered_digits
# --------------------------------------------------------------------------------------


def test_cluttered_canvas_is_deterministic_with_tight_box():
    images, labels = canvas.digits_split("test")
    kwargs = {"canvas_size": 64, "num_pieces": 6, "noise": 0.1}
    first = cluttered_digits.cluttered_canvas(
        np.random.default_rng([2, 5]), images, labels, **kwargs
    )
    second = cluttered_digits.cluttered_canvas(
        np.random.default_rng([2, 5]), images, labels, **kwargs
    )
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    mask = first["segmentation"].astype(bool)
    np.testing.assert_array_equal(first["bbox"], canvas.mask_box(mask))
    ymin, xmin, ymax, xmax = first["bbox"]
    # The digit spans a quarter to a half of the canvas.
    assert 0.2 <= max(ymax - ymin, xmax - xmin) <= 0.5
    assert first["image"].shape == (64, 64, 1) and first["image"].dtype == np.uint8


def test_cluttered_batches_keep_boxes_and_masks_aligned(cluttered_config):
    info = data.dataset_info(cluttered_config)
    assert (info.task, info.input_shape, info.num_examples) == (
        "classification",
        (32, 32, 1),
        {"train": 48, "test": 20},
    )
    batch = next(data.make_iterator(cluttered_config, "train", batch_size=16, seed=0, train=True))
    assert batch["bbox"].shape == (16, 1, 4) and batch["segmentation"].shape == (16, 32, 32)
    for box, mask in zip(batch["bbox"][:, 0], batch["segmentation"]):
        # Augmentation moved image, mask and box together: the box is still tight.
        np.testing.assert_allclose(box, canvas.mask_box(mask > 0.5), atol=1e-6)
    evaluation = list(
        data.make_iterator(cluttered_config, "test", batch_size=16, seed=0, train=False)
    )
    padding = evaluation[-1]["weight"] == 0
    assert padding.sum() == 12 and np.all(evaluation[-1]["bbox"][padding] == -1)


def test_cluttered_rejects_unknown_clutter(data_dir):
    config = dataset_config("gapjax_cluttered_digits", data_dir, clutter="extreme")
    with pytest.raises(ValueError, match=r"config\.dataset\.clutter='extreme'.*low, medium, high"):
        data.dataset_info(config)


# --------------------------------------------------------------------------------------
# gapjax_multilabel_digits
# --------------------------------------------------------------------------------------


def test_multilabel_batches(multilabel_config):
    info = data.dataset_info(multilabel_config)
    assert (info.task, info.num_classes, info.input_shape) == ("multilabel", 10, (32, 32, 1))
    batches = list(data.make_iterator(multilabel_config, "test", batch_size=8, seed=0, train=False))
    label = np.concatenate([b["label"] for b in batches])[:20]
    boxes = np.concatenate([b["bbox"] for b in batches])[:20]
    assert label.dtype == np.float32 and set(np.unique(label)) == {0.0, 1.0}
    counts = label.sum(axis=1)
    assert counts.min() >= 2 and counts.max() <= 4
    real_boxes = np.all(boxes >= 0, axis=-1)
    np.testing.assert_array_equal(real_boxes.sum(axis=1), counts)
    assert np.all(boxes[~real_boxes] == -1)
    for example_boxes, real in zip(boxes, real_boxes):
        placed = example_boxes[real]
        for i in range(len(placed)):
            for j in range(i):
                # Squares overlap by at most 15%; tight boxes inside them by no more.
                assert canvas.box_overlap(placed[i], placed[j]) <= 0.5


# --------------------------------------------------------------------------------------
# A dataset with its own preprocess / collate / model_inputs hooks (graphs)
# --------------------------------------------------------------------------------------


def test_pipeline_uses_the_spec_hooks_of_graph_tasks(data_dir):
    from gapjax.graph import GraphBatch

    config = dataset_config("gapjax_graph_tasks", data_dir, num_train=12, num_test=5)
    info = data.dataset_info(config)
    assert (info.task, info.num_classes, info.input_shape) == ("graph", 2, (3,))
    batch = next(data.make_iterator(config, "train", batch_size=4, seed=0, train=True))
    np.testing.assert_array_equal(batch["weight"], np.ones(4, np.float32))
    graphs = tasks.get(info.task, num_classes=info.num_classes).model_inputs(batch)
    assert isinstance(graphs, GraphBatch)
    assert graphs.node_features.shape[-1] == 3
    evaluation = list(data.make_iterator(config, "test", batch_size=4, seed=0, train=False))
    assert [float(b["weight"].sum()) for b in evaluation] == [4.0, 1.0]


# --------------------------------------------------------------------------------------
# Prepared TFDS datasets and errors
# --------------------------------------------------------------------------------------


def test_prepared_tfds_datasets_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=20):
        cifar = dataset_config("cifar10", tmp_path)
        info = data.dataset_info(cifar)
        assert (info.num_classes, info.input_shape, info.eval_split) == (10, (32, 32, 3), "test")
        batch = next(data.make_iterator(cifar, "train", batch_size=8, seed=0, train=True))
        assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].dtype == np.int32
        evaluation = list(data.make_iterator(cifar, "test", batch_size=8, seed=0, train=False))
        assert [float(b["weight"].sum()) for b in evaluation] == [8.0, 8.0, 4.0]

        imagenet = dataset_config("imagenet2012", tmp_path, image_size=24)
        info = data.dataset_info(imagenet)
        assert (info.num_classes, info.input_shape, info.eval_split) == (
            1000,
            (24, 24, 3),
            "validation",
        )
        batch = next(data.make_iterator(imagenet, "train", batch_size=4, seed=0, train=True))
        assert batch["image"].shape == (4, 24, 24, 3)
        assert np.all(np.isfinite(batch["image"]))


def test_unprepared_dataset_error_names_everything(tmp_path):
    config = dataset_config("cifar10", tmp_path)
    with pytest.raises(data.DatasetError) as raised:
        data.dataset_info(config)
    message = str(raised.value)
    assert "\n" not in message
    for part in ("'cifar10'", "gapjax_digits", str(tmp_path), "tfds build cifar10"):
        assert part in message


def test_unknown_dataset_error(tmp_path):
    config = dataset_config("no_such_dataset", tmp_path)
    with pytest.raises(data.DatasetError, match=r"'no_such_dataset'.*gapjax_cluttered_digits"):
        data.dataset_info(config)


def test_resize_matches_jax_image_resize():
    image = np.random.default_rng(0).random((8, 6, 2), np.float32)
    for shape in ((16, 16), (5, 3)):  # upsampling, and shrinking with antialiasing
        expected = jax.image.resize(image, (*shape, 2), "bilinear", antialias=True)
        np.testing.assert_allclose(canvas.resize(image, *shape), expected, atol=1e-6)


def test_resize_preserves_constants_and_shrinks_with_antialiasing():
    constant = np.full((7, 5, 2), 3.0, np.float32)
    np.testing.assert_allclose(canvas.resize(constant, 11, 4), np.full((11, 4, 2), 3.0), rtol=1e-6)
    stripes = np.tile(np.array([0.0, 1.0], np.float32), 8)[None, :].repeat(4, axis=0)
    # Halving a 1-pixel stripe pattern averages it instead of aliasing to 0 or 1.
    np.testing.assert_allclose(canvas.resize(stripes, 4, 8), 0.5, atol=0.2)
