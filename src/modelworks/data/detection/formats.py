"""Object-detection annotation formats: PASCAL VOC (XML), COCO (json) and YOLO (txt), read into one target format.

Every reader returns a `DetectionSet`: the class names and, per image, its path, size, and its boxes as float32
[N, 4] (x1, y1, x2, y2) in pixels of the original image with int64 labels [N] indexing the class names. The
conversion happens once, here; everything downstream (augmentation, losses, metrics) sees only this format.

Checks, shared by all readers (`check_boxes`): a box with no area (x2 <= x1 or y2 <= y1, e.g. BCCD's two
point-sized boxes) is dropped and reported with its file, since the annotation is unusable but the image is
not; a box reaching outside the image by more than one pixel, a non-numeric coordinate, an unknown class name
or a missing image is an error naming the file. Coordinates within one pixel outside the image are clipped:
VOC's 1-based pixel indices and rounding in converted data sets commonly land there.
"""

from __future__ import annotations

import json
import sys
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import DataError, InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SPLITS = ("train", "val", "test")
# The 20 PASCAL VOC classes in the order of the devkit (and of torchvision's VOCDetection users).
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
EDGE_TOLERANCE_PX = 1.0


class DataWarning(UserWarning):
    """Input that is unusable but harmless to skip (e.g. a zero-area box); reported, never silent."""


@dataclass
class DetectionRecord:
    image: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2 in pixels of the original image
    labels: np.ndarray  # int64 [N], indices into DetectionSet.classes


@dataclass
class DetectionSet:
    classes: list[str]
    records: list[DetectionRecord]
    dropped: list[str] = field(default_factory=list)  # one line per dropped box: file and reason

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_boxes(self) -> int:
        return sum(len(r.labels) for r in self.records)


def check_boxes(where: str, boxes: np.ndarray, width: int, height: int, dropped: list[str]) -> np.ndarray:
    """The rows of `boxes` (xyxy pixels) to keep; zero-area boxes are reported into `dropped`, boxes outside the
    image raise. Boxes within EDGE_TOLERANCE_PX outside the image are clipped to it in place."""
    if not np.isfinite(boxes).all():
        raise DataError(f"{where}: a box coordinate is not a finite number (got {boxes[~np.isfinite(boxes).all(1)][0]})")
    t = EDGE_TOLERANCE_PX
    outside = (boxes[:, 0] < -t) | (boxes[:, 1] < -t) | (boxes[:, 2] > width + t) | (boxes[:, 3] > height + t)
    if outside.any():
        box = [round(float(v), 2) for v in boxes[outside][0]]
        raise DataError(f"{where}: box {box} (x1, y1, x2, y2 in pixels) lies outside the {width}x{height} image; "
                        "fix the annotation (is the file for another image size, or normalised differently?)")
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    for box in boxes[~keep]:
        dropped.append(f"{where}: zero-area box {[round(float(v), 2) for v in box]} dropped")
    return keep


