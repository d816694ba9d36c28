"""protocol="wsolevaluation": the numbers of Choe et al.'s reference code, exactly.

The test oracle below restates, step by step and one threshold at a time, what the
reference evaluation (github.com/clovaai/wsolevaluation, evaluation.py / inference.py)
does, written here from reading it. gapjax.wsol computes the same numbers differently
(contours once per distinct 8-bit level, vectorised IoU, histograms by searchsorted), so
agreement on maps neither was tuned on is a real check.
"""

from __future__ import annotations

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import wsol
from gapjax.cli import wsol as wsol_cli
from gapjax.layers import Classifier

# ----------------------------------------------------------------------------- the oracle


def oracle_boxes(score_map, tau, multi_contour):
    """Reference: boxes at one threshold (list of [x0, y0, x1, y1]) from OpenCV contours."""
    height, width = score_map.shape
    gray = np.expand_dims((score_map * 255).astype(np.uint8), 2)
    level = int(tau * np.max(gray))
    _, binary = cv2.threshold(gray, level, 255, cv2.THRESH_BINARY)
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[0] if len(found) == 2 else found[1]
    if len(contours) == 0:
        return [[0, 0, 0, 0]]
    if not multi_contour:
        best, best_area = None, None
        for contour in contours:  # Python's max(): the first of equal keys wins
            area = cv2.contourArea(contour)
            if best is None or area > best_area:
                best, best_area = contour, area
        contours = [best]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return boxes


def oracle_iou(a, b):
    """Reference: pixel-inclusive IoU of two integer boxes, 0 for a non-positive union."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * \
        max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    if union <= 0:
        return 0.0
    return np.int64(inter) / np.int64(union)


def oracle_resize_box(box, image_wh, new_wh):
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = (float(v) for v in image_wh)
    nw, nh = (float(v) for v in new_wh)
    return int(x0 * nw / w), int(y0 * nh / h), int(x1 * nw / w), int(y1 * nh / h)


def oracle_max_box_acc(score_maps, boxes_per_image, sizes_wh, taus, iou_percents, multi,
                       resize_length=224):
    """Reference BoxEvaluator: per-IoU MaxBoxAcc (percent), boxes given at original size
    and scaled to ``resize_length`` squared (224 in the reference, whatever the maps)."""
    correct = {p: np.zeros(len(taus)) for p in iou_percents}
    count = 0
    for score_map, boxes, size in zip(score_maps, boxes_per_image, sizes_wh):
        truth = [oracle_resize_box(b, size, (resize_length, resize_length)) for b in boxes]
        best_per_tau = []
        for tau in taus:
            estimated = oracle_boxes(score_map, tau, multi)
            best_per_tau.append(max(max(oracle_iou(e, t) for t in truth) for e in estimated))
        for percent in iou_percents:
            hits = np.where(np.asarray(best_per_tau) >= (percent / 100))[0]
            correct[percent][hits] += 1
        count += 1
    return [(correct[p] * 100. / float(count)).max() for p in iou_percents]


def oracle_pxap(score_maps, masks, taus):
    """Reference MaskEvaluator (masks: 1 foreground, 0 background, 255 ignored)."""
    edges = np.append(taus, [1.0, 2.0, 3.0])
    true_hist = np.zeros(len(taus) + 2)
    false_hist = np.zeros(len(taus) + 2)
    for score_map, mask in zip(score_maps, masks):
        true_hist += np.histogram(score_map[mask == 1], bins=edges)[0]
        false_hist += np.histogram(score_map[mask == 0], bins=edges)[0]
    tp = true_hist[::-1].cumsum()
    fn = true_hist.sum() - tp
    fp = false_hist[::-1].cumsum()
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    return (precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100


def oracle_normalize(cam):
    """Reference normalize_scoremap (in place on a float64 copy)."""
    cam = np.array(cam, np.float64)
    if np.isnan(cam).any():
        return np.zeros_like(cam)
    if cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


# ----------------------------------------------------------------------------- data


def random_maps(rng, count, size):
    """Smooth random maps (bicubic upsampling of noise, the way CAMs look), normalised,
    with a few of them scaled below 1, flattened or quantised to force ties."""
    maps = []
    for index in range(count):
        coarse = rng.normal(size=(int(rng.integers(3, 9)), int(rng.integers(3, 9))))
        smooth = oracle_normalize(cv2.resize(coarse, (size[1], size[0]),
                                             interpolation=cv2.INTER_CUBIC))
        kind = index % 6
        if kind == 1:
            smooth *= rng.uniform(0.3, 0.99)  # maximum below 1
        elif kind == 2:
            smooth = np.round(smooth * 4) / 4  # plateaus: many equal scores
        elif kind == 3 and index % 12 == 3:
            smooth = np.zeros(size)  # flat
        maps.append(smooth)
    return np.stack(maps)


def random_boxes(rng, count, max_boxes=3):
    """Per image: original (width, height) and 1-3 pixel-inclusive boxes inside it."""
    sizes, boxes = [], []
    for _ in range(count):
        width, height = int(rng.integers(40, 500)), int(rng.integers(40, 500))
        image_boxes = []
        for _ in range(int(rng.integers(1, max_boxes + 1))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
            image_boxes.append([x0, y0, x1, y1])
        sizes.append((width, height))
        boxes.append(image_boxes)
    return sizes, boxes


def to_gapjax(sizes_wh, boxes, max_boxes=3):
    """The reference boxes in gapjax's padded normalised form, stored as float32."""
    out = np.full((len(boxes), max_boxes, 4), -1.0, np.float32)
    for index, ((width, height), image_boxes) in enumerate(zip(sizes_wh, boxes)):
        out[index, :len(image_boxes)] = wsol.boxes_from_reference(image_boxes, (height, width))
    hw = np.array([(h, w) for w, h in sizes_wh])
    return out, hw


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("interval,count,size", [(0.01, 16, (224, 224)),
                                                 (0.001, 4, (224, 224)),
                                                 (0.01, 8, (56, 72))])
