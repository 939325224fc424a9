"""Serving-side image classification: image bytes -> normalised tensor batch -> top-k labels with probabilities.

Preprocessing repeats training's exactly: the same decoder (data/image_files.read_image, which checks the file's
declared size against `max_image_pixels` before decoding), the same uint8 -> [0, 1] -> (x - mean)
/ std arithmetic in the same order (data/augment.py), and for ImageFolder models the same colour conversion and
antialiased resize (data/images.py). A model trained on fixed-size arrays (Fashion-MNIST, CIFAR-10) refuses an
image of another size or colour mode unless the request asks for `resize`: silently resizing would serve
inputs the model never saw.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InputError
from ..base import Predictor
from ...errors import InputTooLarge
from ..image_requests import (INLINE_PIXELS, IMAGE_SUFFIXES, ScreensImageHeaders, decode_base64, decode_image_file,
                              default_max_pixels, small_file)

COLOR_NAMES = {1: "grayscale", 3: "RGB"}


class ImageRequest(BaseModel):
    # Strict: `true` is not a top_k of 1 nor "0.5" a threshold. The server turns multipart's text values into
    # JSON values first, so a form's top_k=3 is the number 3.
    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(
        None, description="The image file (PNG, JPEG, GIF or WebP), base64-encoded; a `data:` URL prefix is "
                          "accepted. Alternatively upload it as the multipart form field `image`.")
    top_k: int = Field(5, ge=1, description="How many classes to return, most probable first.")
    resize: bool = Field(False, description="Resize and colour-convert the image to the model's input size and "
                                            "channels. Off: an image of another size or colour mode is refused.")


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class ClassificationResponse(BaseModel):
    label: str = Field(description="The most probable class.")
    probability: float = Field(description="Its probability: the softmax of the calibrated logits when the "
                                           "manifest's predictor.calibration has a temperature.")
    top_k: list[ClassScore]


class ImageClassifierPredictor(ScreensImageHeaders, Predictor):
    Request = ImageRequest
    Response = ClassificationResponse
    file_field = "image"
    file_suffixes = IMAGE_SUFFIXES

    def __init__(self, spec: dict):
        super().__init__(spec)
        pre = spec["preprocessing"]
        self.labels: list[str] = list(spec["labels"])
        self.channels, self.height, self.width = int(pre["channels"]), int(pre["height"]), int(pre["width"])
        self.always_resize = bool(pre["resize"])
        self.mean = np.array(pre["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.array(pre["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.max_image_pixels = default_max_pixels(self.height * self.width)

    @staticmethod
    def build_spec(channels: int, height: int, width: int, mean: Sequence[float], std: Sequence[float],
                   labels: list[str], resize: bool, tta: str, temperature: float | None = None) -> dict:
        """The manifest's description of the model's input, labels and preprocessing. `temperature`: the
        calibration the graph applies (None: an uncalibrated model, its raw softmax served)."""
        if temperature is None:
            calibration = {"temperature": None, "method": "none: the model's raw softmax; fit a temperature with "
                                                          "`modelworks calibrate RUN_DIR` and export again"}
        else:
            calibration = {"temperature": temperature, "method": "temperature scaling (Guo et al. 2017) fitted on "
                           "the validation split; inside the graph: its logits are already divided by it"}
        return {
            "inputs": [{"name": "images", "shape": ["batch", channels, height, width], "dtype": "float32"}],
            "outputs": ["logits"],
            "labels": list(labels),
            "preprocessing": {
                "decoder": "Pillow (modelworks.data.image_files)", "channels": channels, "color": COLOR_NAMES[channels],
                "height": height, "width": width, "resize": resize, "resize_method": "bilinear, antialiased",
                "scale": "1/255", "mean": list(mean), "std": list(std),
            },
            "test_time_augmentation": tta,  # inside the graph: every runtime serves the evaluated model
            "calibration": calibration,
        }

    @property
    def expected(self) -> str:
        return f"{self.height}x{self.width} {COLOR_NAMES[self.channels]} ({self.channels} channel" \
               f"{'s' if self.channels > 1 else ''})"

    # ------------------------------------------------------------------------------------------ requests

    def example_request(self) -> tuple[ImageRequest, bytes]:
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (self.height, self.width, self.channels), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if self.channels == 1 else pixels).save(buffer, format="PNG")
        return ImageRequest(top_k=min(5, len(self.labels))), buffer.getvalue()

    def parse(self, request: ImageRequest, file: bytes | None = None) -> tuple[np.ndarray, int]:
        """(uint8 image of the model's size, top_k); the arithmetic is left to `collate`, once per batch."""
        if request.top_k > len(self.labels):
            raise InputError(f"top_k: at most {len(self.labels)}, the number of classes (got {request.top_k})",
                             "top_k")
        data = file if file is not None else decode_base64(request.image)
        return self._decode_image(data, request.resize, self.max_image_pixels).numpy(), request.top_k

    def parse_inline(self, request: ImageRequest, file: bytes | None = None) -> tuple[np.ndarray, int] | None:
        data = small_file(request.image, file)  # a Fashion-MNIST PNG is under 1 KB: decoded where it arrives
        if data is None or request.top_k > len(self.labels):
            return None
        try:
            return self._decode_image(data, request.resize, min(INLINE_PIXELS, self.max_image_pixels)).numpy(), \
                request.top_k
        except InputTooLarge:  # a small file declaring many pixels: the pool decodes it, against the real limit
            return None

    def _decode_image(self, data: bytes, resize: bool, max_pixels: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        convert = resize or self.always_resize
        image = decode_image_file(data, self.channels if convert else None, f"send an image file of {self.expected}",
                                  max_pixels)
        channels, height, width = image.shape
        if convert and (height, width) != (self.height, self.width):
            image = TF.resize(image, [self.height, self.width], antialias=True)
        elif (channels, height, width) != (self.channels, self.height, self.width):
            got = f"{height}x{width} with {channels} channel{'s' if channels > 1 else ''}"
            raise InputError(f"image: the model takes {self.expected} images, as it was trained (got {got}); "
                             "send an image of that size and colour mode, or set resize=true to have it resized "
                             "and converted", "image")
        # Every item leaves parse in the graph's input shape, so a batch is valid by construction: one request's
        # odd file can never fail the other requests batched with it.
        if tuple(image.shape) != (self.channels, self.height, self.width) or image.dtype != torch.uint8:
            raise InputError(f"image: decoded to {tuple(image.shape)} {image.dtype}, not the model's "
                             f"{(self.channels, self.height, self.width)} uint8; {self.expected} expected", "image")
        return image

    # ------------------------------------------------------------------------------------------ batches

    def collate(self, items: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
        # Once per batch, in the server's inference thread, and in numpy: PyTorch releases the GIL in every
        # operation and must win it back from the event loop after each, numpy keeps it for these short steps.
        # float32 and elementwise, in data/augment.py:augment_batch's order: the values training computes.
        x = np.stack([image for image, _ in items]).astype(np.float32) / np.float32(255)
        return {"images": (x - self.mean) / self.std}

    def postprocess(self, outputs: Sequence[np.ndarray], items: list[tuple[np.ndarray, int]]
                    ) -> list[ClassificationResponse]:
        logits = np.asarray(outputs[0], dtype=np.float32)  # softmax and top-k in numpy too, as in collate
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        k_max = max(k for _, k in items)
        top_i = np.argsort(-probabilities, axis=1, kind="stable")[:, :k_max]
        top_p = np.take_along_axis(probabilities, top_i, axis=1)
        responses = []
        for row, (_, k) in enumerate(items):
            scores = [ClassScore(label=self.labels[i], index=i, probability=p)
                      for p, i in zip(top_p[row, :k].tolist(), top_i[row, :k].tolist())]
            responses.append(ClassificationResponse(label=scores[0].label, probability=scores[0].probability,
                                                    top_k=scores))
        return responses

    def confidence(self, response: ClassificationResponse) -> float:
        return response.probability