def report_dropped(source: str, dropped: list[str]) -> None:
    if dropped:
        shown = "\n  ".join(dropped[:5]) + (f"\n  ... and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warnings.warn(f"{source}: {len(dropped)} unusable box(es) dropped:\n  {shown}", DataWarning, stacklevel=3)


def _image_size(path: Path) -> tuple[int, int]:
    """From the file's header alone (nothing is decoded here; DetectionImages applies the pixel limit when it
    decodes, where the model's input size is known)."""
    from ..image_files import read_image_size

    try:
        return read_image_size(path, sys.maxsize)
    except InputError as exc:
        raise DataError(str(exc)) from None


def _require_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise DataError(f"{where}: its image {path} does not exist; restore the image or remove the annotation")
    return path


# ---------------------------------------------------------------------------------------------- PASCAL VOC

# Folder names as labelling tools write them, compared case-insensitively: the devkit's Annotations/ +
# JPEGImages/, and the annotations/ + images/ of LabelImg, CVAT and Roboflow exports.
VOC_ANNOTATION_FOLDERS = ("annotations",)
VOC_IMAGE_FOLDERS = ("jpegimages", "images")


@dataclass
class VocLayout:
    """Where one VOC data set keeps its files; `splits` is empty when it has no ImageSets/Main/<split>.txt."""
    root: Path
    annotations: Path  # the folder of <id>.xml files
    images: Path  # the folder their <filename> names (the same folder when XML lies beside each image)
    splits: dict[str, list[str]]  # image ids per split file
    description: str  # the layout in words, for the log

    def all_ids(self) -> list[str]:
        """Every annotated image id: the split files' ids, or every XML file's name when there are none."""
        if self.splits:
            return [image_id for ids in self.splits.values() for image_id in ids]
        return sorted(p.stem for p in self.annotations.iterdir() if p.suffix.lower() == ".xml" and p.is_file())


def _child(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first subfolder of `folder` whose name is one of `names`, ignoring case."""
    found = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    return next((found[name] for name in names if name in found), None)


def find_voc_layout(root: Path) -> VocLayout:
    """Recognise a VOC folder as users have it: a VOCdevkit tree, annotations/ + images/ (any case), or XML
    files beside their images; with or without ImageSets/Main/<split>.txt."""
    if not root.is_dir():
        raise DataError(f"data.source=voc:{root}: the folder does not exist")
    annotations = _child(root, VOC_ANNOTATION_FOLDERS)
    if annotations is not None:
        images = _child(root, VOC_IMAGE_FOLDERS)
        if images is None:
            folders = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"data.source=voc:{root}: has {annotations.name}/ but no image folder (got folders: "
                            f"{', '.join(folders)}); put the images in JPEGImages/ or images/ beside it")
        description = f"{annotations.name}/ + {images.name}/"
    elif any(p.suffix.lower() == ".xml" for p in root.iterdir()):
        annotations = images = root
        description = "XML files beside their images"
    else:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"data.source=voc:{root}: no VOC annotations found (got folders: "
                        f"{', '.join(folders) or 'none'}); expected Annotations/ + JPEGImages/ (VOCdevkit), "
                        "annotations/ + images/ (LabelImg, CVAT, Roboflow), or .xml files beside their images")
    image_sets = _child(root, ("imagesets",))
    main = _child(image_sets, ("main",)) if image_sets is not None else None
    splits = {}
    for split in SPLITS:
        path = main / f"{split}.txt" if main is not None else None
        if path is not None and path.is_file():
            splits[split] = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return VocLayout(root, annotations, images, splits, description)


def voc_split_ids(root: Path, split: str) -> list[str] | None:
    """Image ids of ImageSets/Main/<split>.txt, or None when the tree has no such split."""
    return find_voc_layout(root).splits.get(split)


def voc_class_names(root: Path, ids: list[str]) -> list[str]:
    """The devkit's 20 classes for a PASCAL VOC year folder, else the names found in these annotations, sorted."""
    if root.resolve().name.upper().startswith("VOC20"):
        return list(VOC_CLASSES)
    layout = find_voc_layout(root)
    names = set()
    for image_id in ids:
        names.update(_voc_object_names(layout.annotations / f"{image_id}.xml"))
    return sorted(names)


def _voc_object_names(path: Path) -> list[str]:
    return [(obj.findtext("name") or "").strip() for obj in _parse_xml(path).iter("object")]


def _parse_xml(path: Path) -> ET.Element:
    if not path.is_file():
        raise DataError(f"{path}: annotation file does not exist (listed in ImageSets/Main)")
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from None


def _voc_image(layout: VocLayout, tree: ET.Element, image_id: str, where: str) -> Path:
    """The image an annotation describes: its <filename> in the image folder, else the image named like the
    XML file. Labelling tools disagree on <filename> (some drop the extension, some keep the name of a file
    renamed since), while the XML and the image sharing a stem holds for all of them."""
    filename = (tree.findtext("filename") or "").strip()
    if filename and (layout.images / filename).is_file():
        return layout.images / filename
    for suffix in IMAGE_SUFFIXES:
        for candidate in (layout.images / f"{image_id}{suffix}", layout.images / f"{image_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return _require_image(layout.images / (filename or f"{image_id}.jpg"), where)


def read_voc(root: Path, split: str, classes: list[str]) -> DetectionSet:
    """One split of a VOC data set listed by ImageSets/Main/<split>.txt (see `find_voc_layout` for the folders)."""
    layout = find_voc_layout(root)
    if split not in layout.splits:
        raise DataError(f"{root / 'ImageSets' / 'Main' / (split + '.txt')}: no such split file (found: "
                        f"{', '.join(layout.splits) or 'none'}); a VOC tree lists its splits in "
                        "ImageSets/Main/{train,val,test}.txt, or has none and data.val_fraction is held out")
    return read_voc_ids(layout, layout.splits[split], classes)


def read_voc_ids(layout: VocLayout, ids: list[str], classes: list[str]) -> DetectionSet:
    """The annotations of these image ids, labels indexing `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    records, dropped = [], []
    for image_id in ids:
        path = layout.annotations / f"{image_id}.xml"
        tree = _parse_xml(path)
        image = _voc_image(layout, tree, image_id, str(path))
        try:
            width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
        except (TypeError, ValueError):
            width, height = _image_size(image)
        if width <= 0 or height <= 0:  # some tools write <size> 0 0 when they never opened the image
            width, height = _image_size(image)
        boxes, labels = [], []
        for k, obj in enumerate(tree.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                raise DataError(f"{path}: object {k} has unknown class name {name!r}; known classes: "
                                f"{', '.join(classes)} (set data.classes to the full list, or to [] to take the "
                                "names from the annotations)")
            try:
                # VOC coordinates are 1-based inclusive pixel indices: pixel i covers [i - 1, i] in our frame.
                # A point-sized annotation (xmax == xmin) is not shifted, so it stays zero-area and is reported.
                x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise DataError(f"{path}: object {k} ({name}) lacks a numeric <bndbox> with xmin, ymin, xmax, "
                                "ymax") from None
            boxes.append([x1 - 1, y1 - 1, x2, y2] if (x2 > x1 and y2 > y1) else [x1, y1, x2, y2])
            labels.append(index[name])
        records.append(_record(str(path), image, width, height, boxes, labels, dropped))
    return DetectionSet(list(classes), records, dropped)


def _record(where: str, image: Path, width: int, height: int, boxes: list, labels: list, dropped: list[str]
            ) -> DetectionRecord:
    box_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    keep = check_boxes(where, box_array, width, height, dropped)
    return DetectionRecord(image, int(width), int(height), box_array[keep], label_array[keep])


# ---------------------------------------------------------------------------------------------- COCO


def read_coco(annotations: Path, images: Path) -> DetectionSet:
    """A COCO instances file (images, annotations with [x, y, w, h] boxes, categories) and its image folder.
    Labels follow the categories sorted by id; crowd annotations are left out (they mark regions, not objects)."""
    where = str(annotations)
    if not annotations.is_file():
        raise DataError(f"{annotations}: COCO annotation file does not exist")
    try:
        data = json.loads(annotations.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        category_index = {c["id"]: i for i, c in enumerate(categories)}
        classes = [str(c["name"]) for c in categories]
        image_rows = data["images"]
        annotation_rows = data.get("annotations", [])
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise DataError(f"{where}: not a COCO instances file (missing {exc}); it needs 'images', 'annotations' "
                        "and 'categories'") from None
    by_image: dict = {}
    for k, row in enumerate(annotation_rows):
        try:
            if row.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in row["bbox"])
            image_id, category = row["image_id"], row["category_id"]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise DataError(f"{where}: annotation {k} is malformed (needs image_id, category_id and bbox "
                            f"[x, y, w, h]; got {row!r})") from None
        if category not in category_index:
            raise DataError(f"{where}: annotation {k} has unknown category_id {category!r}; known ids: "
                            f"{sorted(category_index)}")
        by_image.setdefault(image_id, []).append(([x, y, x + w, y + h], category_index[category]))
    records, dropped = [], []
    for row in image_rows:
        try:
            image_id, name, width, height = row["id"], row["file_name"], int(row["width"]), int(row["height"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: image entry {row!r} lacks id, file_name, width or height") from None
        image = _require_image(images / name, f"{where} (image id {image_id})")
        objects = by_image.get(image_id, [])
        records.append(_record(f"{where} (image {name})", image, width, height, [o[0] for o in objects],
                               [o[1] for o in objects], dropped))
    return DetectionSet(classes, records, dropped)


# ---------------------------------------------------------------------------------------------- YOLO


def read_yolo_yaml(path: Path) -> tuple[Path, dict, list[str]]:
    """An ultralytics-style data.yaml: (root, {split: image folder}, class names)."""
    import yaml

    if path.is_dir():
        path = path / "data.yaml"
    if not path.is_file():
        raise DataError(f"{path}: YOLO data file does not exist; a YOLO data set is a data.yaml (path, train, "
                        "val, names) with images/<split>/ and labels/<split>/ beside it")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
        names = spec["names"]
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from None
    except (KeyError, TypeError):
        raise DataError(f"{path}: has no 'names' (the class names, a list or an index-to-name mapping)") from None
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    root = Path(spec.get("path") or path.parent)
    if not root.is_absolute():
        root = path.parent / root
    folders = {split: root / spec[split] for split in SPLITS if spec.get(split)}
    return root, folders, [str(n) for n in names]


def yolo_label_path(image: Path) -> Path:
    """ultralytics' convention: the last `images` folder of the path becomes `labels`, the suffix `.txt`."""
    parts = list(image.parts)
    i = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if i is None:
        return image.with_suffix(".txt")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def read_yolo(data_yaml: Path, split: str) -> DetectionSet:
    """One split of a YOLO data set: per image a .txt of `class cx cy w h` lines, normalised to [0, 1]. An image
    without a label file has no objects (the format's convention for background images)."""
    _, folders, classes = read_yolo_yaml(data_yaml)
    if split not in folders:
        raise DataError(f"{data_yaml}: has no {split!r} split (found: {', '.join(folders) or 'none'})")
    folder = folders[split]
    if not folder.is_dir():
        raise DataError(f"{data_yaml}: the {split} image folder {folder} does not exist")
    records, dropped = [], []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        width, height = _image_size(image)
        label_path = yolo_label_path(image)
        boxes, labels = [], []
        lines = label_path.read_text().splitlines() if label_path.is_file() else []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                fields = line.split()
                if len(fields) != 5:
                    raise ValueError
                cls, (cx, cy, w, h) = int(fields[0]), (float(v) for v in fields[1:])
            except ValueError:
                raise DataError(f"{label_path}:{n}: expected `class cx cy w h` (got {line.strip()!r})") from None
            if not 0 <= cls < len(classes):
                raise DataError(f"{label_path}:{n}: unknown class index {cls}; {data_yaml} names {len(classes)} "
                                f"classes (0-{len(classes) - 1})")
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            labels.append(cls)
        records.append(_record(str(label_path), image, width, height, boxes, labels, dropped))
    return DetectionSet(classes, records, dropped)
