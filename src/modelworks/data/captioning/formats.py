"""Captioning data sets: the COCO captions json and Flickr8k/30k's captions file with Karpathy's split json, read
into (image path, references) per split; images decoded and resized into memory.

- `coco-captions:ANNOTATIONS.json:IMAGES_DIR`: COCO's `captions_*.json` ({"images": [{"id", "file_name", ...}],
  "annotations": [{"id", "image_id", "caption"}]}). Images may carry `"split"` (train/val/test, as fmnist-captions
  writes them in one file per split, or a Karpathy-style split); without it, a seeded split of the images.
- `flickr:CAPTIONS.txt:IMAGES_DIR`: Flickr8k/30k's token file (`1000268201_693b08cb0e.jpg#0<TAB>A child in a pink
  dress ...`, five lines per image), split by Karpathy's `dataset_flickr8k.json` / `dataset_flickr30k.json` when
  one lies beside the captions file (`{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`; "restval"
  counts as train); without it, a seeded split.

Errors name the file and the entry (`captions.json: annotations[3]: image_id 42 is not in images`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import DataError
from ..image_files import read_image

SPLITS = ("train", "val", "test")


@dataclass
class CaptionedImage:
    path: Path
    captions: list[str]
    info: dict = field(default_factory=dict)  # what the data says besides (fmnist-captions: its combination)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level (got {type(data).__name__})")
    return data


def read_coco_captions(annotations: Path, images_dir: Path) -> list[CaptionedImage]:
    """Every image of a COCO captions file with its references, in the file's image order."""
    data = read_json(annotations)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{annotations}: missing the list `{key}`; a COCO captions file has `images` and "
                            "`annotations` (id, image_id, caption)")
    by_id: dict[int, CaptionedImage] = {}
    for i, row in enumerate(data["images"]):
        if not isinstance(row, dict) or not isinstance(row.get("id"), int) or not isinstance(row.get("file_name"), str):
            raise DataError(f"{annotations}: images[{i}]: needs an integer `id` and a string `file_name` (got "
                            f"{str(row)[:80]})")
        if row["id"] in by_id:
            raise DataError(f"{annotations}: images[{i}]: id {row['id']} appears twice")
        info = {k: v for k, v in row.items() if k not in ("id", "file_name", "width", "height")}
        by_id[row["id"]] = CaptionedImage(images_dir / row["file_name"], [], info)
    for i, row in enumerate(data["annotations"]):
        if not isinstance(row, dict) or not isinstance(row.get("caption"), str) or not row["caption"].strip():
            raise DataError(f"{annotations}: annotations[{i}]: needs a non-empty string `caption` (got {str(row)[:80]})")
        image = by_id.get(row.get("image_id"))
        if image is None:
            raise DataError(f"{annotations}: annotations[{i}]: image_id {row.get('image_id')!r} is not in images")
        image.captions.append(row["caption"].strip())
    images = list(by_id.values())
    bare = [im.path.name for im in images if not im.captions]
    if bare:
        raise DataError(f"{annotations}: {len(bare)} image(s) without a caption, e.g. {bare[0]}; every image needs "
                        "at least one annotation")
    return images