def test_box_metrics_equal_the_reference_on_random_maps(interval, count, size):
    # 224 x 224 as the reference's inputs; 56 x 72 maps get boxes scaled to 224 x 224 all
    # the same, as in the reference.
    rng = np.random.default_rng(20260 + int(1 / interval) + size[1])
    maps = random_maps(rng, count, size)
    sizes_wh, boxes = random_boxes(rng, count)
    gt, hw = to_gapjax(sizes_wh, boxes)
    taus = list(np.arange(0, 1, interval))
    kwargs = dict(thresholds=wsol.reference_thresholds(interval), protocol="wsolevaluation",
                  image_sizes=hw)
    v1 = oracle_max_box_acc(maps, boxes, sizes_wh, taus, [30, 50, 70], multi=False)
    v2 = oracle_max_box_acc(maps, boxes, sizes_wh, taus, [30, 50, 70], multi=True)
    for delta, expected in zip((0.3, 0.5, 0.7), v1):
        assert wsol.max_box_acc(maps, gt, iou_threshold=delta, **kwargs) == expected
    for delta, expected in zip((0.3, 0.5, 0.7), v2):
        assert wsol.max_box_acc(maps, gt, delta, multi_contour=True, **kwargs) == expected
    assert wsol.max_box_acc_v2(maps, gt, **kwargs) == np.average(v2)
    assert wsol.gt_known_localization(maps, gt, **kwargs) == v1[1]
    if size != (224, 224):
        return
    # The numbers are not trivially 0 or 100, and the protocols do differ on these maps.
    assert 0 < np.average(v2) < 100
    _, gapjax_best = wsol.iou_curves(maps, gt, np.array(taus))
    _, reference_best = wsol.iou_curves(maps, gt, **kwargs)
    assert (gapjax_best != reference_best).mean() > 0.5


def test_pxap_equals_the_reference_with_ignored_pixels():
    rng = np.random.default_rng(7)
    maps = random_maps(rng, 12, (40, 48))
    masks = (rng.random(maps.shape) < 0.4).astype(np.uint8)
    masks[:, :5, :7] = 255  # an ignore region
    taus = np.arange(0, 1, 0.01)
    expected = oracle_pxap(maps, masks, taus)
    got = wsol.pxap(maps, masks, thresholds=taus, protocol="wsolevaluation")
    assert got == expected and 0 < got < 100
    # Accumulated over two batches, as the evaluator does.
    first = wsol.pixel_histograms(maps[:5], masks[:5], taus, "wsolevaluation")
    second = wsol.pixel_histograms(maps[5:], masks[5:], taus, "wsolevaluation")
    summed = wsol.pxap_from_histograms(first[0] + second[0], first[1] + second[1],
                                       "wsolevaluation")
    assert summed == expected


