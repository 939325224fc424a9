"""A served image generator (the diffusion task's package over ONNX Runtime): generation requests answered as
PNGs in JSON or as one image/png, every bad input answered 4xx naming its field while the server keeps serving,
/v1/models reporting that it generates images; `modelworks predict` on JSON lines and `modelworks sample`."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from modelworks import config as config_mod
from modelworks.cli import main
from modelworks.engine.batches import eval_indices, fetch
from modelworks.export.build import ExportOptions, build_package
from modelworks.inference import open_model
from modelworks.serve.app import ServeSettings, create_app
from modelworks.tasks.diffusion.task import DiffusionTask

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generator")
    raw = DiffusionTask.tiny(folder / "data")
    raw.update(task="diffusion", output_dir=str(folder / "runs"))
    raw["train"].update(device="cpu", precision="fp32")
    task = DiffusionTask(config_mod.load_config(DiffusionTask, raw))
    splits = task.datasets(CPU)
    torch.manual_seed(0)
    model = task.build_model().eval()
    for p in model.parameters():  # an untrained model's zero-initialised output would give flat images
        p.data.add_(0.05 * torch.randn_like(p))
    val = (task.prepare_batch(b, None) for b in fetch(splits.val, eval_indices(len(splits.val), 64, 0, 1), CPU, 0,
                                                      splits.collate_fn))
    build_package(task, model, val, iter(()), folder / "package", ExportOptions("gen", "1"), source={}, metrics={},
                  config=raw, log=lambda line: None)
    return folder / "package"


@pytest.fixture(scope="module")
def client(package):
    app = create_app([open_model(package, "onnx")], settings=ServeSettings(admin_token=""))
    with TestClient(app) as c:
        yield c


def decode(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image)))


def test_a_generation_request_answers_pngs_seeded(client):
    body = {"class": "Bag", "n": 3, "steps": 3, "guidance": 1.5, "seed": 7}
    answer = client.post("/v1/models/gen/predict", json=body)
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["prediction"]
    assert prediction["label"] == "Bag" and len(prediction["images"]) == 3
    images = [decode(i) for i in prediction["images"]]
    assert all(i.format == "PNG" and i.size == (28, 28) and i.mode == "L" for i in images)  # padding cut off
    again = client.post("/v1/models/gen/predict", json=body).json()["prediction"]
    assert again["images"] == prediction["images"]
    other = client.post("/v1/models/gen/predict", json={**body, "seed": 8}).json()["prediction"]
    assert other["images"] != prediction["images"]


def test_one_image_as_image_png_when_accepted(client):
    answer = client.post("/v1/models/gen/predict", json={"class": "Sneaker", "steps": 2},
                         headers={"Accept": "image/png"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (28, 28)
    several = client.post("/v1/models/gen/predict", json={"n": 2, "steps": 2}, headers={"Accept": "image/png"})
    assert several.headers["content-type"].startswith("application/json")  # two images: JSON


def test_models_report_a_generator(client):
    described = client.get("/v1/models/gen").json()
    assert described["generates"] == "images" and described["file_field"] is None
    assert "Bag" in described["labels"] and "seed" in described["request_fields"]


@pytest.mark.parametrize("body, field", [
    ({"class": "Bagg"}, "class"),
    ({"class": 3}, "class"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": "2"}, "n"),
    ({"steps": 0}, "steps"),
    ({"steps": 1000}, "steps"),
    ({"guidance": -0.5}, "guidance"),
    ({"guidance": "high"}, "guidance"),
    ({"sampler": "euler"}, "sampler"),
    ({"seed": -1}, "seed"),
    ({"colour": "red"}, "colour"),
])
def test_each_bad_input_is_a_4xx_naming_its_field(client, body, field):
    answer = client.post("/v1/models/gen/predict", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == field and field in error["message"]
    assert client.post("/v1/models/gen/predict", json={"steps": 1}).status_code == 200  # still serving


def test_unknown_class_suggests_the_closest(client):
    message = client.post("/v1/models/gen/predict", json={"class": "Sneakr"}).json()["error"]["message"]
    assert "'Sneaker'" in message


def test_predict_generates_offline_from_json_lines(package, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"class": "Bag", "n": 2, "steps": 2, "seed": 1}\n{"class": "Nope"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["predict", str(package), str(requests), "--out", str(out)]) == 1  # one line skipped
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows[0]["prediction"]["images"]) == 2 and "class" in rows[1]["error"]


def test_sample_writes_a_grid(package, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(package), "--n", "4", "--class", "Bag", "--steps", "2", "--seed", "0",
                 "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)  # 2 x 2 images with 2-pixel gaps
    assert main(["sample", str(package), "--class", "Nope", "--out", str(out)]) == 2
