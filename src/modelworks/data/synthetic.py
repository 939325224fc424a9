"""Small data sets written in the exact real formats (IDX, CIFAR python batches, ImageFolder PNGs), for tests
and offline demos. Each class gets a distinct, learnable pattern so a model can fit them in seconds."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .idx import write_idx


def class_pattern_images(n: int, size: int, channels: int, num_classes: int, seed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, channels, size, size] with noise plus a bright horizontal band whose row is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, channels, size, size)).astype(np.uint8)
    band = max(size // num_classes, 1)
    for i, label in enumerate(labels):
        top = int(label) * band
        images[i, :, top:top + band, :] = 200 + rng.integers(0, 55)
    return images, labels


def write_fashion_mnist(folder: Path, n_train: int = 512, n_test: int = 256, seed: int = 0) -> Path:
    """The four gzipped IDX files of Fashion-MNIST, in torchvision's raw-folder layout's plain variant."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = class_pattern_images(n, 28, 1, 10, s)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def write_cifar10(root: Path, per_batch: int = 100, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5 and test_batch as the real python-2 era pickles."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images, labels = class_pattern_images(per_batch, 32, 3, 10, seed + i)
        entry = {"batch_label": f"batch {i}", "labels": labels.astype(int).tolist(),
                 "data": images.reshape(per_batch, -1), "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 24, seed: int = 0) -> Path:
    """ROOT/<class>/<i>.png RGB images."""
    from PIL import Image

    for index, name in enumerate(classes):
        images, _ = class_pattern_images(per_class, size, 3, len(classes), seed + index)
        band = max(size // len(classes), 1)
        (root / name).mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(images):
            image[:, :, :] = np.minimum(image, 60)
            image[:, index * band:(index + 1) * band, :] = 220
            Image.fromarray(image.transpose(1, 2, 0)).save(root / name / f"{j}.png")
    return root
