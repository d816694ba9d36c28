"""Localization metrics on hand-made maps and boxes whose answers are known."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from gapjax import wsol
from gapjax.layers import Classifier


def _block(shape, rows, cols, value=1.0, into=None):
    """A map with ``value`` on rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``."""
    score = np.zeros(shape) if into is None else into
    score[rows[0]:rows[1], cols[0]:cols[1]] = value
    return score


# ----------------------------------------------------------------------------- boxes, IoU


def test_box_iou_known_values():
    unit = [0.0, 0.0, 1.0, 1.0]
    iou = wsol.box_iou([unit, [0.0, 0.0, 0.5, 1.0]], [unit, [0.0, 0.5, 1.0, 1.0], [2, 2, 3, 3]])
    np.testing.assert_allclose(iou, [[1.0, 0.5, 0.0], [0.5, 1 / 3, 0.0]])
    assert wsol.box_iou([[0.2, 0.2, 0.2, 0.5]], [unit])[0, 0] == 0  # degenerate box


def test_box_of_a_block_uses_pixel_edges_and_keeps_orientation():
    score = _block((8, 16), (2, 6), (4, 16))  # 4 rows x 12 columns, touching the right edge
    boxes = wsol.boxes_from_score_map(score, 0.5)
    np.testing.assert_allclose(boxes, [[2 / 8, 4 / 16, 6 / 8, 1.0]])


def test_largest_component_versus_all_components_8_connected():
    score = _block((10, 10), (0, 2), (0, 2))  # 4 pixels
    score[2, 2] = 1.0  # touches the block diagonally: same 8-connected component
    score = _block((10, 10), (6, 10), (5, 8), into=score)  # 12 pixels
    largest = wsol.boxes_from_score_map(score, 0.0)
    np.testing.assert_allclose(largest, [[0.6, 0.5, 1.0, 0.8]])
    every = wsol.boxes_from_score_map(score, 0.0, multi_contour=True)
    np.testing.assert_allclose(sorted(every.tolist()), [[0, 0, 0.3, 0.3], [0.6, 0.5, 1.0, 0.8]])
    assert wsol.boxes_from_score_map(np.zeros((4, 4)), 0.0).shape == (0, 4)


# ----------------------------------------------------------------------------- MaxBoxAcc


def test_max_box_acc_known_fraction_with_wrong_and_missing_maps():
    shape = (16, 32)
    truth = np.array([[0.25, 0.25, 0.75, 0.75]] * 4)
    maps = np.stack([
        _block(shape, (4, 12), (8, 24)),  # exact
        _block(shape, (4, 12), (8, 24), 0.7),  # exact, lower peak
        _block(shape, (0, 4), (0, 8)),  # elsewhere: IoU 0
        np.zeros(shape),  # nothing
    ])
    assert wsol.max_box_acc(maps, truth) == pytest.approx(0.5)
    assert wsol.max_box_acc(maps, truth, multi_contour=True) == pytest.approx(0.5)
    # Above 0.7 the second map is empty: only the first image is found.
    assert wsol.max_box_acc(maps, truth, thresholds=[0.8, 0.9]) == pytest.approx(0.25)


def test_the_best_threshold_is_chosen_over_the_grid():
    # A halo of 0.4 around a core of 1.0 that is exactly the true box.
    score = _block((20, 20), (0, 20), (0, 20), 0.4)
    score = _block((20, 20), (5, 15), (5, 15), 1.0, into=score)
    truth = [[0.25, 0.25, 0.75, 0.75]]  # halo box IoU = 0.25
    assert wsol.max_box_acc(score[None], truth) == 1.0
    assert wsol.max_box_acc(score[None], truth, thresholds=[0.0, 0.1, 0.3]) == 0.0
    largest, _ = wsol.iou_curves(score[None], truth, [0.3, 0.4, 0.5])
    np.testing.assert_allclose(largest, [[0.25, 1.0, 1.0]])  # foreground is score > tau
    # GT-known localization: calibrated over the grid by default, or at a fixed threshold.
    assert wsol.gt_known_localization(score[None], truth) == 1.0
    assert wsol.gt_known_localization(score[None], truth, threshold=0.2) == 0.0


def test_v1_largest_component_misses_what_v2_multi_contour_finds():
    score = _block((20, 20), (0, 4), (0, 20))  # 80 pixels, a distractor
    score = _block((20, 20), (10, 18), (10, 18), into=score)  # 64 pixels, the object
    truth = [[0.5, 0.5, 0.9, 0.9]]
    assert wsol.max_box_acc(score[None], truth) == 0.0
    assert wsol.max_box_acc(score[None], truth, multi_contour=True) == 1.0


def test_v2_averages_iou_thresholds_03_05_07():
    # Estimated box rows 0..9 x all columns; true box rows 0..5 x all: IoU = 0.6.
    score = _block((10, 10), (0, 10), (0, 10))
    truth = [[0.0, 0.0, 0.6, 1.0]]
    assert wsol.max_box_acc(score[None], truth, iou_threshold=0.5) == 1.0
    assert wsol.max_box_acc(score[None], truth, iou_threshold=0.7) == 0.0
    assert wsol.max_box_acc_v2(score[None], truth) == pytest.approx(2 / 3)


def test_iou_exactly_at_the_threshold_counts_and_padded_boxes_are_ignored():
    score = _block((8, 8), (0, 4), (0, 8))  # box (0, 0, 0.5, 1)
    truth = np.array([[[0.0, 0.0, 1.0, 1.0], [-1, -1, -1, -1]]])  # IoU exactly 0.5
    assert wsol.max_box_acc(score[None], truth) == 1.0
    several = np.array([[[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]]])  # best of M boxes
    assert wsol.max_box_acc(score[None], several, iou_threshold=0.99) == 1.0


def test_constant_maps():
    truth_full = [[0.0, 0.0, 1.0, 1.0]]
    # All zeros: nothing is ever above a threshold.
    assert wsol.max_box_acc(np.zeros((1, 6, 6)), truth_full) == 0.0
    # All ones: the whole image, which is the right answer only for a whole-image box.
    assert wsol.max_box_acc(np.ones((1, 6, 6)), truth_full) == 1.0
    assert wsol.max_box_acc(np.ones((1, 6, 6)), [[0.0, 0.0, 0.5, 0.5]]) == 0.0


def test_top1_and_gt_known_localization():
    shape = (10, 10)
    maps = np.stack([_block(shape, (0, 5), (0, 5))] * 3 + [_block(shape, (5, 10), (5, 10))])
    truth = [[0.0, 0.0, 0.5, 0.5]] * 4
    assert wsol.gt_known_localization(maps, truth) == pytest.approx(0.75)
    top1 = wsol.top1_localization(maps, truth, predictions=[1, 2, 0, 3], labels=[1, 2, 1, 3])
    assert top1 == pytest.approx(0.5)  # image 2 misclassified, image 3 mislocalized


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"score_maps must lie in \[0, 1\]"):
        wsol.max_box_acc(np.full((1, 4, 4), 2.0), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        wsol.max_box_acc(np.full((1, 4, 4), np.nan), [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \[N, 4\]"):
        wsol.max_box_acc(np.zeros((2, 4, 4)), [[0, 0, 1, 1]])


# ----------------------------------------------------------------------------- PxAP


def test_pxap_known_values_and_sklearn_agreement():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 12)) < 0.3
    assert wsol.pxap(masks.astype(float), masks) == pytest.approx(1.0)
    # A constant map ranks nothing: precision is the foreground fraction at full recall.
    assert wsol.pxap(np.zeros((3, 8, 12)), masks) == pytest.approx(masks.mean())
    # Scores on the threshold grid: every distinct score is a PR point, as in sklearn's AP.
    scores = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=masks.shape)
    expected = average_precision_score(masks.ravel(), scores.ravel())
    assert wsol.pxap(scores, masks) == pytest.approx(expected, abs=1e-12)
    # Histograms from two batches add up to the whole set's.
    first = wsol.pixel_histograms(scores[:1], masks[:1])
    second = wsol.pixel_histograms(scores[1:], masks[1:])
    summed = wsol.pxap_from_histograms(first[0] + second[0], first[1] + second[1])
    assert summed == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- evaluator


class IdentityFeatureNet(Classifier):
    """Features = the image itself; GAP head. With kernel [[1, -1]], class 0's CAM is the
    image."""

    def backbone(self, x, train):
        del train
        return x


def test_localization_evaluator_on_maps_with_known_answers():
    model = IdentityFeatureNet(num_classes=2)
    variables = {"params": {"head": {"classifier": {
        "kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.array([0.0, 0.0])}}}}
    shape = (12, 20)  # non-square
    images = np.stack([
        _block(shape, (3, 9), (5, 15)),  # found, class right
        _block(shape, (3, 9), (5, 15)),  # found, labelled 1 but predicted 0
        _block(shape, (0, 3), (0, 4)),  # wrong place
        _block(shape, (3, 9), (5, 15)),  # padding row: must not count
    ])[..., None].astype(np.float32)
    box = [3 / 12, 5 / 20, 9 / 12, 15 / 20]
    batch = {
        "image": images,
        "label": np.array([0, 1, 0, 0], np.int32),
        "bbox": np.array([[box, [-1] * 4]] * 4, np.float32),
        "segmentation": (images[..., 0] > 0).astype(np.float32),
        "weight": np.array([1, 1, 1, 0], np.float32),
    }
    batch["segmentation"][2] = _block(shape, (3, 9), (5, 15))  # its object is elsewhere
    evaluator = wsol.LocalizationEvaluator(model, method="auto", resize="nearest")
    assert evaluator.method == "cam"
    # Class 1's map is the negated image: the label-1 image has a block-shaped hole.
    evaluator.update(variables, {k: v[:2] for k, v in batch.items()})
    evaluator.update(variables, {k: v[2:] for k, v in batch.items()})
    result = evaluator.result()
    assert set(result) == {"top1_loc", "gt_known_loc", "max_box_acc", "max_box_acc_v2", "pxap",
                           "loc_threshold"}
    # Image 1's true-class map is 1 - block (hole): its box is the whole image, IoU 0.25.
    assert result["max_box_acc"] == pytest.approx(1 / 3)
    assert result["gt_known_loc"] == pytest.approx(1 / 3)
    assert result["top1_loc"] == pytest.approx(1 / 3)
    assert 0 < result["pxap"] < 1
    evaluator.reset()
    with pytest.raises(ValueError, match="before any real image"):
        evaluator.result()
    with pytest.raises(ValueError, match="batch key 'bbox'"):
        evaluator.update(variables, {"image": images, "label": batch["label"]})


def test_centre_baseline_finds_centred_boxes_only():
    from gapjax.experiments import localization

    centre = localization.centre_gaussian_map(16, 16)
    assert centre.max() == pytest.approx(centre[7, 7]) and centre.min() > 0
    boxes = np.array([[[0.25, 0.25, 0.75, 0.75]], [[0.0, 0.0, 0.25, 0.25]]])
    masks = np.zeros((2, 16, 16))
    masks[0, 4:12, 4:12] = masks[1, :4, :4] = 1
    scores = localization.baseline_scores(boxes, masks)
    assert scores["max_box_acc"] == pytest.approx(0.5)  # the centred box, not the corner one
    assert 0 < scores["pxap"] < 1


def test_overlay_grid_draws_maps_true_and_estimated_boxes():
    images = np.zeros((3, 8, 10, 1))
    maps = np.zeros((3, 8, 10))
    maps[:, 2:6, 3:7] = 1.0
    truth = np.array([[[0.0, 0.0, 0.5, 0.5], [-1, -1, -1, -1]]] * 3)
    grid = wsol.overlay_grid(images, maps, truth, columns=2,
                             predicted=[wsol.boxes_from_score_map(m, 0.5) for m in maps])
    assert grid.shape == (16, 20, 3) and grid.dtype == np.uint8
    assert (grid[0, 0] == [0, 255, 0]).all()  # a true box's corner, in green
    assert (grid[2, 3] == [255, 255, 255]).all()  # the estimated box's corner, in white
    assert (grid[8:, 10:] == 255).all()  # the unused fourth tile stays blank
    assert grid[4, 4, 0] > grid[4, 4, 2]  # hot map: red over blue


def test_matplotlib_overlays_are_written_and_boxes_sit_on_pixel_edges(tmp_path):
    patch = wsol.box_patch([0.25, 0.5, 0.75, 1.0], (8, 16), edgecolor="lime")
    assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == (
        7.5, 1.5, 8.0, 4.0)
    images = np.random.default_rng(0).normal(size=(3, 8, 16, 1)).astype(np.float32)
    maps = (images[..., 0] - images.min()) / np.ptp(images)
    out = wsol.draw_overlays(images, maps, titles=["a", "b", "c"],
                             true_boxes=np.array([[[0.25, 0.5, 0.75, 1.0]]] * 3),
                             predicted_boxes=[np.array([[0.0, 0.0, 0.5, 0.5]])] * 3,
                             columns=2, out=str(tmp_path / "grid.png"))
    with open(out, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
