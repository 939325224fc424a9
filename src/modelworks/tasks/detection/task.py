"""Project 2: object detection (fmnist-scenes, PASCAL VOC, COCO, YOLO txt), YOLOv1 and an anchor-free detector."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import torch
from torch import nn

from ...data.detection import formats
from ...data.detection.augment import DetectionAugmentConfig, augment_detection_batch
from ...data.detection.dataset import build_split, collate
from ...data.detection.formats import DetectionSet, report_dropped
from ...data.detection.scenes import SceneConfig, ensure_scenes
from ...data.images import FASHION_MNIST_CLASSES, hold_out
from ...engine import distributed
from ...errors import ConfigError, DataError
from ..base import Splits, StepOutput, Task
from ..calibration import plot_reliability
from . import report
from .boxes import count_matches, postprocess
from .loss import AnchorFreeLoss, TaskAlignedAssigner, YOLOv1Loss
from .models import AnchorFreeDetector, YOLOv1, build_decoder, fuse_for_inference
from .predictor import DetectionPredictor

SOURCES = "fmnist-scenes, voc:PATH, coco:ANNOTATIONS.json:IMAGES_DIR or yolo:DATA.yaml"


@dataclass
class DetectionModelConfig:
    name: Literal["anchor-free", "yolov1"] = "anchor-free"
    size: Literal["t", "n", "s", "m"] = "n"  # anchor-free: YOLOv8's n/s/m widths and depths (t: a toy size)
    reg_max: int = 16  # anchor-free: bins per box-edge distribution; edges reach (reg_max - 1) strides
    box_gain: float = 7.5  # anchor-free loss weights (YOLOv8's defaults)
    cls_gain: float = 0.5
    dfl_gain: float = 1.5
    top_k: int = 10  # anchor-free: anchor points the task-aligned assigner gives each object
    grid: int = 7  # yolov1: S, cells per side
    boxes_per_cell: int = 2  # yolov1: B
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)  # yolov1: backbone stage widths (five stages: stride 32)
    head_width: int = 512  # yolov1
    lambda_coord: float = 5.0  # yolov1 loss weights (the seed's and the paper's)
    lambda_noobj: float = 0.5
    score_threshold: float = 0.001  # detections kept for evaluation (low: mAP integrates over all scores)
    iou_threshold: float = 0.6  # class-aware NMS
    max_detections: int = 100  # per image (COCO's AR@100 limit); also the served default
    predict_score_threshold: float = 0.25  # served detections' default minimum score (a request may set its own);
    # evaluation keeps everything above score_threshold instead

    def __post_init__(self):
        if self.name == "yolov1" and len(self.widths) != 5:
            raise ValueError(f"model.widths: yolov1 needs five stage widths (got {list(self.widths)})")
        if self.reg_max < 2:
            raise ValueError(f"model.reg_max: needs at least 2 bins (got {self.reg_max})")
        for name in ("score_threshold", "predict_score_threshold", "iou_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"model.{name}: must be in [0, 1] (got {getattr(self, name)})")


@dataclass
class DetectionDataConfig:
    source: str = "fmnist-scenes"  # fmnist-scenes | voc:PATH | coco:ANNOTATIONS.json:IMAGES_DIR | yolo:DATA.yaml
    # (voc: a VOCdevkit tree, annotations/ + images/, or XML beside each image; without ImageSets/Main split
    # files, data.val_fraction and data.test_fraction are held out)
    # (COCO: put {split} in both paths, e.g. coco:ann/instances_{split}.json:images/{split}, to use its splits)
    root: str = "data"  # fmnist-scenes: where Fashion-MNIST is looked for and the scenes are written
    image_size: int = 160  # images are letterboxed to this square size (pixels; a multiple of 32)
    classes: list[str] = field(default_factory=list)  # voc: class names in label order; empty: the VOC
    # devkit's 20 for VOC20xx folders, else the names found in all the annotations, sorted (and logged)
    download: bool = False  # voc: fetch a missing VOCdevkit/VOC2007 or VOC2012 folder (torchvision, checksummed)
    val_fraction: float = 0.1  # held out of train when the source has no validation split
    test_fraction: float = 0.0  # held out of train when the source has no test split; 0: the final report uses
    # the validation split (a few hundred labelled images are worth more for training than a second held-out set)
    split_seed: int = 0
    cache_limit_mb: int = 2048  # splits whose decoded images fit are held in memory on the training device
    scenes: SceneConfig = field(default_factory=SceneConfig)  # fmnist-scenes only
    augment: DetectionAugmentConfig = field(default_factory=DetectionAugmentConfig)

    def __post_init__(self):
        kind, _, rest = self.source.partition(":")
        if kind not in ("fmnist-scenes", "voc", "coco", "yolo") or (kind == "fmnist-scenes") == bool(rest):
            raise ValueError(f"data.source: {self.source!r} is not a detection data source; use {SOURCES}")
        if kind == "coco" and len(rest.rsplit(":", 1)) != 2:
            raise ValueError(f"data.source: {self.source!r}: a COCO source names its annotation file and image "
                             "folder, coco:ANNOTATIONS.json:IMAGES_DIR")
        if self.image_size % 32 or self.image_size < 32:
            raise ValueError(f"data.image_size: must be a positive multiple of 32, the coarsest stride "
                             f"(got {self.image_size})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction: must be in (0, 1) (got {self.val_fraction})")
        if not 0 <= self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.test_fraction: must be in [0, 1) and leave training images beside "
                             f"data.val_fraction={self.val_fraction} (got {self.test_fraction})")
        if self.classes and kind != "voc":
            raise ValueError(f"data.classes: only a voc source takes its class list from the config; {kind} data "
                             "name their classes themselves (remove data.classes)")


def download_voc(root: Path, download: bool) -> None:
    """Fetch PASCAL VOC into `root` (a .../VOCdevkit/VOC<year> path) with torchvision's checksummed downloader."""
    year = root.name[3:] if root.name.startswith("VOC") else ""
    if not download or year not in ("2007", "2012") or root.parent.name != "VOCdevkit":
        raise DataError(f"data.source=voc:{root}: the folder does not exist. Point it at a VOC folder "
                        "(Annotations/ + JPEGImages/, annotations/ + images/, or XML beside each image), or name "
                        ".../VOCdevkit/VOC2007 or VOC2012 and set data.download=true to fetch PASCAL VOC (needs "
                        "internet)")
    from torchvision.datasets import VOCDetection

    for image_set in ("trainval", "test") if year == "2007" else ("trainval",):
        try:
            VOCDetection(str(root.parent.parent), year=year, image_set=image_set, download=True)
        except Exception as exc:  # network errors come in many types; the message says what to do
            raise DataError(f"data.source=voc:{root}: downloading PASCAL VOC {year} ({image_set}) failed ({exc}); "
                            "download it by hand into this folder, or check the network") from None


