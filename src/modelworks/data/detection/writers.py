"""Writers for the three detection formats, byte-for-byte the layouts the readers (and other tools) expect.

Used by the `fmnist-scenes` generator (COCO), by the tests' fixtures (all three, so every reader is tested on
files in the exact real format), and by the detection benchmark (YOLO, for the ultralytics peer).
A sample is (image uint8 [H, W, 3], boxes float [N, 4] xyxy pixels, labels int [N]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Sample = tuple[np.ndarray, np.ndarray, np.ndarray]


def save_image(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        Image.fromarray(image).save(path, compress_level=1)  # fast; the PNG stays lossless
    else:
        Image.fromarray(image).save(path, quality=95)


def write_coco(annotations: Path, images: Path, samples: Iterable[Sample], classes: Sequence[str],
               suffix: str = ".png", stem: str = "") -> Path:
    """An instances json (bbox [x, y, w, h], category ids from 1 as in COCO) and the images beside it."""
    image_rows, annotation_rows = [], []
    for i, (image, boxes, labels) in enumerate(samples):
        name = f"{stem}{i:06d}{suffix}"
        save_image(image, images / name)
        image_rows.append({"id": i + 1, "file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1])})
        for box, label in zip(np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            x1, y1, x2, y2 = (round(float(v), 2) for v in box)
            annotation_rows.append({"id": len(annotation_rows) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                    "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                                    "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0})
    data = {"info": {"description": "written by modelworks"}, "images": image_rows, "annotations": annotation_rows,
            "categories": [{"id": k + 1, "name": name, "supercategory": "object"} for k, name in enumerate(classes)]}
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(data))
    return annotations


def write_voc(root: Path, splits: dict[str, Iterable[Sample]], classes: Sequence[str], suffix: str = ".jpg") -> Path:
    """A VOCdevkit-style tree: Annotations/<id>.xml, JPEGImages/<id><suffix>, ImageSets/Main/<split>.txt.
    Boxes are written as VOC's 1-based inclusive integer pixel indices (xmin = x1 + 1, xmax = x2)."""
    from xml.sax.saxutils import escape

    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        ids = []
        for i, (image, boxes, labels) in enumerate(samples):
            image_id = f"{split}_{i:06d}"
            ids.append(image_id)
            save_image(image, root / "JPEGImages" / f"{image_id}{suffix}")
            objects = "".join(
                f"\n\t<object>\n\t\t<name>{escape(classes[int(label)])}</name>\n\t\t<pose>Unspecified</pose>\n"
                f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
                f"\t\t\t<xmin>{int(round(box[0])) + 1}</xmin>\n\t\t\t<ymin>{int(round(box[1])) + 1}</ymin>\n"
                f"\t\t\t<xmax>{int(round(box[2]))}</xmax>\n\t\t\t<ymax>{int(round(box[3]))}</ymax>\n"
                f"\t\t</bndbox>\n\t</object>"
                for box, label in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(labels).reshape(-1)))
            height, width = image.shape[:2]
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{image_id}{suffix}</filename>\n"
                f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n"
                f"\t</size>\n\t<segmented>0</segmented>{objects}\n</annotation>\n")
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def write_yolo(root: Path, splits: dict[str, Iterable[Sample]], classes: Sequence[str], suffix: str = ".png") -> Path:
    """ultralytics' layout: data.yaml (absolute `path`, split folders, names), images/<split>/, labels/<split>/
    with one `class cx cy w h` line per box, normalised to [0, 1]."""
    import yaml

    root = root.resolve()
    for split, samples in splits.items():
        for i, (image, boxes, labels) in enumerate(samples):
            save_image(image, root / "images" / split / f"{i:06d}{suffix}")
            height, width = image.shape[:2]
            lines = []
            for (x1, y1, x2, y2), label in zip(np.asarray(boxes, dtype=float).reshape(-1, 4),
                                               np.asarray(labels).reshape(-1)):
                lines.append(f"{int(label)} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                             f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
            label_path = root / "labels" / split / f"{i:06d}.txt"
            label_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.write_text("".join(lines))
    spec = {"path": str(root), **{split: f"images/{split}" for split in splits}, "names": list(classes)}
    (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "data.yaml"