def test_normalisation_and_resize_follow_the_reference():
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(7, 7)).astype(np.float32)
    resized = wsol.reference_resize(raw, (56, 56))
    expected = cv2.resize(raw.astype(np.float64), (56, 56), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(resized, expected)
    assert np.array_equal(wsol.reference_normalize(resized), oracle_normalize(resized))
    assert not wsol.reference_normalize(np.full((4, 4), 3.0)).any()  # flat -> zeros
    assert not wsol.reference_normalize(np.array([[np.nan, 1.0]])).any()


# ----------------------------------------------------------------------------- differences


def _map(shape, *blocks):
    score = np.zeros(shape)
    for (r0, r1, c0, c1, value) in blocks:
        score[r0:r1, c0:c1] = value
    return score


def test_border_boxes_are_one_pixel_narrower_than_interior_ones():
    shape = (20, 20)
    interior = _map(shape, (4, 10, 4, 10, 1.0))  # rows/cols 4..9
    border = _map(shape, (10, 20, 10, 20, 1.0))  # rows/cols 10..19, touching the far edges
    for score in (interior, border):
        assert wsol.boxes_from_score_map(score, 0.5).tolist() == \
            wsol.boxes_from_score_map(score, 0.5, protocol="gapjax").tolist()
    # The reference's x1 = x + w: an interior region's box ends one pixel past it ...
    got = wsol.boxes_from_score_map(interior, 0.5, protocol="wsolevaluation")
    np.testing.assert_allclose(got, [[4 / 20, 4 / 20, 11 / 20, 11 / 20]])
    # ... but a region on the far edge is clipped to W - 1: exactly its pixels.
    got = wsol.boxes_from_score_map(border, 0.5, protocol="wsolevaluation")
    np.testing.assert_allclose(got, [[0.5, 0.5, 1.0, 1.0]])
    # So the true box of the interior region is found with IoU 36/49 by the reference:
    truth = [[4 / 20, 4 / 20, 10 / 20, 10 / 20]]
    assert wsol.max_box_acc(interior[None], truth, 0.7) == 1.0
    assert wsol.max_box_acc(interior[None], truth, 0.75, protocol="wsolevaluation") == 0.0
    assert oracle_iou([4, 4, 10, 10], [4, 4, 9, 9]) == pytest.approx(36 / 49)


def test_holes_are_contours_in_the_reference():
    ring = _map((16, 16), (2, 14, 2, 14, 1.0), (5, 11, 5, 11, 0.0))
    gapjax_boxes = wsol.boxes_from_score_map(ring, 0.5, multi_contour=True)
    reference = wsol.boxes_from_score_map(ring, 0.5, multi_contour=True,
                                          protocol="wsolevaluation")
    assert len(gapjax_boxes) == 1 and len(reference) == 2  # the hole's boundary too
    # An object filling the hole and its rim (rows/cols 4..11): only the hole's box finds it.
    hole_truth = [[4 / 16, 4 / 16, 12 / 16, 12 / 16]]
    assert wsol.max_box_acc(ring[None], hole_truth, 0.5, multi_contour=True) == 0.0
    assert wsol.max_box_acc(ring[None], hole_truth, 0.5, multi_contour=True,
                            protocol="wsolevaluation", thresholds=[0.5]) == 100.0


def test_threshold_is_relative_to_the_8bit_maximum():
    # A map whose maximum is 0.4: gapjax thresholds absolute scores, the reference
    # thresholds relative to max(uint8(255 * map)) = 102.
    score = _map((10, 10), (0, 10, 0, 10, 0.2), (2, 6, 2, 6, 0.4))
    truth = [[0.2, 0.2, 0.6, 0.6]]
    grid = [0.5, 0.6]
    assert wsol.max_box_acc(score[None], truth, thresholds=grid) == 0.0  # nothing > 0.5
    assert wsol.max_box_acc(score[None], truth, thresholds=grid,
                            protocol="wsolevaluation") == 100.0
    assert oracle_max_box_acc(score[None], [[[2, 2, 5, 5]]], [(10, 10)], grid, [50],
                              False, resize_length=10) == [100.0]


def test_scores_closer_than_one_level_tie_in_the_reference():
    # 0.5021 and 0.503 both quantise to the 8-bit level 128: one region for the reference.
    score = _map((12, 12), (0, 12, 0, 12, 0.5021), (3, 9, 3, 9, 0.503), (0, 1, 0, 1, 1.0))
    truth = [[3 / 12, 3 / 12, 9 / 12, 9 / 12]]
    assert wsol.max_box_acc(score[None], truth, thresholds=[0.5025]) == 1.0
    reference = wsol.max_box_acc(score[None], truth, thresholds=wsol.reference_thresholds(0.01),
                                 protocol="wsolevaluation")
    assert reference == 0.0  # the core never separates from the background
    assert reference == oracle_max_box_acc(score[None], [[[3, 3, 8, 8]]], [(12, 12)],
                                           list(np.arange(0, 1, 0.01)), [50], False,
                                           resize_length=12)[0]


def test_flat_maps_give_a_one_pixel_box_at_the_origin():
    flat = np.zeros((1, 8, 8))
    corner = [[0.0, 0.0, 1 / 8, 1 / 8]]
    assert wsol.max_box_acc(flat, corner) == 0.0  # gapjax: no box
    assert wsol.max_box_acc(flat, corner, protocol="wsolevaluation") == 100.0
    np.testing.assert_allclose(
        wsol.boxes_from_score_map(flat[0], 0.3, protocol="wsolevaluation"), corner)


def test_v1_largest_contour_by_polygon_area_not_pixel_count():
    # A 1-pixel-wide line of 15 pixels has contour area 0; a 3x3 block has area 4.
    score = _map((12, 16), (0, 1, 0, 15, 1.0), (6, 9, 6, 9, 1.0))
    gapjax_box = wsol.boxes_from_score_map(score, 0.5)
    reference = wsol.boxes_from_score_map(score, 0.5, protocol="wsolevaluation")
    np.testing.assert_allclose(gapjax_box, [[0, 0, 1 / 12, 15 / 16]])
    np.testing.assert_allclose(reference, [[6 / 12, 6 / 16, 10 / 12, 10 / 16]])


def test_protocol_errors_are_clear():
    with pytest.raises(ValueError, match="protocol='coco' is not a WSOL protocol"):
        wsol.max_box_acc(np.zeros((1, 4, 4)), [[0, 0, 1, 1]], protocol="coco")
    with pytest.raises(ValueError, match="whole percentage"):
        wsol.max_box_acc(np.zeros((1, 4, 4)), [[0, 0, 1, 1]], iou_threshold=0.555,
                         protocol="wsolevaluation")


# ----------------------------------------------------------------------------- boxes


def test_reference_boxes_round_trip_exactly():
    rng = np.random.default_rng(11)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 5000, 2))
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        normalised = wsol.boxes_from_reference([x0, y0, x1, y1], (height, width))
        assert normalised[0] == y0 / height and normalised[3] == (x1 + 1) / width
        for stored in (normalised, normalised.astype(np.float32)):
            back = wsol.boxes_to_reference(stored, (height, width))
            assert back.tolist() == [x0, y0, x1, y1]
    sizes = np.array([[100, 50], [7, 9]])
    boxes = np.array([[[0, 0, 49, 99]], [[1, 2, 3, 4]]])
    assert (wsol.boxes_to_reference(wsol.boxes_from_reference(boxes, sizes[:, None]),
                                    sizes[:, None]) == boxes).all()
    # Scaling to the map truncates like the reference's resize_bbox.
    assert wsol.reference_resize_boxes([10, 20, 333, 444], (500, 400), (224, 224)).tolist() == \
        list(oracle_resize_box([10, 20, 333, 444], (400, 500), (224, 224)))


