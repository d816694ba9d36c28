"""``python -m gapjax.cam --image ...`` on real photographs, against torch.

The photographs are the two that ship with scikit-learn (``china.jpg``, ``flower.jpg``),
written to temporary JPEG files. The weights are a randomly initialised torchvision
ResNet-18 (BatchNorm statistics non-trivial), saved as .safetensors: the command's
printed top-1 must equal torch's top-1 for the same files and weights, and its
preprocessing must equal torchvision's transforms bit for bit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.torch_reference import import_torchvision, randomize_
from PIL import Image

from gapjax import imagenet
from gapjax.cam import make_map_fn
from gapjax.cli import cam as cli


def torchvision_eval(resize: int = 256, crop: int = 224):
    transforms = import_torchvision().transforms
    return transforms.Compose([
        transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
        transforms.Normalize(imagenet.MEAN, imagenet.STD),
    ])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """china.jpg and flower.jpg, and a portrait PNG in a subfolder (a folder is searched
    recursively; 3 images make a padded second batch of 2)."""
    from sklearn.datasets import load_sample_image

    directory = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("china.jpg", "flower.jpg"):
        path = directory / name
        Image.fromarray(load_sample_image(name)).save(path, quality=92)
        paths.append(path)
    (directory / "more").mkdir()
    portrait = directory / "more" / "portrait.png"
    Image.fromarray(load_sample_image("flower.jpg")[:, 100:400]).save(portrait)
    return [*paths, portrait]


def test_eval_transform_equals_torchvision_bit_for_bit(photos):
    picture = Image.open(photos[0]).convert("RGB")  # 640x427
    cases = [
        (picture, 256, 224),
        (picture.transpose(Image.Transpose.TRANSPOSE), 256, 224),  # portrait
        (picture.resize((301, 255)), 256, 224),  # upsampling, odd margins
        (picture.resize((256, 333)), 256, 224),  # already 256: torchvision skips the resize
        (picture.resize((150, 90)), 200, 224),  # crop larger than the image: zero padding
        (picture.convert("L"), 256, 224),  # grayscale -> RGB
    ]
    for image, resize, crop in cases:
        expected = torchvision_eval(resize, crop)(image.convert("RGB")).numpy()
        actual = imagenet.eval_transform(image, resize=resize, crop=crop)
        assert actual.shape == (crop, crop, 3) and actual.dtype == np.float32
        np.testing.assert_array_equal(actual, expected.transpose(1, 2, 0),
                                      err_msg=f"{image.size} resize {resize}")


def test_class_names_come_from_installed_packages_in_imagenet_order():
    names, ids = imagenet.class_names(), imagenet.wordnet_ids()
    assert len(names) == len(ids) == 1000
    assert (names[0], ids[0]) == ("tench", "n01440764")
    assert (names[207], names[281], names[999]) == ("golden retriever", "tabby",
                                                    "toilet tissue")
    assert list(ids) == sorted(ids)
    assert imagenet.class_name(3, num_classes=10) == "class 3"


def test_image_paths_expand_folders_and_name_missing_files(photos, tmp_path):
    assert imagenet.image_paths([photos[0].parent]) == sorted(photos)
    assert imagenet.image_paths([photos[2], photos[0]]) == [photos[2], photos[0]]
    with pytest.raises(FileNotFoundError, match=r"--image '.*nothing\.jpg' does not exist"):
        imagenet.image_paths([tmp_path / "nothing.jpg"])
    with pytest.raises(ValueError, match=r"no image files"):
        imagenet.image_paths([tmp_path])


def test_cli_top1_equals_torch_on_real_photos(photos, tmp_path, capsys, monkeypatch):
    made = []

    def recording_make_map_fn(*args, **kwargs):
        made.append(make_map_fn(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(cli, "make_map_fn", recording_make_map_fn)
    reference = randomize_(import_torchvision().models.resnet18(), seed=7)
    from safetensors.torch import save_file

    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    out = tmp_path / "overlays"

    results = cli.main(["--image", str(photos[0].parent), "--model", "resnet18", "--weights",
                        str(weights), "--topk", "3", "--batch_size", "2", "--out", str(out),
                        "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert len(made) == 1 and made[0].jitted._cache_size() == 1  # 2 batches, 1 program
    assert printed == json.loads(json.dumps(results))
    assert [entry["path"] for entry in printed] == [str(p) for p in sorted(photos)]

    transform = torchvision_eval()
    for entry in printed:
        batch = transform(Image.open(entry["path"]).convert("RGB"))[None]
        with torch.no_grad():
            probabilities = torch.softmax(reference(batch), -1)[0].numpy()
        top = entry["top"]
        assert len(top) == 3
        assert top[0]["index"] == int(probabilities.argmax())
        for item in top:
            assert item["name"] == imagenet.class_names()[item["index"]]
            np.testing.assert_allclose(item["probability"], probabilities[item["index"]],
                                       rtol=1e-4)
        assert [item["probability"] for item in top] == sorted(
            (item["probability"] for item in top), reverse=True)
        overlay = Image.open(entry["overlay"])
        assert overlay.format == "PNG" and overlay.width > 600 and overlay.height > 300
    assert sorted(p.name for p in out.iterdir()) == ["china_cam.png", "flower_cam.png",
                                                     "portrait_cam.png"]


@pytest.mark.parametrize("argv, message", [
    (["--image", "x.jpg", "--model", "resnet18"], "--image needs --model NAME and --weights"),
    (["--image", "x.jpg", "--workdir", "w"], "--image takes --model and --weights, not"),
    ([], "give --image PATH... --model NAME --weights FILE, or --workdir DIR"),
    (["--image", "x.jpg", "--model", "m", "--weights", "w", "--topk", "0"],
     "--topk=0 must be at least 1"),
])
def test_cli_usage_errors_say_what_is_missing(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_chunk_progress_shows_the_first_and_last_chunk_and_throttles_between(capsys):
    from gapjax.cli.cam import ChunkProgress

    report = ChunkProgress("score_cam", every=3600.0)
    for index in range(4):
        report(index, 4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" of channels")[0] for line in lines] == [
        "score_cam: chunk 1 of 4", "score_cam: chunk 4 of 4"]
