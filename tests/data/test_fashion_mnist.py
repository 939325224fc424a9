"""Fashion-MNIST from IDX files: the layouts looked in, the result's types, and the offline error."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from modelworks.data import images as image_data
from modelworks.data.idx import write_idx
from modelworks.data.synthetic import class_pattern_images
from modelworks.errors import DataError


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    """Hide Debian's copy of the data set, so only the folders under test are searched."""
    monkeypatch.setattr(image_data, "SYSTEM_FASHION_MNIST", tmp_path / "no-system-copy")


def test_loads_train_and_test(fmnist_dir, no_system_copy):
    train = image_data.load_fashion_mnist(fmnist_dir, "train", download=False)
    test = image_data.load_fashion_mnist(fmnist_dir, "test", download=False)
    assert train.images.shape == (512, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (512,) and train.labels.dtype == torch.int64
    assert test.images.shape == (256, 1, 28, 28)
    assert train.classes == image_data.FASHION_MNIST_CLASSES and len(train.classes) == 10
    # The pixels are the generator's, in order (seed 0 for train, 1 for t10k).
    images, labels = class_pattern_images(512, 28, 1, 10, 0)
    np.testing.assert_array_equal(train.images.numpy(), images)
    np.testing.assert_array_equal(train.labels.numpy(), labels)


def test_finds_torchvision_layout_and_plain_files(tmp_path, fmnist_dir, no_system_copy):
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    shutil.copytree(fmnist_dir, raw)
    assert len(image_data.load_fashion_mnist(tmp_path / "tv", "test", False).labels) == 256
    plain = tmp_path / "plain"
    plain.mkdir()
    images, labels = class_pattern_images(7, 28, 1, 10, 3)
    write_idx(plain / "t10k-images-idx3-ubyte", images[:, 0])  # not gzipped
    write_idx(plain / "t10k-labels-idx1-ubyte", labels)
    loaded = image_data.load_fashion_mnist(plain, "test", False)
    np.testing.assert_array_equal(loaded.labels.numpy(), labels)


def test_missing_files_explain_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data, "SYSTEM_FASHION_MNIST", tmp_path / "nonexistent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        image_data.load_fashion_mnist(empty, "train", download=False)
    message = str(info.value)
    assert message.startswith("data.source=fashion-mnist: train-images-idx3-ubyte(.gz) and "
                              "train-labels-idx1-ubyte(.gz) not found")
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message
    for folder in (empty / "FashionMNIST" / "raw", empty / "fashion-mnist", empty, tmp_path / "nonexistent"):
        assert f"\n    {folder}" in message


def test_labels_out_of_range_are_refused(tmp_path, no_system_copy):
    images, labels = class_pattern_images(4, 28, 1, 10, 0)
    labels[2] = 12
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: label 12 is out of range 0-9"):
        image_data.load_fashion_mnist(tmp_path, "train", False)


def test_images_and_labels_of_different_lengths_are_refused(tmp_path, no_system_copy):
    images, labels = class_pattern_images(4, 28, 1, 10, 0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:, 0])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:3])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: expected images \[N, 28, 28\] and labels "
                                        r"\[N\] \(got \(4, 28, 28\) and \(3,\)\); the files do not belong together"):
        image_data.load_fashion_mnist(tmp_path, "train", False)


def test_in_memory_split_serves_batches_by_index(fmnist_dir, no_system_copy):
    arrays = image_data.load_fashion_mnist(fmnist_dir, "test", False)
    dataset = image_data.InMemoryImages(arrays.images, arrays.labels)
    assert len(dataset) == 256
    images, labels = dataset.get_batch(torch.tensor([5, 0, 5]))
    assert torch.equal(images[0], arrays.images[5]) and torch.equal(images[1], arrays.images[0])
    assert labels.tolist() == [arrays.labels[5].item(), arrays.labels[0].item(), arrays.labels[5].item()]
