"""The detection predictor: boxes back in the original image's pixels, preprocessing identical to training's,
bad inputs refused by name, `modelworks predict --save-images`, the HTTP API, and yolov1 packages."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import png_bytes, tiny_detection_raw
from modelworks.config import load_config
from modelworks.data.detection.writers import write_coco
from modelworks.engine.batches import eval_indices, fetch
from modelworks.errors import InputError
from modelworks.inference import open_model
from modelworks.tasks.detection.predictor import DetectionPredictor
from modelworks.tasks.detection.task import DetectionTask

CPU = torch.device("cpu")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------- box mapping


def test_boxes_map_back_to_the_original_image_exactly():
    """A 256x128 image letterboxes into 64 pixels at scale 1/4, top-left, grey below row 32. A YOLOv1 head
    output built by hand puts two boxes at known letterbox positions; the answer holds them x4 in the original
    image, the second clipped at the image's bottom edge (its lower part lies in the padding)."""
    predictor = DetectionPredictor(DetectionPredictor.build_spec(["a", "b"], 64, {"name": "yolov1"}, 0.25, 0.6, 10))
    raw = torch.full((1, 2, 2, 1, 7), -10.0)  # B, S, S, boxes, 5 + C; confidence -10: nothing found
    # a: centre (20, 12), size 16x8 in the 64-pixel letterbox -> xyxy (12, 8, 28, 16); cell (x 0, y 0) of 32 px
    raw[0, 0, 0, 0] = torch.tensor([logit(20 / 32), logit(12 / 32), 0.0, logit(math.sqrt(8 / 64)), 10, 5, -5])
    # b: centre (48, 24), size 16x24 -> xyxy (40, 12, 56, 36): y2 = 36 is below the image's 32 rows
    raw[0, 0, 1, 0] = torch.tensor([0.0, logit(24 / 32), 0.0, logit(math.sqrt(24 / 64)), 8, -5, 5])
    seen = {}

    def run(inputs):  # the graph's place: record what it was given, answer with the head output above
        seen.update(inputs)
        return [raw.numpy()]

    image = np.zeros((128, 256, 3), np.uint8)
    image[...] = (200, 10, 50)
    (response,) = predictor.predict([predictor.parse(predictor.Request(), png_bytes(image))], run)

    x = torch.from_numpy(seen["images"])
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x[0, :, :32], torch.tensor([200, 10, 50]).view(3, 1, 1).expand(3, 32, 64) / 255)
    assert (x[0, :, 32:] == 114 / 255).all()  # evaluation's letterbox fill
    assert (response.width, response.height) == (256, 128)
    assert [(d.label, d.index) for d in response.detections] == [("a", 0), ("b", 1)]
    letterboxed = predictor.decoder(raw)[0, :2, :4]  # the decoder's own boxes: x4 must be exact (power of two)
    assert list(response.detections[0].box) == (letterboxed[0] * 4).tolist()
    assert response.detections[0].box == pytest.approx((48, 32, 112, 64), abs=1e-3)
    assert response.detections[1].box == pytest.approx((160, 48, 224, 128), abs=1e-3)  # 144 clipped to 128
    assert predictor.confidence(response) == response.detections[0].score > response.detections[1].score > 0.99