class DetectionTask(Task):
    name = "detection"
    monitor = ("val/map", "max")
    ModelConfig = DetectionModelConfig
    DataConfig = DetectionDataConfig
    uses_channels_last = True
    # The loss cannot reach zero: its classification and distribution-focal parts train towards soft targets
    # (IoU-weighted scores, a box edge split between two bins), whose entropy stays. On one batch of 16 it ends
    # near 8% of its start in 200 steps (fmnist-scenes recipe: 7.8%; tiny(): 8.5% at lr 0.01, the box part at
    # 0.02-0.04), while a model that cannot learn stays near 100%.
    overfit_target = 0.15

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kind, _, self.location = cfg.data.source.partition(":")
        self.image_size = cfg.data.image_size
        cells = self.image_size // 32
        if cfg.model.name == "yolov1" and cells % cfg.model.grid:
            # Average-pooling a stride-32 map to the grid must merge whole cells (ONNX cannot export the rest).
            raise ConfigError(f"model.grid: yolov1's {cfg.model.grid}x{cfg.model.grid} grid must divide the "
                              f"{cells}x{cells} stride-32 feature map of data.image_size={self.image_size}; use "
                              f"an image size that is a multiple of {32 * cfg.model.grid} or a grid dividing {cells}")
        self.classes: list[str] = []
        self.notes: list[str] = []  # what the data decided that the config did not say, for the run's log
        self._decoder: nn.Module | None = None
        self._criterion: nn.Module | None = None

    # ------------------------------------------------------------------------------------------ data

    def read_splits(self) -> dict[str, DetectionSet]:
        """The source's annotations, per split, in the internal target format (no pixels decoded yet)."""
        data = self.cfg.data
        if self.kind == "fmnist-scenes":
            if distributed.is_main():  # generated once, by rank 0; the other ranks wait and then read it
                ensure_scenes(Path(data.root), data.scenes)
            distributed.barrier()
            folder = ensure_scenes(Path(data.root), data.scenes)
            splits = {s: formats.read_coco(folder / "annotations" / f"instances_{s}.json", folder / "images" / s)
                      for s in formats.SPLITS if (folder / "annotations" / f"instances_{s}.json").is_file()}
        elif self.kind == "voc":
            root = Path(self.location)
            if not root.is_dir():
                download_voc(root, data.download)
            layout = formats.find_voc_layout(root)
            classes = self.class_names()
            if layout.splits and "train" not in layout.splits:
                raise DataError(f"{root / 'ImageSets' / 'Main' / 'train.txt'}: a VOC source with split files needs "
                                f"a train split (found: {', '.join(layout.splits)})")
            if layout.splits:
                splits = {s: formats.read_voc_ids(layout, ids, classes) for s, ids in layout.splits.items()}
            else:
                splits = {"train": formats.read_voc_ids(layout, layout.all_ids(), classes)}
            self.notes.append(f"data: VOC layout {layout.description}"
                              + (f", splits from ImageSets/Main ({', '.join(layout.splits)})" if layout.splits
                                 else ", no ImageSets/Main split files"))
        elif self.kind == "coco":
            annotations, images = self.location.rsplit(":", 1)
            if "{split}" in annotations:
                splits = {s: formats.read_coco(Path(annotations.format(split=s)), Path(images.format(split=s)))
                          for s in formats.SPLITS if Path(annotations.format(split=s)).is_file()}
                if "train" not in splits:
                    raise DataError(f"{annotations.format(split='train')}: the COCO source has no train split")
            else:
                splits = {"train": formats.read_coco(Path(annotations), Path(images))}
        else:
            _, folders, _ = formats.read_yolo_yaml(Path(self.location))
            splits = {s: formats.read_yolo(Path(self.location), s) for s in folders}
        held_out = {name: fraction for name, fraction in (("test", data.test_fraction), ("val", data.val_fraction))
                    if name not in splits and fraction > 0}
        if held_out:
            train = splits["train"]
            for name, indices in hold_out(len(train.records), held_out, data.split_seed).items():
                splits[name] = DetectionSet(train.classes, [train.records[i] for i in indices],
                                            train.dropped if name == "train" else [])
            self.notes.append("data: " + ", ".join(f"{name} {len(splits[name])} images ({fraction:g} of train, "
                                                   f"data.{name}_fraction)" for name, fraction in held_out.items())
                              + f" held out of the {len(train)} training images with data.split_seed="
                              f"{data.split_seed}")
        for split in splits.values():
            if split.classes != splits["train"].classes:
                raise DataError(f"data.source={self.cfg.data.source}: the splits name different classes "
                                f"({splits['train'].classes} and {split.classes})")
            report_dropped(f"data.source={self.cfg.data.source}", split.dropped)
        return splits

    def datasets(self, device: torch.device) -> Splits:
        splits = self.read_splits()
        self.classes = splits["train"].classes
        if not splits["train"].records or not splits["val"].records:
            raise DataError(f"data.source={self.cfg.data.source}: the train or val split has no images")
        make = lambda s: build_split(s, self.image_size, device, self.cfg.data.cache_limit_mb)  # noqa: E731
        return Splits(make(splits["train"]), make(splits["val"]),
                      make(splits["test"]) if "test" in splits else None, collate_fn=collate,
                      notes=list(dict.fromkeys(self.notes)))

    def class_names(self) -> list[str]:
        """The label order, read from the source's metadata without decoding images."""
        if self.classes:
            return self.classes
        data = self.cfg.data
        if self.kind == "fmnist-scenes":
            self.classes = list(FASHION_MNIST_CLASSES)
        elif self.kind == "voc":
            root = Path(self.location)
            if data.classes:
                self.classes = list(data.classes)
            else:
                if not root.is_dir():
                    download_voc(root, data.download)
                # Every split's annotations, so a class seen only in val or test is not an unknown name there.
                self.classes = formats.voc_class_names(root, formats.find_voc_layout(root).all_ids())
                self.notes.append(f"data: {len(self.classes)} classes from the annotations (data.classes not set), "
                                  f"sorted: {', '.join(self.classes)}")
        elif self.kind == "coco":
            path = Path(self.location.rsplit(":", 1)[0].format(split="train"))
            try:
                categories = json.loads(path.read_text())["categories"]
                self.classes = [str(c["name"]) for c in sorted(categories, key=lambda c: c["id"])]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: cannot read the COCO categories ({exc})") from None
        else:
            self.classes = formats.read_yolo_yaml(Path(self.location))[2]
        if not self.classes:
            raise DataError(f"data.source={data.source}: no class names found; set data.classes")
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names())

    def prepare_batch(self, batch: dict, augment: torch.Generator | None, progress: float = 0.0) -> dict:
        x = batch["images"].float() / 255
        boxes, labels = batch["boxes"].float(), batch["labels"]
        if augment is not None:
            x, boxes, labels = augment_detection_batch(x, boxes, labels, self.cfg.data.augment, augment, progress)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return {**batch, "images": x, "boxes": boxes, "labels": labels}

    def draw_batch(self, batch: dict, min_side: int = 256) -> list[torch.Tensor]:
        """The images with their boxes and class names as the loss sees them (after augmentation), enlarged to at
        least `min_side` pixels so the names stay legible."""
        from torchvision.utils import draw_bounding_boxes

        classes = self.class_names()
        font = report.label_font()
        drawn = []
        for image, boxes, labels in zip(batch["images"].cpu(), batch["boxes"].cpu(), batch["labels"].cpu()):
            factor = max(1, -(-min_side // max(image.shape[-2:])))
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
            pixels = pixels.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
            keep = labels >= 0  # -1: padding, or a box the augmentation pushed out of the picture
            names = [classes[int(c)] for c in labels[keep]]
            colours = [report.PALETTE[int(c) % len(report.PALETTE)] for c in labels[keep]]
            drawn.append(draw_bounding_boxes(pixels, boxes[keep] * factor, names, colours, width=2, font=font,
                                             font_size=12, fill_labels=True))
        return drawn

    # ------------------------------------------------------------------------------------------ model

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        if m.name == "yolov1":
            return YOLOv1(self.num_classes, m.grid, m.boxes_per_cell, tuple(m.widths), m.head_width)
        return AnchorFreeDetector(self.num_classes, m.size, m.reg_max, self.image_size)

    def decoder(self, device: torch.device) -> nn.Module:
        """Raw head output -> [B, N, 4 + C] boxes (xyxy input pixels) and class scores; outside the export."""
        m = self.cfg.model
        if self._decoder is None:
            self._decoder = build_decoder(m.name, self.num_classes, self.image_size, m.reg_max)
        return self._decoder.to(device)

    def criterion(self, device: torch.device) -> nn.Module:
        m = self.cfg.model
        if self._criterion is None:
            self._criterion = (
                YOLOv1Loss(self.image_size, m.lambda_coord, m.lambda_noobj) if m.name == "yolov1" else
                AnchorFreeLoss(self.decoder(device), m.box_gain, m.cls_gain, m.dfl_gain, TaskAlignedAssigner(m.top_k)))
        return self._criterion.to(device)

    def describe(self, model: nn.Module) -> str:
        m = self.cfg.model
        params = sum(p.numel() for p in model.parameters())
        what = f"yolov1 (S={m.grid}, B={m.boxes_per_cell})" if m.name == "yolov1" else f"anchor-free-{m.size}"
        return f"{what}, {self.num_classes} classes, {self.image_size}px: {params / 1e6:.2f}M parameters"

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        raw = model(batch["images"])
        loss, logs = self.criterion(raw.device)(raw, batch["boxes"], batch["labels"])
        return StepOutput(loss, logs, len(batch["images"]))

    def detect(self, model: nn.Module, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Images (prepared) -> per image {boxes xyxy input pixels, scores, labels} after NMS."""
        m = self.cfg.model
        predictions = self.decoder(images.device)(model(images))
        return postprocess(predictions, m.score_threshold, m.iou_threshold, m.max_detections)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, batches: Iterable, report_dir: Path | None = None) -> dict[str, float]:
        classes = self.class_names()
        recorder = report.DetectionRecorder()
        shown: list[tuple] = []
        seconds, images = 0.0, 0
        for batch in batches:
            tic = time.perf_counter()
            results = self.detect(model, batch["images"])
            seconds += time.perf_counter() - tic
            images += len(results)
            recorder.update(batch, results)
            if report_dir is not None and len(shown) < 16:
                for i in range(min(16 - len(shown), len(results))):
                    keep = batch["labels"][i] >= 0
                    shown.append(((batch["images"][i].float() * 255).round().to(torch.uint8).cpu(),
                                  (batch["boxes"][i][keep].cpu(), batch["labels"][i][keep].cpu()),
                                  {k: v.cpu() for k, v in results[i].items()}))
        recorder.gather()
        summary, per_class, precision = report.coco_metrics(recorder, classes)
        summary["ms_per_image"] = 1000 * seconds / max(images, 1)
        if report_dir is None:
            return summary
        summary.update({f"ap/{name}": ap for name, ap in per_class.items()})
        if shown:
            summary["ms_per_image_batch1_model"] = self._latency_batch1_model(model, [s[0] for s in shown])
        report.plot_precision_recall(precision, classes, report_dir / "precision_recall.png")
        served = self.cfg.model.predict_score_threshold
        calibration, bins = report.score_calibration(recorder, served)
        summary.update(calibration)
        plot_reliability([(f"detections scoring >= {served} (served by default)", bins)],
                         report_dir / "score_reliability.png", xlabel="detection score",
                         ylabel="precision (matched at IoU 0.5)")
        (report_dir / "score_reliability.json").write_text(json.dumps(
            {"min_score": served, "iou_threshold": 0.5, **bins.table()}))
        report.plot_predictions([s[0] for s in shown], [s[1] for s in shown], [s[2] for s in shown], classes,
                                report_dir / "predictions.png")
        return summary

    def _latency_batch1_model(self, model: nn.Module, images: list[torch.Tensor]) -> float:
        """Milliseconds per image at batch 1 of the inference model (Conv + BatchNorm fused, as exported) from an
        already decoded and letterboxed uint8 tensor: scaling, forward, box decoding and NMS, after one warm-up.
        Not end to end: reading, decoding and letterboxing the file come on top; bench/detection.py times the
        exported package from file bytes to boxes for that figure."""
        device = next(model.parameters()).device
        model = fuse_for_inference(model)
        times = []
        for image in images[:1] + images:
            tic = time.perf_counter()
            x = self.prepare_batch({"images": image[None].to(device), "boxes": torch.zeros(1, 1, 4, device=device),
                                    "labels": torch.full((1, 1), -1, device=device)}, None)["images"]
            self.detect(model, x)
            times.append(time.perf_counter() - tic)
        return 1000 * sum(times[1:]) / len(times[1:])

    # ------------------------------------------------------------------------------------------ export

    def export_module(self, model: nn.Module) -> nn.Module:
        """The raw head (what `forward` returns), Conv + BatchNorm fused; decoding and NMS stay outside."""
        return fuse_for_inference(model)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 3, self.image_size, self.image_size),)

    # ------------------------------------------------------------------------------------------ inference

    predictor_class = DetectionPredictor

    def predictor(self) -> DetectionPredictor:
        m = self.cfg.model
        decoder = ({"name": "yolov1"} if m.name == "yolov1" else
                   {"name": m.name, "reg_max": m.reg_max, "strides": list(AnchorFreeDetector.strides)})
        spec = DetectionPredictor.build_spec(self.class_names(), self.image_size, decoder, m.predict_score_threshold,
                                             m.iou_threshold, m.max_detections)
        return DetectionPredictor(spec)

    def adopt_spec(self, spec: dict) -> None:
        self.classes = list(spec["labels"])

    def graph_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return (batch["images"],)

    def score_outputs(self, outputs, reference, batch) -> dict[str, torch.Tensor]:
        """Both scores at the served operating point (the predictor's default thresholds), in letterbox pixels.

        agreement: 1 where the format's detections are eager's: as many, and each eager detection (by score) pairs
        with one of the format's of the same class at IoU >= 0.9. The whole set, not the top box alone: near-tied
        anchors of one object swap places on float noise, which a top-1 rule would call a disagreement, while
        a set compares what a caller receives. Both empty agrees.
        f1_50: the detections against the ground truth (same class, IoU >= 0.5, one detection per object):
        2 TP / (detections + objects), 1 for an image with neither; int8's drop in it is reported."""
        m = self.cfg.model
        device = outputs[0].device
        decoder = self.decoder(device)
        found = postprocess(decoder(outputs[0]), m.predict_score_threshold, m.iou_threshold, m.max_detections)
        wanted = postprocess(decoder(reference[0].to(device)), m.predict_score_threshold, m.iou_threshold,
                             m.max_detections)
        agreement, f1 = [], []
        for i, (got, want) in enumerate(zip(found, wanted)):
            same = len(got["labels"]) == len(want["labels"]) == count_matches(
                want["boxes"], want["labels"], got["boxes"], got["labels"], 0.9)
            agreement.append(float(same))
            keep = batch["labels"][i] >= 0
            truth_boxes, truth_labels = batch["boxes"][i][keep].to(device), batch["labels"][i][keep].to(device)
            total = len(got["labels"]) + len(truth_labels)
            hits = count_matches(got["boxes"], got["labels"], truth_boxes, truth_labels, 0.5)
            f1.append(2 * hits / total if total else 1.0)
        return {"agreement": torch.tensor(agreement), "f1_50": torch.tensor(f1)}

    @classmethod
    def tiny(cls, folder: Path) -> dict:
        """Seconds-scale training on a few fmnist-scenes (64 pixels) composed from generated Fashion-MNIST files."""
        from ...data.synthetic import write_fashion_mnist

        write_fashion_mnist(folder, n_train=300, n_test=60)
        return {"data": {"source": "fmnist-scenes", "root": str(folder), "image_size": 64,
                         "scenes": {"train": 64, "val": 32, "test": 16, "image_size": 64, "objects": [1, 3],
                                    "object_size": [16, 32]},
                         "augment": {"scale": [0.8, 1.2]}},
                "model": {"name": "anchor-free", "size": "t", "reg_max": 8},
                "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "log_every_steps": 2}}
