"""`fmnist-captions`: an offline captioning data set of scenes composed from real Fashion-MNIST items, written in
the COCO-captions format.

A scene holds one or two groups; a group is one or two items of one class, one colour (the grey item tinted) and
one size. Two groups sit in opposite halves of the image (left/right or top/bottom), which fixes their relation;
one group sits in a named region. Several references per image describe the same layout in different words:
"a small red sneaker left of two large blue bags", "two large blue bags right of a small red sneaker", "a red
sneaker on the left and two blue bags on the right", ...

Compositional generalisation is measured, not only memorisation: some (class, colour) pairs never occur in the
training and validation scenes (HELD_OUT below), and the test split is half scenes of seen pairs only and half
scenes holding at least one unseen pair, each image marked `"combination": "seen" | "unseen"`.

The background, the item resizing and the overlap test are the detection scene generator's
(data/detection/scenes.py), as are the item pools: train, val and test scenes take items from disjoint parts of
Fashion-MNIST. Everything follows from `seed`: the same settings give the same files.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..detection.scenes import _iou, _resize_item, background
from ..detection.writers import save_image
from ..images import load_fashion_mnist

# Fashion-MNIST's classes as nouns a caption uses (singular, plural), in label order.
NOUNS = [("top", "tops"), ("trouser", "trousers"), ("pullover", "pullovers"), ("dress", "dresses"),
         ("coat", "coats"), ("sandal", "sandals"), ("shirt", "shirts"), ("sneaker", "sneakers"), ("bag", "bags"),
         ("boot", "boots")]
# Tints for the grey items: saturated and bright, so they stay apart on the dim backgrounds.
COLOURS = {"red": (235, 45, 40), "green": (50, 205, 60), "blue": (60, 100, 250), "yellow": (245, 225, 40),
           "purple": (170, 70, 230), "white": (245, 245, 245)}
COLOUR_NAMES = list(COLOURS)
# (class, colour) pairs never in training or validation: every class has one unseen colour.
HELD_OUT = frozenset((c, COLOUR_NAMES[(2 * c + 1) % len(COLOUR_NAMES)]) for c in range(len(NOUNS)))
SIZES = {"small": (0.25, 0.31), "large": (0.40, 0.48)}  # item side as a fraction of the image side
NUMBERS = {1: "a", 2: "two"}
CAPTIONS_VERSION = 2  # in the folder name: a change to the wording regenerates the captions (2: "there are two")
# One-group regions: (x0, y0, x1, y1) as fractions of the image, and the phrase that names them.
REGIONS = {"left": ((0.0, 0.0, 0.5, 1.0), "on the left"), "right": ((0.5, 0.0, 1.0, 1.0), "on the right"),
           "top": ((0.0, 0.0, 1.0, 0.5), "at the top"), "bottom": ((0.0, 0.5, 1.0, 1.0), "at the bottom"),
           "middle": ((0.2, 0.2, 0.8, 0.8), "in the middle")}
# Two groups: the two halves, the relation of the first half's group to the second's, and its inverse.
RELATIONS = {"horizontal": (("left", "right"), "left of", "right of"),
             "vertical": (("top", "bottom"), "above", "below")}


@dataclass
class CaptionSceneConfig:
    train: int = 8000  # scenes per split
    val: int = 500
    test: int = 1000  # half seen combinations, half unseen
    image_size: int = 64  # square scenes, pixels
    seed: int = 0

    def __post_init__(self):
        if min(self.train, self.val) < 1 or self.test < 0:
            raise ValueError(f"data.scenes: train and val need at least one scene (got {self.train}, {self.val})")
        if not 32 <= self.image_size <= 512:
            raise ValueError(f"data.scenes.image_size: must be in [32, 512] (got {self.image_size})")


@dataclass
class Group:
    label: int  # Fashion-MNIST class
    colour: str
    size: str  # small | large
    count: int
    region: str  # left/right/top/bottom/middle
    boxes: list  # [x0, y0, x1, y1] of each item's visible pixels

    def phrase(self, with_size: bool = True) -> str:
        noun = NOUNS[self.label][self.count > 1]
        words = [NUMBERS[self.count]] + ([self.size] if with_size else []) + [self.colour, noun]
        return " ".join(words)

    def there(self) -> str:
        return "there are" if self.count > 1 else "there is"


def references(groups: list[Group], relation: str | None) -> list[str]:
    """Five differently worded captions of one layout."""
    if len(groups) == 1:
        (g,) = groups
        where = REGIONS[g.region][1]
        return [f"{g.phrase()} {where}", g.phrase(), f"{g.phrase(False)} {where}", f"{g.there()} {g.phrase()} {where}",
                f"an image of {g.phrase()} {where}"]
    a, b = groups
    _, forward, inverse = RELATIONS[relation]
    if a.region in ("right", "bottom"):  # the first group drew the second half
        forward, inverse = inverse, forward
    return [f"{a.phrase()} {forward} {b.phrase()}", f"{b.phrase()} {inverse} {a.phrase()}",
            f"{a.phrase(False)} {forward} {b.phrase(False)}",
            f"{a.phrase()} {REGIONS[a.region][1]} and {b.phrase()} {REGIONS[b.region][1]}",
            f"{b.there()} {b.phrase(False)} {inverse} {a.phrase()}"]


def scene_folder(root: Path, cfg: CaptionSceneConfig) -> Path:
    """Where captions with these settings live: the name encodes every setting, so a change regenerates."""
    return root / (f"fmnist-captions-v{CAPTIONS_VERSION}-{cfg.image_size}px-{cfg.train}-{cfg.val}-{cfg.test}"
                   f"-seed{cfg.seed}")


def ensure_caption_scenes(root: Path, cfg: CaptionSceneConfig, fashion_root: Path | None = None) -> Path:
    """The data set folder under `root`, generated first if it is not complete: images/<split>/*.png and
    annotations/captions_<split>.json (COCO captions; each image also records its `groups`, `relation` and
    `combination`)."""
    folder = scene_folder(root, cfg)
    if (folder / "settings.json").is_file():
        return folder
    fashion_root = fashion_root or root
    train = load_fashion_mnist(fashion_root, "train", download=False)
    test = load_fashion_mnist(fashion_root, "test", download=False)
    cut = 50_000 if len(train.labels) > 50_000 else len(train.labels) * 5 // 6  # a small copy: split it 5:1
    pools = {"train": (train.images[:cut], train.labels[:cut]), "val": (train.images[cut:], train.labels[cut:]),
             "test": (test.images, test.labels)}
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for k, split in enumerate(("train", "val", "test")):
        count = getattr(cfg, split)
        if count == 0:
            continue
        images, labels = pools[split]
        scenes = compose_caption_scenes(images[:, 0].numpy(), labels.numpy(), count, cfg.image_size,
                                        seed=cfg.seed * 3 + k, split=split)
        scenes = tqdm(scenes, total=count, desc=f"fmnist-captions {split} (generated once)", unit="scene",
                      file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        write_coco_captions(partial / "annotations" / f"captions_{split}.json", partial / "images" / split, scenes)
    (partial / "settings.json").write_text(json.dumps(asdict(cfg)))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # complete or absent: an interrupted generation leaves only the .partial folder
    return folder


def write_coco_captions(annotations: Path, images: Path, scenes) -> None:
    """COCO captions json (images, annotations with image_id and caption) and the PNGs beside it."""
    image_rows, caption_rows = [], []
    for i, (image, groups, relation, captions) in enumerate(scenes):
        name = f"{i:06d}.png"
        save_image(image, images / name)
        unseen = any((g.label, g.colour) in HELD_OUT for g in groups)
        image_rows.append({"id": i + 1, "file_name": name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                           "combination": "unseen" if unseen else "seen", "relation": relation,
                           "groups": [asdict(g) for g in groups]})
        for caption in captions:
            caption_rows.append({"id": len(caption_rows) + 1, "image_id": i + 1, "caption": caption})
    data = {"info": {"description": "fmnist-captions, written by modelworks"}, "licenses": [], "images": image_rows,
            "annotations": caption_rows}
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(data))


def draw_groups(rng: np.random.Generator, split: str, scene: int, count: int) -> list[tuple[int, str]]:
    """The (class, colour) of each group. Train and val: seen pairs only. Test: the first half seen only, the
    second half with at least one unseen pair."""
    n = 1 if rng.random() < 0.4 else 2
    want_unseen = split == "test" and scene >= count // 2
    while True:
        pairs = [(int(rng.integers(len(NOUNS))), COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))])
                 for _ in range(n)]
        if n == 2 and pairs[0] == pairs[1]:
            continue  # two groups of the same kind would read as one group of more
        if want_unseen == any(p in HELD_OUT for p in pairs):
            return pairs


def place_group(canvas: np.ndarray, items: np.ndarray, pool: np.ndarray, region: tuple, side_range: tuple,
                colour: tuple, count: int, placed: list, rng: np.random.Generator) -> list:
    """Paste `count` items (indices into `items` drawn from `pool`) inside `region` (pixels), tinted, not
    overlapping earlier boxes by more than IoU 0.1; fewer when the region is full. Returns their boxes."""
    x0, y0, x1, y1 = region
    boxes = []
    for _ in range(count):
        for _attempt in range(30):
            side = int(rng.integers(side_range[0], side_range[1] + 1))
            side = min(side, x1 - x0, y1 - y0)
            k = int(pool[rng.integers(len(pool))])
            alpha = _resize_item(items[k], side) / 255.0
            rows, cols = np.nonzero(alpha > 0.1)
            if len(rows) == 0:
                continue
            px = int(rng.integers(x0, x1 - side + 1))
            py = int(rng.integers(y0, y1 - side + 1))
            box = np.array([px + cols.min(), py + rows.min(), px + cols.max() + 1, py + rows.max() + 1], np.float32)
            if (_iou(box, np.array(placed + boxes).reshape(-1, 4)) <= 0.1).all():
                a = alpha[..., None]
                patch = canvas[py:py + side, px:px + side]
                canvas[py:py + side, px:px + side] = patch * (1 - a) + np.array(colour, np.float32) * a
                boxes.append(box)
                break
    return boxes


def compose_caption_scenes(items: np.ndarray, item_labels: np.ndarray, count: int, size: int, seed: int,
                           split: str = "train"):
    """`count` scenes as (image uint8 [S, S, 3], groups, relation or None, references). Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    by_class = [np.nonzero(item_labels == c)[0] for c in range(len(NOUNS))]
    for scene in range(count):
        canvas = background(size, rng).astype(np.float32)
        pairs = draw_groups(rng, split, scene, count)
        relation = None
        if len(pairs) == 1:
            regions = [str(rng.choice(list(REGIONS)))]
        else:
            relation = str(rng.choice(list(RELATIONS)))
            halves = list(RELATIONS[relation][0])
            if rng.random() < 0.5:
                halves.reverse()
            regions = halves
        groups, placed = [], []
        for (label, colour), region in zip(pairs, regions):
            size_name = str(rng.choice(list(SIZES)))
            wanted = 1 if rng.random() < 0.6 else 2
            fx0, fy0, fx1, fy1 = REGIONS[region][0]
            box = (int(fx0 * size), int(fy0 * size), int(fx1 * size), int(fy1 * size))
            lo, hi = SIZES[size_name]
            boxes = place_group(canvas, items, by_class[label], box, (int(lo * size), int(hi * size)),
                                COLOURS[colour], wanted, placed, rng)
            placed += boxes
            groups.append(Group(label, colour, size_name, len(boxes), region, [b.tolist() for b in boxes]))
        groups = [g for g in groups if g.count]  # (an item always fits an empty half; kept for safety)
        if len(groups) < 2:
            relation = None
        image = np.clip(canvas, 0, 255).astype(np.uint8)
        yield image, groups, relation, references(groups, relation)