def test_serving_preprocessing_matches_evaluation(tmp_path):
    """The predictor's tensor for a non-square file is the one evaluation prepares from the same file (data set
    letterbox, prepare_batch), and its boxes leave the letterbox by evaluation's factor."""
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (60, 96, 3), np.uint8), np.array([[10, 5, 50, 40]], np.float32), np.array([0]))]
    write_coco(tmp_path / "instances_train.json", tmp_path / "train", samples * 4, ["thing"])
    raw = {"task": "detection", "data": {"source": f"coco:{tmp_path}/instances_train.json:{tmp_path}/train",
                                         "image_size": 64, "val_fraction": 0.5},
           "model": {"name": "anchor-free", "size": "t", "reg_max": 8},
           "train": {"device": "cpu", "channels_last": False}}
    task = DetectionTask(load_config(DetectionTask, raw))
    splits = task.datasets(CPU)
    (batch,) = fetch(splits.val, eval_indices(len(splits.val), 8, 0, 1), CPU, 0, splits.collate_fn)
    evaluated = task.prepare_batch(batch, None)["images"]
    predictor = task.predictor()
    item = predictor.parse(predictor.Request(), (tmp_path / "train" / "000000.png").read_bytes())
    assert np.array_equal(predictor.collate([item])["images"], evaluated[:1].numpy())
    assert item.scale == pytest.approx(float(batch["scales"][0])) and (item.width, item.height) == (96, 60)


def test_export_agreement_compares_the_served_detections():
    """score_outputs at the served threshold (0.25): a box nudged within IoU 0.9 agrees; a lost box, a changed
    class or a box moved further does not. f1_50 scores the detections against the batch's boxes."""
    raw = {"task": "detection", "data": {"image_size": 64},
           "model": {"name": "yolov1", "grid": 2, "widths": [8, 8, 16, 16, 32], "head_width": 32},
           "train": {"device": "cpu"}}
    task = DetectionTask(load_config(DetectionTask, raw))
    head = torch.full((1, 2, 2, 1, 15), -10.0)  # 10 classes (fmnist-scenes)
    head[0, 0, 0, 0, :5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0])  # a 16x16 box centred at (16, 16)
    head[0, 0, 0, 0, 5] = 5.0  # class 0
    head[0, 1, 1, 0, :6] = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, -5.0])  # another at (48, 48), class 1
    head[0, 1, 1, 0, 6] = 5.0
    batch = {"boxes": torch.tensor([[[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 0.0, 0.0]]]),
             "labels": torch.tensor([[0, -1]])}

    def scores(edit) -> tuple[float, float]:
        other = head.clone()
        edit(other)
        out = task.score_outputs((other,), (head,), batch)
        return out["agreement"].item(), out["f1_50"].item()

    assert scores(lambda h: None) == (1.0, pytest.approx(2 / 3))  # one object found, one extra detection
    assert scores(lambda h: h[0, 0, 0, 0, 0].add_(0.05))[0] == 1.0  # 0.4 px to the right: IoU 0.95
    assert scores(lambda h: h[0, 1, 1, 0, 4].fill_(-10.0)) == (0.0, 1.0)  # the extra box lost
    assert scores(lambda h: h[0, 0, 0, 0, 5:7].copy_(torch.tensor([-5.0, 5.0]))) == (0.0, 0.0)  # class 0 -> 1
    assert scores(lambda h: h[0, 0, 0, 0, 0].add_(1.0))[0] == 0.0  # 7.4 px: IoU 0.37


# ---------------------------------------------------------------------------------------------- bad inputs


def gif_frames(n: int) -> bytes:
    import io

    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(n)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


@pytest.mark.parametrize("request_fields, file, message", [
    ({}, b"", r"image: empty file; send a PNG, JPEG, GIF or WebP image"),
    ({}, b"\x89PNG\r\n\x1a\n truncated", r"image: cannot be decoded as PNG, JPEG, GIF or WebP \(.*\); send a PNG"),
    ({}, gif_frames(3), r"image: an animated GIF \(more than one frame\); send one still image"),
    ({}, None, r"image: missing; send the image base64-encoded"),
    ({"image": "%%%"}, None, r"image: not valid base64"),
])
def test_bad_files_are_refused_by_name(request_fields, file, message):
    predictor = DetectionPredictor(DetectionPredictor.build_spec(["a"], 64, {"name": "yolov1"}, 0.25, 0.6, 10))
    with pytest.raises(InputError, match=message) as caught:
        predictor.parse(predictor.Request(**request_fields), file)
    assert caught.value.field == "image"