def read_flickr_captions(captions_file: Path, images_dir: Path) -> list[CaptionedImage]:
    """Flickr8k/30k's token file: `IMAGE#N<TAB>caption` per line, in first-appearance order of the images."""
    if not captions_file.is_file():
        raise DataError(f"{captions_file}: no such file")
    by_name: dict[str, CaptionedImage] = {}
    for number, line in enumerate(captions_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, index = key.rpartition("#")[0], "#" in key, key.rpartition("#")[2]
        if not tab or not hash_ or not index.isdigit() or not name or not caption.strip():
            raise DataError(f"{captions_file}:{number}: expected `IMAGE.jpg#N<TAB>caption` (got {line[:80]!r})")
        by_name.setdefault(name, CaptionedImage(images_dir / name, [])).captions.append(caption.strip())
    if not by_name:
        raise DataError(f"{captions_file}: no captions; expected lines `IMAGE.jpg#N<TAB>caption`")
    return list(by_name.values())


def karpathy_splits(split_file: Path) -> dict[str, str]:
    """filename -> train/val/test from Karpathy's dataset_flickr*.json ("restval" is train)."""
    data = read_json(split_file)
    if not isinstance(data.get("images"), list):
        raise DataError(f"{split_file}: missing the list `images`; expected Karpathy's split file "
                        "({\"images\": [{\"filename\", \"split\", \"sentences\"}]})")
    splits = {}
    for i, row in enumerate(data["images"]):
        split = row.get("split") if isinstance(row, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("filename"), str) or \
                split not in ("train", "val", "test", "restval"):
            raise DataError(f"{split_file}: images[{i}]: needs `filename` and `split` in train/val/test/restval "
                            f"(got {str(row)[:80]})")
        splits[row["filename"]] = "train" if split == "restval" else split
    return splits


def seeded_split(images: list[CaptionedImage], val_fraction: float, test_fraction: float, seed: int
                 ) -> dict[str, list[CaptionedImage]]:
    order = np.random.default_rng(seed).permutation(len(images))
    n_val, n_test = round(len(images) * val_fraction), round(len(images) * test_fraction)
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {split: [images[i] for i in sorted(parts[split])] for split in SPLITS}


def read_caption_source(source: str, val_fraction: float, test_fraction: float, seed: int
                        ) -> tuple[dict[str, list[CaptionedImage]], list[str]]:
    """`coco-captions:ANN:DIR` or `flickr:CAPTIONS:DIR` -> images per split, and notes on what was decided."""
    kind, _, rest = source.partition(":")
    first, _, images_dir = rest.partition(":")
    if not first or not images_dir:
        raise DataError(f"data.source: {source!r}; expected {kind}:ANNOTATIONS:IMAGES_DIR")
    path, folder = Path(first), Path(images_dir)
    if not folder.is_dir():
        raise DataError(f"data.source: the images folder {folder} does not exist")
    notes = []
    if kind == "coco-captions":
        images = read_coco_captions(path, folder)
        named = [im for im in images if "split" in im.info]
        if named and len(named) == len(images):
            splits = {s: [im for im in images if im.info["split"] in ((s, "restval") if s == "train" else (s,))]
                      for s in SPLITS}
            notes.append(f"{path}: splits from the images' `split` fields")
        else:
            splits = seeded_split(images, val_fraction, test_fraction, seed)
            notes.append(f"{path}: no `split` on the images; a seeded split (val {val_fraction}, test {test_fraction})")
    else:
        images = read_flickr_captions(path, folder)
        split_files = sorted(path.parent.glob("dataset_flickr*.json"))
        if split_files:
            assigned = karpathy_splits(split_files[0])
            missing = [im.path.name for im in images if im.path.name not in assigned]
            if missing:
                raise DataError(f"{split_files[0]}: has no split for {len(missing)} image(s) of {path}, e.g. "
                                f"{missing[0]}")
            splits = {s: [im for im in images if assigned[im.path.name] == s] for s in SPLITS}
            notes.append(f"{path}: Karpathy splits from {split_files[0].name}")
        else:
            splits = seeded_split(images, val_fraction, test_fraction, seed)
            notes.append(f"{path}: no dataset_flickr*.json beside it; a seeded split (val {val_fraction}, test "
                         f"{test_fraction})")
    for split in ("train", "val"):
        if not splits[split]:
            raise DataError(f"data.source: {source}: the {split} split is empty")
    return splits, notes


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size] (bilinear, antialiased): evaluation's and serving's resize."""
    if image.shape[1:] == (size, size):
        return image
    x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def load_images(images: list[CaptionedImage], size: int, max_pixels: int) -> torch.Tensor:
    """uint8 [N, 3, size, size]; a missing or undecodable file is named."""
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for i, im in enumerate(images):
        if not im.path.is_file():
            raise DataError(f"{im.path}: no such image (listed in the captions); check IMAGES_DIR")
        out[i] = resize_square(read_image(im.path, 3, max_pixels, where=str(im.path), field=None,
                                          fix="re-export the image"),
                               size)
    return out
