"""Calibrated probabilities end to end: `calibrate` fits a temperature on the validation split, evaluation reports
ECE before and after with unchanged accuracy, and export ships the temperature inside the graph, so every runtime
and the predictor serve the calibrated probabilities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import fashion_test_images, png_bytes
from modelworks import config as config_mod
from modelworks.engine import rundir
from modelworks.engine.batches import eval_indices, fetch
from modelworks.engine.loop import (CALIBRATION_FILE, calibrate_run, evaluate_run, load_for_evaluation,
                                    restore_calibration)
from modelworks.export.package import read_package
from modelworks.inference import export_run, open_model
from modelworks.tasks.classification.task import ClassificationTask

CPU = torch.device("cpu")


def load_run(run_dir: Path) -> tuple[ClassificationTask, config_mod.RunConfig]:
    cfg = config_mod.load_config(ClassificationTask, rundir.read_config_dict(run_dir))
    return ClassificationTask(cfg), cfg


@pytest.fixture(scope="module")
def calibrated_run(tiny_run_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    """A copy of the tiny run serving with flip TTA (the exported graph then averages two views), its test report
    before calibration, and after `calibrate_run`."""
    run_dir = Path(shutil.copytree(tiny_run_dir, tmp_path_factory.mktemp("calibrated") / "run"))
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["model"]["tta"] = "flip"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    task, cfg = load_run(run_dir)
    before = evaluate_run(task, cfg, run_dir)
    task, cfg = load_run(run_dir)
    calibrate_run(task, cfg, run_dir)
    task, cfg = load_run(run_dir)
    after = evaluate_run(task, cfg, run_dir)
    return run_dir, before, after


def test_calibrate_run_keeps_the_temperature_beside_the_checkpoint(calibrated_run):
    run_dir, before, after = calibrated_run
    record = json.loads((run_dir / CALIBRATION_FILE).read_text())
    assert record["checkpoint"] == "best.pt" and record["split"] == "val" and record["fitted"]["tta"] == "flip"
    fitted = record["fitted"]
    assert fitted["temperature"] != 1.0
    assert fitted["nll"] <= fitted["nll_uncalibrated"]  # the temperature minimises it; 1 was a candidate
    assert after["val/temperature"] == fitted["temperature"]


def test_evaluation_reports_ece_before_and_after_with_the_same_accuracy(calibrated_run):
    run_dir, before, after = calibrated_run
    assert "test/ece_uncalibrated" not in before  # an uncalibrated run reports its one ECE
    assert after["test/ece_uncalibrated"] == pytest.approx(before["test/ece"], abs=1e-6)
    assert after["test/ece"] != pytest.approx(before["test/ece"], abs=1e-6)
    assert after["test/acc1"] == before["test/acc1"]
    assert (run_dir / "evaluation" / "reliability.png").stat().st_size > 1000
    table = json.loads((run_dir / "evaluation" / "reliability.json").read_text())
    assert table["temperature"] == after["val/temperature"] and sum(table["served"]["count"]) == 256


class ScaledLogits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, scale: float = 2e4):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.model(x) * self.scale


def test_temperature_scaling_leaves_every_prediction_unchanged(tiny_cfg, tmp_path):
    """An untrained model with its tiny logits (std ~2e-4) scaled up (accuracy near chance, errors in every class, confident): the
    calibrated accuracies equal the uncalibrated ones class by class, while the probabilities change."""
    cfg = tiny_cfg(tmp_path, train__channels_last=False)
    task = ClassificationTask(cfg)
    splits = task.datasets(CPU)
    torch.manual_seed(0)
    model = ScaledLogits(task.build_model()).eval()

    def report(calibration):
        task.adopt_calibration(calibration)
        batches = (task.prepare_batch(b, None) for b in fetch(splits.test, eval_indices(len(splits.test), 64, 0, 1),
                                                              CPU, 0, None))
        with torch.no_grad():
            return task.evaluate(model, batches)

    plain, calibrated = report(None), report({"temperature": 50.0, "tta": "none"})
    assert 0.0 < plain["acc1"] < 0.5
    assert {k: v for k, v in calibrated.items() if k.startswith("acc")} == \
        {k: v for k, v in plain.items() if k.startswith("acc")}
    assert calibrated["ece_uncalibrated"] == pytest.approx(plain["ece"], abs=1e-6)
    assert calibrated["ece"] < plain["ece"] - 0.1 and calibrated["loss"] < plain["loss"] - 0.1


def reference_probabilities(run_dir: Path, images: np.ndarray, temperature: float) -> np.ndarray:
    """softmax((model(x) + model(mirrored x)) / 2 / T), written out here rather than taken from the task."""
    task, cfg = load_run(run_dir)
    cfg.train.channels_last = False
    task.datasets(CPU)
    model = load_for_evaluation(task, run_dir, CPU, cfg).float()
    x, _ = task.prepare_batch((torch.from_numpy(images).unsqueeze(1), torch.zeros(len(images), dtype=torch.long)),
                              None)
    with torch.no_grad():
        logits = (model(x) + model(x.flip(-1))) / 2
    return (logits.double() / temperature).softmax(1).numpy()


@pytest.fixture(scope="module")
def calibrated_package(calibrated_run, tmp_path_factory) -> Path:
    run_dir, _, _ = calibrated_run
    out = tmp_path_factory.mktemp("calibrated-package") / "package"
    export_run(run_dir, out, {"name": "tiny", "version": "calibrated"}, log=lambda line: None)
    return out


def test_every_runtime_serves_the_calibrated_probabilities(calibrated_run, calibrated_package):
    run_dir, _, after = calibrated_run
    temperature = after["val/temperature"]
    spec = read_package(calibrated_package).manifest["predictor"]
    assert spec["calibration"]["temperature"] == temperature and spec["test_time_augmentation"] == "flip"
    images, _ = fashion_test_images(Path(yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"]))
    want = reference_probabilities(run_dir, images, temperature)
    uncalibrated = reference_probabilities(run_dir, images, 1.0)
    assert np.abs(want - uncalibrated).max() > 0.05  # the temperature changes what is served
    for runtime in ("eager", "torchscript", "onnx"):
        model = open_model(calibrated_package, runtime)
        inputs = model.predictor.collate([(image[None], 10) for image in images])
        (logits,) = model.runner(inputs)
        got = torch.from_numpy(np.asarray(logits)).double().softmax(1).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=runtime)
        # Served: the predictor's answers over this runtime, from the image files.
        request = model.predictor.Request(top_k=10)
        responses = model.predict([model.predictor.parse(request, png_bytes(image)) for image in images])
        for row, response in enumerate(responses):
            served = np.array([score.probability for score in sorted(response.top_k, key=lambda s: s.index)])
            np.testing.assert_allclose(served, want[row], atol=1e-5, err_msg=runtime)


def test_a_run_without_calibration_exports_its_raw_softmax_with_a_note(tiny_run_dir, tiny_package, tmp_path):
    spec = read_package(tiny_package).manifest["predictor"]
    assert spec["calibration"]["temperature"] is None and "modelworks calibrate" in spec["calibration"]["method"]
    task, _ = load_run(tiny_run_dir)
    values, note = restore_calibration(task, tiny_run_dir)
    assert values == {} and task.temperature == 1.0
    assert note.startswith("no calibration: probabilities are the model's raw softmax (temperature 1)")
    assert f"fit it with `modelworks calibrate {tiny_run_dir}`" in note


def test_a_calibration_fitted_for_other_weights_is_not_used(calibrated_run, tmp_path):
    run_dir = Path(shutil.copytree(calibrated_run[0], tmp_path / "run"))
    best = run_dir / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=False)
    state["step"] += 1  # e.g. a resumed run saved a new best
    torch.save(state, best)
    task, _ = load_run(run_dir)
    values, note = restore_calibration(task, run_dir)
    assert values == {} and task.temperature == 1.0 and "was fitted for other weights" in note