def test_request_fields_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="score_threshold\n  Input should be less than or equal to 1"):
        DetectionPredictor.Request(score_threshold=1.5)
    with pytest.raises(ValidationError, match="max_detections\n  Input should be greater than or equal to 1"):
        DetectionPredictor.Request(max_detections=0)
    with pytest.raises(ValidationError, match="top_k\n  Extra inputs are not permitted"):
        DetectionPredictor.Request.model_validate({"top_k": 3})


def test_a_grayscale_image_is_served_as_rgb():
    predictor = DetectionPredictor(DetectionPredictor.build_spec(["a"], 64, {"name": "yolov1"}, 0.25, 0.6, 10))
    item = predictor.parse(predictor.Request(), png_bytes(np.full((32, 16), 90, np.uint8)))
    assert item.image.shape == (3, 64, 64) and (item.width, item.height) == (16, 32)
    image = predictor.collate([item])["images"][0]
    assert (image[:, :, :32] == 90 / 255).all() and (image[:, :, 32:] == 114 / 255).all()


# ---------------------------------------------------------------------------------------------- packages


def test_package_answers_as_evaluation_detects(tiny_detection_package):
    """The predictor gives evaluation's detections (task.detect on the same letterboxed image) divided by the
    letterbox factor and clipped to the image; the manifest holds the spec and every format passed."""
    from modelworks.data.detection.dataset import letterbox

    manifest = json.loads((tiny_detection_package / "manifest.json").read_text())
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    assert {"agreement", "f1_50", "max_abs_diff"} <= set(manifest["metrics"]["export"]["onnx"])
    assert manifest["predictor"]["decoder"] == {"name": "anchor-free", "reg_max": 8, "strides": [8, 16, 32]}
    model = open_model(tiny_detection_package, "eager")  # the graph evaluation runs, so the two paths compute alike
    image = np.random.default_rng(1).integers(0, 256, (40, 100, 3), np.uint8)  # letterboxed at 64/100
    request = model.predictor.Request(score_threshold=0.0, max_detections=5)
    (response,) = model.predict([model.predictor.parse(request, png_bytes(image))])

    task = DetectionTask(load_config(DetectionTask, manifest["config"]))
    task.adopt_spec(manifest["predictor"])
    task.cfg.model.score_threshold, task.cfg.model.max_detections = 0.0, 5
    canvas, scale = letterbox(torch.from_numpy(image).permute(2, 0, 1).contiguous(), 64)
    x = task.prepare_batch({"images": canvas[None], "boxes": torch.zeros(1, 1, 4),
                            "labels": torch.full((1, 1), -1)}, None)["images"]
    with torch.no_grad():
        (expected,) = task.detect(model.runner.runners["model"].module, x)  # the eager graph of the package
    assert len(response.detections) == 5
    assert [d.index for d in response.detections] == expected["labels"].tolist()
    boxes = expected["boxes"] / scale
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, 100), boxes[:, 1::2].clamp(0, 40)
    np.testing.assert_allclose([d.box for d in response.detections], boxes.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose([d.score for d in response.detections], expected["scores"].numpy(), rtol=1e-6)


def test_predict_cli_saves_annotated_images(tiny_detection_package, tmp_path, capsys):
    from modelworks.cli import main

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    rng = np.random.default_rng(2)
    for path, (h, w) in ((photos / "wide.png", (48, 80)), (photos / "more" / "wide.png", (70, 50))):
        path.write_bytes(png_bytes(rng.integers(0, 256, (h, w, 3), np.uint8)))
    out, annotated = tmp_path / "boxes.jsonl", tmp_path / "annotated"
    code = main(["predict", str(tiny_detection_package), str(photos), "--out", str(out),
                 "--save-images", str(annotated), "--option", "score_threshold=0.0", "--option", "max_detections=3"])
    assert code == 0
    assert "2 predicted, 0 skipped (onnx) -> " in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).relative_to(photos).as_posix() for r in rows] == ["more/wide.png", "wide.png"]
    for row, name in zip(rows, ["wide.png", "wide-2.png"]):  # the second file of the same name gets -2
        prediction = row["prediction"]
        assert len(prediction["detections"]) == 3
        for detection in prediction["detections"]:
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 <= x2 <= prediction["width"] and 0 <= y1 <= y2 <= prediction["height"]
        drawn, original = np.asarray(Image.open(annotated / name)), np.asarray(Image.open(row["path"]))
        assert drawn.shape == original.shape and not np.array_equal(drawn, original)


