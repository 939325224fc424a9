"""COCO metrics on hand-built cases whose values are known, and export parity of both detectors' raw heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelworks.export.formats import write_onnx, write_torchscript
from modelworks.export.runtime import load_torchscript
from modelworks.tasks.detection.models import AnchorFreeDecoder, AnchorFreeDetector, YOLOv1, YOLOv1Decoder
from modelworks.tasks.detection.report import DetectionRecorder, coco_metrics

CLASSES = ["a", "b"]
GT = {1: (np.array([[10, 10, 50, 50], [60, 60, 90, 100]], np.float32), np.array([0, 1])),
      2: (np.array([[0, 0, 40, 30], [50, 20, 100, 80]], np.float32), np.array([0, 0]))}


def recorder(detections: dict) -> DetectionRecorder:
    r = DetectionRecorder()
    for image_id, (boxes, labels) in GT.items():
        r.ground_truth.append((image_id, boxes, labels))
        found = detections.get(image_id, (np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)))
        r.detections.append((image_id, *found))
    return r


def test_perfect_detections_score_one():
    detections = {i: (boxes, np.full(len(labels), 0.9), labels) for i, (boxes, labels) in GT.items()}
    summary, per_class, _ = coco_metrics(recorder(detections), CLASSES)
    assert summary["map"] == pytest.approx(1.0) and summary["map50"] == pytest.approx(1.0)
    assert summary["mar100"] == pytest.approx(1.0)
    assert per_class == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    # Every object is medium-sized (between 32^2 and 96^2 pixels): no small or large score exists, so none is
    # reported (COCO's -1), rather than a 0 that reads as a failure.
    assert summary["map_medium"] == pytest.approx(1.0) and summary["mar_medium"] == pytest.approx(1.0)
    assert not {"map_small", "map_large", "mar_small", "mar_large"} & set(summary)


def test_half_the_objects_found_gives_the_101_point_interpolated_value():
    # Class a: 3 objects, detections for 1 ... no: use class b's single object missed and class a all found
    # except one. Class a: 2 of 3 found with precision 1 -> recall points 0..0.66 at precision 1: 67/101.
    detections = {1: (GT[1][0][:1], np.array([0.9]), np.array([0])),
                  2: (GT[2][0][:1], np.array([0.8]), np.array([0]))}
    summary, per_class, _ = coco_metrics(recorder(detections), CLASSES)
    assert per_class["a"] == pytest.approx(67 / 101)
    assert per_class["b"] == 0.0
    assert summary["map"] == pytest.approx(67 / 101 / 2)


def test_a_loose_box_counts_only_at_low_iou_thresholds():
    # One object per class found exactly, except class b's, found with IoU 0.62: matched at .50/.55/.60 only.
    loose = np.array([[60, 60, 90, 100 + 24.5]], np.float32)  # same x-range, taller: IoU = 40 / 64.5 = 0.62
    detections = {1: (np.concatenate([GT[1][0][:1], loose]), np.array([0.9, 0.9]), np.array([0, 1])),
                  2: (GT[2][0], np.array([0.9, 0.9]), np.array([0, 0]))}
    summary, per_class, _ = coco_metrics(recorder(detections), CLASSES)
    assert per_class["a"] == pytest.approx(1.0)
    assert per_class["b"] == pytest.approx(0.3)
    assert summary["map50"] == pytest.approx(1.0) and summary["map75"] == pytest.approx(0.5)


def test_no_detections_score_zero():
    summary, per_class, _ = coco_metrics(recorder({}), CLASSES)
    assert summary["map"] == 0.0 and per_class["a"] == 0.0
    assert summary["map_medium"] == 0.0 and "map_large" not in summary and "map_small" not in summary


@pytest.mark.parametrize("name", ["anchor-free", "yolov1"])
def test_raw_head_exports_match_eager(name, tmp_path):
    torch.manual_seed(0)
    if name == "yolov1":
        model = YOLOv1(3, grid=4, widths=(8, 8, 16, 16, 32), head_width=32).eval()
    else:
        model = AnchorFreeDetector(3, "t", reg_max=8, image_size=64).eval()
    x = torch.randn(2, 3, 128, 128)  # yolov1: a 4x4 stride-32 feature map pooled to its 4x4 grid
    with torch.no_grad():
        eager = model(x)
    # Through the product's writers (TorchScript traced, ONNX by torch.export with a dynamic batch axis).
    write_torchscript(model, (x[:1],), tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_torchscript(tmp_path / "model.pt")(x), eager, atol=1e-5, rtol=1e-4)
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    write_onnx(model, (x[:1],), path, ["images"], ["raw"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(onnx_out, eager.numpy(), atol=1e-4, rtol=1e-3)


def test_decoders_give_valid_boxes_inside_the_image():
    torch.manual_seed(0)
    yolo = YOLOv1Decoder(64)(torch.randn(2, 4, 4, 2, 5 + 3) * 3)
    assert yolo.shape == (2, 32, 7)
    assert (yolo[..., 2:4] >= yolo[..., :2]).all() and yolo[..., 4:].sum(-1).le(1 + 1e-5).all()
    decoder = AnchorFreeDecoder(3, 8, 64, (8, 16, 32))
    boxes = decoder(torch.randn(2, 84, 4 * 8 + 3))
    assert boxes.shape == (2, 84, 7) and (boxes[..., 2:4] >= boxes[..., :2]).all()


def test_prediction_pictures_label_detections_and_ground_truth_on_filled_bands(tmp_path):
    """A detection's name sits on a band of its class colour above the box, the ground truth's on a white band
    under its box; so on a matched box neither hides the other, and both read on any background."""
    from PIL import Image, ImageColor

    from modelworks.tasks.detection.report import PALETTE, plot_predictions

    image = torch.zeros(3, 100, 100, dtype=torch.uint8)  # black: a filled band shows as its colour
    truth = (torch.tensor([[20.0, 30.0, 60.0, 60.0]]), torch.tensor([1]))
    result = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 60.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}
    plot_predictions([image], [truth], [result], CLASSES, tmp_path / "grid.png", min_side=100)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    picture = grid[4:104, 4:104]  # make_grid's 4-pixel padding
    colour = np.array(ImageColor.getrgb(PALETTE[1]))
    above, below = picture[20:29, 21:40], picture[62:70, 21:27]  # inside each band ("b 0.90" above, "b" below)
    assert (np.abs(above - colour).sum(-1) < 30).mean() > 0.4  # mostly the class colour (the rest is text)
    assert (below.min(-1) > 225).mean() > 0.4  # mostly white
    assert (np.abs(below - colour).sum(-1) < 30).mean() == 0


def test_score_calibration_of_a_hand_made_example():
    from modelworks.tasks.detection.report import score_calibration

    far = np.array([[200, 200, 220, 220]], np.float32)
    detections = {
        # Image 1: class a found (0.9), class b's object found but called a (0.92): bin 13, precision 1/2.
        1: (np.stack([GT[1][0][0], GT[1][0][1]]), np.array([0.9, 0.92]), np.array([0, 0])),
        # Image 2: a box on nothing (0.32), the first object (0.30), a duplicate of it (0.28, its object already
        # taken), all in bin 4: precision 1/3; the second object found below the served threshold (0.10): ignored.
        2: (np.concatenate([far, GT[2][0][:1], GT[2][0][:1], GT[2][0][1:]]), np.array([0.32, 0.30, 0.28, 0.10]),
            np.array([0, 0, 0, 0])),
    }
    summary, bins = score_calibration(recorder(detections), min_score=0.25)
    # 2/5 x |1/2 - 0.91| + 3/5 x |1/3 - 0.30| = 0.164 + 0.02
    assert summary["score_ece"] == pytest.approx(0.184, abs=1e-6)
    assert summary["score_precision"] == pytest.approx(2 / 5) and summary["score_mean"] == pytest.approx(0.544)
    assert summary["score_detections"] == 5
    table = bins.table()
    assert table["count"][4] == 3 and table["count"][13] == 2 and sum(table["count"]) == 5
    assert table["accuracy"][4] == pytest.approx(1 / 3) and table["confidence"][13] == pytest.approx(0.91)
