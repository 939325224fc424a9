"""Image classification data: CIFAR-10 (python pickle batches), Fashion-MNIST (IDX), and ImageFolder trees.

Small data sets are held whole as uint8 tensors on the training device (`InMemoryImages`), so a batch is one
index operation and augmentation runs batched on the device. ImageFolder trees are decoded per image by
data/image_files.read_image in DataLoader workers and resized to a fixed size; their augmentation still runs batched.

Downloads use torchvision's checksummed downloaders. Offline, a clear error says which files are missing,
where they were looked for, and how to provide them.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError, InputError
from .idx import read_idx
from .image_files import IMAGE_SUFFIXES as FILE_SUFFIXES

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Debian's dataset-fashion-mnist package installs the real IDX files here.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


@dataclass
class ImageArrays:
    """A whole split in memory: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]


class InMemoryImages(Dataset):
    """A split held on the training device. `get_batch` lets the engine skip the DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device | str = "cpu"):
        self.images = images.to(device)
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def get_batch(self, indices: torch.Tensor):
        indices = indices.to(self.labels.device)
        return self.images[indices], self.labels[indices]


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


IMAGE_SOURCES = ("fashion-mnist", "cifar10", "imagefolder")


def check_image_source(source: str, val_fraction: float, channels: int) -> str:
    """Validate an image task's `data.source`, `data.val_fraction` and `data.channels` (config errors name the
    key); returns the source's kind."""
    kind = source.split(":", 1)[0]
    if kind not in IMAGE_SOURCES or (kind == "imagefolder") != (":" in source):
        raise ValueError(f"data.source: {source!r} is not a data source; use fashion-mnist, cifar10 or "
                         "imagefolder:PATH")
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction: must be in (0, 1) (got {val_fraction})")
    if channels not in (1, 3):
        raise ValueError(f"data.channels: must be 1 or 3 (got {channels})")
    return kind


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folders(root: Path) -> list[Path]:
    return [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, SYSTEM_FASHION_MNIST]


def load_fashion_mnist(root: Path, split: str, download: bool) -> ImageArrays:
    """Find the IDX files under `root` (torchvision's layout or a plain folder) or in Debian's package."""
    stems = FASHION_MNIST_FILES[split]
    for folder in fashion_mnist_folders(root):
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            break
    else:
        if download:
            _download_with_torchvision("FashionMNIST", root)
            return load_fashion_mnist(root, split, download=False)
        looked = "\n    ".join(str(f) for f in fashion_mnist_folders(root))
        raise DataError(
            f"data.source=fashion-mnist: {' and '.join(s + '(.gz)' for s in stems)} not found. Looked in:\n    "
            f"{looked}\n  Provide them by one of: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu); "
            f"set data.download=true (needs internet; checksummed); or copy the four IDX files into {root}.")
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{paths[0]}: expected images [N, 28, 28] and labels [N] (got {images.shape} and "
                        f"{labels.shape}); the files do not belong together")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{paths[1]}: label {labels.max()} is out of range 0-9")
    return ImageArrays(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                       FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's batches are Python pickles of numpy arrays and lists. Only the classes needed to rebuild those
    are allowed, so a malicious batch file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); the file is corrupt "
                        "or of another format, delete it and download it again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: expected data [N, 3072] and N labels (got {data.shape}, {labels.shape})")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Path, split: str, download: bool) -> ImageArrays:
    folder = root / CIFAR10_FOLDER
    names = CIFAR10_TRAIN if split == "train" else CIFAR10_TEST
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        _download_with_torchvision("CIFAR10", root)
        missing = []
    if missing:
        raise DataError(
            f"data.source=cifar10: {', '.join(missing)} not found in {folder}. Provide them by one of: set "
            f"data.download=true (needs internet; torchvision checks the archive's MD5); or download "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root}.")
    parts = [read_cifar_batch(folder / n) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_CLASSES)


def _download_with_torchvision(name: str, root: Path) -> None:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    try:
        getattr(torchvision.datasets, name)(str(root), train=True, download=True)
        getattr(torchvision.datasets, name)(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a checksum mismatch is a RuntimeError
        raise DataError(f"data.download: downloading {name} into {root} failed ({exc}); check the network, or "
                        "provide the files by hand as the error without download=true describes") from None


# ---------------------------------------------------------------------------------------------- ImageFolder


class ImageFolderFiles(Dataset):
    """An ImageFolder tree (one sub-folder per class), decoded by data/image_files.read_image (the serving
    predictors' decoder, with the same pixel limit) and resized to a fixed size. Yields uint8 [C, H, W] so batches
    augment on the device like the in-memory sets."""

    def __init__(self, samples: list[tuple[str, int]], image_size: int, channels: int):
        self.samples = samples
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2 import functional as TF

        from .image_files import default_max_pixels, read_image

        path, label = self.samples[i]
        try:
            image = read_image(Path(path), self.channels, default_max_pixels(self.image_size ** 2), where=path,
                               field=None, fix="remove or replace the file")
        except InputError as exc:  # the reader's words, as a data error: training stops with the file named
            raise DataError(str(exc)) from None
        image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
        return image, torch.tensor(label)


IMAGE_SUFFIXES = set(FILE_SUFFIXES)  # what data/image_files.read_image reads


def scan_image_folder(folder: Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) pairs of a class-per-folder tree, sorted for determinism."""
    if not folder.is_dir():
        raise DataError(f"data.source: image folder {folder} does not exist")
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; an ImageFolder tree is ROOT/<class>/<image>")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{folder}: class folders {unknown} do not exist in the training tree {classes}")
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                samples.append((str(path), index))
    if not samples:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under the class folders")
    return samples, classes


# ---------------------------------------------------------------------------------------------- splitting


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic train/validation split of a training set: a seeded permutation, independent of the
    training seed so every run of a recipe validates on the same images."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def hold_out(n: int, fractions: dict[str, float], seed: int) -> dict[str, torch.Tensor]:
    """Indices of each held-out split (a fraction of `n` each, in the order given) and of the "train" rest, from
    one seeded permutation; with `val` alone it is exactly `split_indices`."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for name, fraction in fractions.items():
        count = int(round(n * fraction))
        out[name] = perm[start:start + count].sort().values
        start += count
    out["train"] = perm[start:].sort().values
    return out
