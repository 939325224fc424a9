"""Serving-side object detection: image bytes -> letterboxed tensor -> raw head -> boxes in the image's own pixels.

Preprocessing is evaluation's: the image is decoded to RGB and letterboxed by the function the data sets use
(data/detection/dataset.py: one scale factor, top-left placement, grey fill), then divided by 255 as
`DetectionTask.prepare_batch` does. The exported graph is the raw head only; decoding (bin expectations, or
YOLOv1's cell offsets) and class-aware NMS run here, with the same functions evaluation uses
(`models.build_decoder`, `boxes.postprocess`). Boxes go back to the original image by the one division
evaluation uses (the letterbox has no offset), then are clipped to the image: the grey padding holds nothing.

Training and serving decode files with the same function (data/image_files.read_image, Pillow), which checks
the file's declared size against `max_image_pixels` before decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ...data.detection.dataset import FILL, letterbox
from ..base import Predictor
from ..image_requests import (FORMATS, IMAGE_SUFFIXES, ScreensImageHeaders, decode_base64, decode_image_file,
                              default_max_pixels)
from .boxes import postprocess
from .models import build_decoder

MAX_DETECTIONS = 1000  # a request's upper bound: more boxes than this are noise, and slow to draw and send


class DetectionRequest(BaseModel):
    # Strict: `true` is not a top_k of 1 nor "0.5" a threshold. The server turns multipart's text values into
    # JSON values first, so a form's top_k=3 is the number 3.
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(
        None, description=f"The image file ({FORMATS}), base64-encoded; a `data:` URL prefix is accepted. "
                          "Alternatively upload it as the multipart form field `image`. Any size: it is "
                          "letterboxed to the model's input as in evaluation.")
    score_threshold: float | None = Field(
        None, ge=0, le=1, description="Keep detections scoring above this. Default: the model's "
                                      "(`postprocessing` in GET /v1/models/{name}).")
    iou_threshold: float | None = Field(
        None, gt=0, le=1, description="Non-maximum suppression: of two boxes of one class overlapping by more "
                                      "than this IoU, the lower-scoring one is dropped. Default: the model's.")
    max_detections: int | None = Field(
        None, ge=1, le=MAX_DETECTIONS, description="At most this many detections, highest scores first. "
                                                   "Default: the model's.")


class Detection(BaseModel):
    label: str
    index: int = Field(description="The class's position in the model's labels.")
    score: float
    box: tuple[float, float, float, float] = Field(
        description="x1, y1, x2, y2 in pixels of the image as sent (origin top-left; x right, y down).")


class DetectionResponse(BaseModel):
    detections: list[Detection] = Field(description="Highest score first.")
    width: int = Field(description="The image's width in pixels, as decoded.")
    height: int = Field(description="The image's height in pixels.")


@dataclass
class DetectionItem:
    image: np.ndarray  # uint8 [3, S, S], letterboxed (scaled to [0, 1] per batch, in collate)
    scale: float  # letterbox pixels per original pixel
    width: int  # the original image's size
    height: int
    score_threshold: float
    iou_threshold: float
    max_detections: int


class DetectionPredictor(ScreensImageHeaders, Predictor):
    Request = DetectionRequest
    Response = DetectionResponse
    file_field = "image"
    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, spec: dict):
        super().__init__(spec)
        self.labels: list[str] = list(spec["labels"])
        self.image_size = int(spec["preprocessing"]["letterbox"])
        self.decoder = build_decoder(num_classes=len(self.labels), image_size=self.image_size,
                                     **spec["decoder"]).eval()
        self.defaults = spec["postprocessing"]
        self.max_image_pixels = default_max_pixels(self.image_size ** 2)

    @staticmethod
    def build_spec(labels: list[str], image_size: int, decoder: dict, score_threshold: float, iou_threshold: float,
                   max_detections: int) -> dict:
        """The manifest's description of the model's input, labels, decoder and default postprocessing.
        `decoder`: `models.build_decoder`'s arguments besides the class count and image size."""
        return {
            "inputs": [{"name": "images", "shape": ["batch", 3, image_size, image_size], "dtype": "float32"}],
            "outputs": ["raw"],  # the raw head: decoded and suppressed outside the graph
            "labels": list(labels),
            "preprocessing": {
                "decoder": "Pillow (modelworks.data.image_files)", "color": "RGB", "letterbox": image_size,
                "placement": "top-left", "fill": FILL, "resize_method": "bilinear, antialiased", "scale": "1/255",
            },
            "decoder": dict(decoder),
            "postprocessing": {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                               "max_detections": max_detections, "nms": "class-aware (torchvision batched_nms)"},
        }

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self) -> tuple[DetectionRequest, bytes]:
        from PIL import Image

        # Wider than tall, so the letterbox pads: the warm-up takes the path real photos take.
        pixels = np.random.default_rng(0).integers(0, 256, (self.image_size * 3 // 4, self.image_size, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return DetectionRequest(), buffer.getvalue()

    def parse(self, request: DetectionRequest, file: bytes | None = None) -> DetectionItem:
        data = file if file is not None else decode_base64(request.image)
        image = decode_image_file(data, 3, f"send a {FORMATS} image", self.max_image_pixels)
        _, height, width = image.shape
        canvas, scale = letterbox(image, self.image_size)
        return DetectionItem(
            canvas.numpy(), scale, width, height,
            self._option(request.score_threshold, "score_threshold"),
            self._option(request.iou_threshold, "iou_threshold"),
            int(self._option(request.max_detections, "max_detections")))

    def _option(self, value, name: str):
        return self.defaults[name] if value is None else value

    # ------------------------------------------------------------------------------------------ batches

    def collate(self, items: list[DetectionItem]) -> dict[str, np.ndarray]:
        # Once per batch in the server's inference thread, in numpy (as classification's collate, which says
        # why), float32 like DetectionTask.prepare_batch: the values evaluation computes.
        return {"images": np.stack([item.image for item in items]).astype(np.float32) / np.float32(255)}

    def postprocess(self, outputs: Sequence[np.ndarray], items: list[DetectionItem]) -> list[DetectionResponse]:
        raw = torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))
        with torch.inference_mode():
            predictions = self.decoder(raw)
            responses = []
            for row, item in enumerate(items):
                (result,) = postprocess(predictions[row:row + 1], item.score_threshold, item.iou_threshold,
                                        item.max_detections)
                boxes = result["boxes"] / item.scale
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, item.width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, item.height)
                detections = [Detection(label=self.labels[k], index=k, score=s, box=tuple(b))
                              for k, s, b in zip(result["labels"].tolist(), result["scores"].tolist(),
                                                 boxes.tolist())]
                responses.append(DetectionResponse(detections=detections, width=item.width, height=item.height))
        return responses

    def confidence(self, response: DetectionResponse) -> float:
        return response.detections[0].score if response.detections else 0.0

    def render(self, file: bytes, response: DetectionResponse) -> torch.Tensor:
        from .report import PALETTE, draw_labelled_boxes

        image = decode_image_file(file, 3, f"send a {FORMATS} image", self.max_image_pixels)
        if not response.detections:
            return image
        side = max(image.shape[1:])
        boxes = [d.box for d in response.detections]
        names = [f"{d.label} {d.score:.2f}" for d in response.detections]
        colours = [PALETTE[d.index % len(PALETTE)] for d in response.detections]
        return draw_labelled_boxes(image, boxes, names, colours, width=max(1, side // 200),
                                   font_size=max(10, side // 40))