# ----------------------------------------------------------------------------- evaluator


class IdentityFeatureNet(Classifier):
    """Features = the image itself; GAP head. With kernel [[1, -1]], class 0's CAM is the
    image."""

    def backbone(self, x, train):
        del train
        return x


def test_evaluator_reproduces_the_reference_pipeline_from_raw_maps():
    rng = np.random.default_rng(5)
    model = IdentityFeatureNet(num_classes=2)
    variables = {"params": {"head": {"classifier": {
        "kernel": jnp.array([[1.0, -1.0]]), "bias": jnp.array([0.0, 0.0])}}}}
    raw = rng.normal(size=(6, 7, 7, 1)).astype(np.float32)  # feature-size "images"
    sizes_wh, boxes = random_boxes(rng, 6)
    gt, hw = to_gapjax(sizes_wh, boxes)
    masks = (rng.random((6, 7, 7)) < 0.5).astype(np.uint8)
    batch = {"image": raw, "label": np.zeros(6, np.int32), "bbox": gt, "image_size": hw,
             "segmentation": masks, "weight": np.ones(6, np.float32)}
    taus = wsol.reference_thresholds(0.01)
    evaluator = wsol.LocalizationEvaluator(model, thresholds=taus, protocol="wsolevaluation",
                                           overlay_images=3)
    evaluator.update(variables, {k: v[:4] for k, v in batch.items()})
    evaluator.update(variables, {k: v[4:] for k, v in batch.items()})
    result = evaluator.result()
    # The reference: the class map is the image here; resized to the input (7 x 7, the
    # identity size) bicubically, normalised, then evaluated.
    maps = np.stack([oracle_normalize(cv2.resize(r[..., 0].astype(np.float64), (7, 7),
                                                 interpolation=cv2.INTER_CUBIC)) for r in raw])
    # The evaluator scales boxes to its input size, the reference's 224 on its 224 inputs.
    v1 = oracle_max_box_acc(maps, boxes, sizes_wh, list(taus), [50], False, resize_length=7)
    v2 = oracle_max_box_acc(maps, boxes, sizes_wh, list(taus), [30, 50, 70], True,
                            resize_length=7)
    assert result["max_box_acc"] == v1[0]
    assert result["max_box_acc_v2"] == np.average(v2)
    assert [result[f"max_box_acc_v2_iou{p}"] for p in (30, 50, 70)] == v2
    assert result["gt_known_loc"] == v1[0]
    assert result["pxap"] == oracle_pxap(maps, masks, taus)
    overlay = evaluator.overlay()
    assert overlay.dtype == np.uint8 and overlay.shape == (7, 21, 3)


