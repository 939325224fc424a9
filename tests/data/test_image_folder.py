"""ImageFolder trees: scanning, decoding to fixed-size uint8, corrupt files named, and the seeded split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelworks.data import images as image_data
from modelworks.data.synthetic import write_image_folder
from modelworks.errors import DataError

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture
def tree(tmp_path):
    return write_image_folder(tmp_path / "tree", CLASSES, per_class=3, size=20)


def test_scan_lists_sorted_samples_with_class_indices(tree):
    (tree / "dog" / "notes.txt").write_text("not an image")
    samples, classes = image_data.scan_image_folder(tree)
    assert classes == CLASSES
    assert samples == [(str(tree / name / f"{j}.png"), index) for index, name in enumerate(CLASSES) for j in range(3)]


def test_scan_with_the_training_classes_keeps_their_indices(tree, tmp_path):
    held_out = write_image_folder(tmp_path / "val", ["eel"], per_class=2, size=20)
    samples, classes = image_data.scan_image_folder(held_out, CLASSES)
    assert classes == CLASSES
    assert {label for _, label in samples} == {2}


def test_scan_refuses_a_class_unknown_to_training(tree, tmp_path):
    held_out = write_image_folder(tmp_path / "val", ["cat", "yak"], per_class=1, size=20)
    with pytest.raises(DataError, match=rf"{held_out}: class folders \['yak'\] do not exist in the training tree"):
        image_data.scan_image_folder(held_out, CLASSES)


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=rf"data\.source: image folder {tmp_path / 'absent'} does not exist"):
        image_data.scan_image_folder(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{tmp_path / 'flat'}: no class sub-folders"):
        image_data.scan_image_folder(tmp_path / "flat")
    (tmp_path / "textonly" / "cls").mkdir(parents=True)
    (tmp_path / "textonly" / "cls" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=rf"{tmp_path / 'textonly'}: no images"):
        image_data.scan_image_folder(tmp_path / "textonly")


@pytest.mark.parametrize("channels", [3, 1])
def test_items_are_resized_uint8(tree, channels):
    samples, _ = image_data.scan_image_folder(tree)
    dataset = image_data.ImageFolderFiles(samples, image_size=16, channels=channels)
    assert len(dataset) == 9
    image, label = dataset[4]
    assert image.shape == (channels, 16, 16) and image.dtype == torch.uint8
    assert label.item() == 1


def test_pixels_are_the_files_pixels(tree):
    from PIL import Image

    samples, _ = image_data.scan_image_folder(tree)
    image, _ = image_data.ImageFolderFiles(samples, image_size=20, channels=3)[0]  # same size: no resampling
    expected = np.asarray(Image.open(samples[0][0]).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(image.numpy(), expected)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"plain text, not an image"])
def test_corrupt_image_names_its_path(tree, content):
    bad = tree / "dog" / "1.png"
    bad.write_bytes(content)
    samples, _ = image_data.scan_image_folder(tree)
    dataset = image_data.ImageFolderFiles(samples, image_size=16, channels=3)
    index = samples.index((str(bad), 1))
    with pytest.raises(DataError, match=rf"{bad}: cannot be decoded as PNG, JPEG, GIF or WebP .*; remove or replace the file"):
        dataset[index]


def test_every_accepted_suffix_decodes_and_others_are_ignored(tree):
    from PIL import Image

    pixels = Image.fromarray(np.full((20, 20, 3), 128, np.uint8))
    for suffix in sorted(image_data.IMAGE_SUFFIXES) + [".bmp"]:
        pixels.save(tree / "cat" / f"extra{suffix}")
    samples, _ = image_data.scan_image_folder(tree)
    assert (str(tree / "cat" / "extra.bmp"), 0) not in samples  # torchvision.io cannot decode BMP
    dataset = image_data.ImageFolderFiles(samples, image_size=16, channels=3)
    for suffix in image_data.IMAGE_SUFFIXES:
        image, _ = dataset[samples.index((str(tree / "cat" / f"extra{suffix}"), 0))]
        assert image.shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- splitting


def test_split_indices_is_deterministic_disjoint_and_complete():
    train, val = image_data.split_indices(1000, 0.1, seed=7)
    again_train, again_val = image_data.split_indices(1000, 0.1, seed=7)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert len(val) == 100 and len(train) == 900
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.equal(train, train.sort().values)  # sorted: contiguous reads, stable order


def test_split_indices_depends_on_its_own_seed_only():
    _, val_a = image_data.split_indices(1000, 0.1, seed=0)
    _, val_b = image_data.split_indices(1000, 0.1, seed=1)
    assert not torch.equal(val_a, val_b)
    torch.manual_seed(123)  # the global (training) seed does not move the split
    _, val_c = image_data.split_indices(1000, 0.1, seed=0)
    assert torch.equal(val_a, val_c)