def test_http_api_returns_detections(tiny_detection_package):
    from modelworks.serve.app import ServeSettings, create_app

    image = png_bytes(np.random.default_rng(3).integers(0, 256, (50, 90, 3), np.uint8))
    app = create_app([open_model(tiny_detection_package, "onnx")], settings=ServeSettings(admin_token="", max_batch_size=4))
    with TestClient(app) as client:
        model = client.get("/v1/models/boxes").json()
        assert "score_threshold" in model["request_fields"] and "top_k" not in model["request_fields"]
        assert model["postprocessing"]["score_threshold"] == 0.25
        response = client.post("/v1/models/boxes/predict", json={"image": base64.b64encode(image).decode(),
                                                                 "score_threshold": 0.0, "max_detections": 4})
        assert response.status_code == 200, response.text
        prediction = response.json()["prediction"]
        assert (prediction["width"], prediction["height"]) == (90, 50) and len(prediction["detections"]) == 4
        scores = [d["score"] for d in prediction["detections"]]
        assert scores == sorted(scores, reverse=True)
        upload = client.post("/v1/models/boxes/predict", files={"image": ("x.png", image, "image/png")},
                             data={"max_detections": "2", "score_threshold": "0"})
        assert upload.status_code == 200 and len(upload.json()["prediction"]["detections"]) == 2
        bad = client.post("/v1/models/boxes/predict", json={"image": base64.b64encode(b"nope").decode()})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "image"
        wrong = client.post("/v1/models/boxes/predict", files={"image": ("x.png", image, "image/png")},
                            data={"top_k": "5"})
        assert wrong.status_code == 422 and "top_k: unknown field" in wrong.json()["error"]["message"]
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"DetectionRequest", "DetectionResponse", "Detection"} <= set(schemas)
        metrics = client.get("/metrics").text
        assert 'modelworks_prediction_confidence_count{model="boxes",version="v1"} 2.0' in metrics


def test_yolov1_exports_and_predicts(tmp_path):
    from modelworks.export.build import ExportOptions, build_package
    from modelworks.export.runtime import OnnxRunner

    raw = tiny_detection_raw(tmp_path, name="yolov1", grid=2, widths=[8, 8, 16, 16, 32], head_width=32)
    task = DetectionTask(load_config(DetectionTask, raw))
    splits = task.datasets(CPU)
    torch.manual_seed(0)
    model = task.build_model().eval()
    val = (task.prepare_batch(b, None)
           for b in fetch(splits.val, eval_indices(len(splits.val), 32, 0, 1), CPU, 0, splits.collate_fn))
    manifest = build_package(task, model, val, iter(()), tmp_path / "package", ExportOptions("yolo", "1"),
                             source={}, metrics={}, config={}, log=lambda line: None)
    assert manifest["checks"]["passed"] == ["eager", "torchscript", "onnx"]
    predictor = DetectionPredictor(manifest["predictor"])
    assert manifest["predictor"]["decoder"] == {"name": "yolov1"}
    request, file = predictor.example_request()
    (response,) = predictor.predict([predictor.parse(request.model_copy(update={"score_threshold": 0.0}), file)],
                                    OnnxRunner(tmp_path / "package" / "model.onnx"))
    assert 0 < len(response.detections) <= 100 and (response.width, response.height) == (64, 48)
