"""Detection metrics under DDP: two ranks, each scoring its shard of the validation split, report exactly what one
process scoring the whole split reports (detections are gathered before COCO evaluation)."""

from __future__ import annotations

import pytest

from helpers import evaluate_in_one_and_two_processes
from modelworks.config import load_config
from modelworks.tasks.detection.task import DetectionTask

pytestmark = pytest.mark.ddp


def test_two_ranks_report_the_metrics_of_one_process(tmp_path):
    raw = DetectionTask.tiny(tmp_path / "data")  # written once here, read by every process
    raw["task"] = "detection"
    raw["train"].update({"device": "cpu", "precision": "fp32", "eval_batch_size": 8})
    DetectionTask(load_config(DetectionTask, raw)).read_splits()  # generates the scenes before the processes start
    results = evaluate_in_one_and_two_processes(raw, tmp_path, steps=60)
    assert results["one"]["val/mar100"] > 0.05  # it finds objects, so equality below means something
    for key in ("val/map", "val/map50", "val/map75", "val/mar100"):
        assert results["two"][key] == pytest.approx(results["one"][key], abs=1e-9), key