# ----------------------------------------------------------------------------- saved maps


def test_saved_score_maps_against_metadata_like_evaluation_py(tmp_path, capsys):
    rng = np.random.default_rng(9)
    sizes_wh, _ = random_boxes(rng, 5)
    maps = random_maps(rng, 5, (224, 224))
    boxes = []  # the box of each map's high region, at its image's size: mostly found
    for score_map, (width, height) in zip(maps, sizes_wh):
        rows, cols = np.nonzero(score_map > 0.6 * score_map.max()) if score_map.any() else \
            ([0, 10], [0, 10])
        boxes.append([[int(min(cols) * width / 224), int(min(rows) * height / 224),
                       int(max(cols) * width / 224), int(max(rows) * height / 224)]])
    split = tmp_path / "metadata" / "CUB" / "test"
    split.mkdir(parents=True)
    ids = [f"{index % 2:03d}.bird/image_{index}.jpg" for index in range(5)]
    (split / "image_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (split / "class_labels.txt").write_text("".join(f"{i},0\n" for i in ids))
    (split / "image_sizes.txt").write_text("".join(f"{i},{w},{h}\n"
                                                   for i, (w, h) in zip(ids, sizes_wh)))
    (split / "localization.txt").write_text("".join(
        f"{i},{x0},{y0},{x1},{y1}\n" for i, bs in zip(ids, boxes) for x0, y0, x1, y1 in bs))
    for image_id, score_map in zip(ids, maps):
        path = tmp_path / "maps" / f"{image_id}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, score_map)
    taus = list(np.arange(0, 1, 0.01))
    v2 = oracle_max_box_acc(maps, boxes, sizes_wh, taus, [30, 50, 70], multi=True)
    v1 = oracle_max_box_acc(maps, boxes, sizes_wh, taus, [50], multi=False)
    got = wsol.evaluate_scoremaps(str(tmp_path / "maps"), str(split))
    assert got["localization"] == np.average(v2)
    assert [got[f"max_box_acc_iou{p}"] for p in (30, 50, 70)] == v2
    result = wsol_cli.main(["--scoremap_root", str(tmp_path / "maps"), "--metadata_root",
                            str(tmp_path / "metadata"), "--dataset_name", "CUB", "--split",
                            "test", "--box_v1_metric"])
    assert result["localization"] == v1[0] and 0 < v1[0] < 100 and 0 < np.average(v2) < 100
    assert f"localization: {float(v1[0])!r}" in capsys.readouterr().out
