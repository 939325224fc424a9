"""CIFAR-10 python batches: the real pickle layout loads; foreign pickles cannot run code; missing files are named."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from modelworks.data import images as image_data
from modelworks.data.synthetic import class_pattern_images, write_cifar10
from modelworks.errors import DataError


def test_loads_train_and_test_in_channel_first_order(tmp_path):
    write_cifar10(tmp_path, per_batch=20, seed=3)
    train = image_data.load_cifar10(tmp_path, "train", download=False)
    test = image_data.load_cifar10(tmp_path, "test", download=False)
    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.shape == (100,) and train.labels.dtype == torch.int64
    assert test.images.shape == (20, 3, 32, 32)
    assert train.classes == image_data.CIFAR10_CLASSES
    # A CIFAR row is 1024 red, then 1024 green, then 1024 blue values: the batches concatenate in order.
    for batch in range(5):
        images, labels = class_pattern_images(20, 32, 3, 10, 3 + batch)
        np.testing.assert_array_equal(train.images[batch * 20:(batch + 1) * 20].numpy(), images)
        np.testing.assert_array_equal(train.labels[batch * 20:(batch + 1) * 20].numpy(), labels)


def test_batch_file_is_a_protocol_2_pickle_of_the_real_keys(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"
    entry = pickle.loads(raw, encoding="latin1")
    assert set(entry) == {"batch_label", "labels", "data", "filenames"}
    assert entry["data"].shape == (4, 3072) and entry["data"].dtype == np.uint8


def test_fine_labels_key_is_accepted(tmp_path):
    """CIFAR-100's batches name the labels `fine_labels`; the reader takes either."""
    path = tmp_path / "batch"
    data = np.zeros((3, 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({"data": data, "fine_labels": [4, 5, 6]}, protocol=2))
    images, labels = image_data.read_cifar_batch(path)
    assert images.shape == (3, 3, 32, 32)
    assert labels.tolist() == [4, 5, 6]


class RunsACommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({"data": RunsACommand(f"touch {marker}"), "labels": [1]}, protocol=2))
    with pytest.raises(DataError, match=rf"{path}: not a CIFAR-10 python batch \(UnpicklingError: refusing to load "
                                        r"(posix|os|nt)\.system\)"):
        image_data.load_cifar10(tmp_path, "test", download=False)
    assert not marker.exists()


def test_pickle_of_an_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                                   "extra": pytest.MonkeyPatch()}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load _pytest\.monkeypatch\.MonkeyPatch"):
        image_data.read_cifar_batch(path)


@pytest.mark.parametrize("payload, message", [
    (b"", r"EOFError"),
    (pickle.dumps([1, 2, 3], protocol=2), r"TypeError"),
    (pickle.dumps({"labels": [1]}, protocol=2), r"KeyError"),
])
def test_truncated_or_foreign_batch_is_refused(tmp_path, payload, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=rf"{path}: not a CIFAR-10 python batch \({message}"):
        image_data.read_cifar_batch(path)


def test_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=rf"{path}: expected data \[N, 3072\] and N labels \(got \(2, 100\), \(2,\)\)"):
        image_data.read_cifar_batch(path)


def test_missing_files_are_listed_with_the_folder(tmp_path):
    write_cifar10(tmp_path, per_batch=4)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match=rf"data\.source=cifar10: data_batch_3, data_batch_5 not found in {folder}\. "
                                        r"Provide them by one of: set data\.download=true") as info:
        image_data.load_cifar10(tmp_path, "train", download=False)
    assert "cifar-10-python.tar.gz" in str(info.value)
    # The test split is complete and still loads.
    assert len(image_data.load_cifar10(tmp_path, "test", download=False).labels) == 4


def test_missing_folder_lists_every_file(tmp_path):
    with pytest.raises(DataError, match=r"data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5 not "
                                        rf"found in {tmp_path / 'cifar-10-batches-py'}"):
        image_data.load_cifar10(tmp_path, "train", download=False)
