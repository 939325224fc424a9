"""Detection metrics under DDP: two ranks, each scoring its shard of the validation split, report exactly what one
process scoring the whole split reports (detections are gathered before COCO evaluation)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, TORCHRUN, cli_env
from modelworks.config import load_config
from modelworks.tasks.detection.task import DetectionTask

pytestmark = pytest.mark.ddp
WORKER = Path(__file__).parents[2] / "engine" / "ddp_eval_worker.py"


def test_two_ranks_report_the_metrics_of_one_process(tmp_path):
    raw = DetectionTask.tiny(tmp_path / "data")  # written once here, read by every process
    raw["task"] = "detection"
    raw["train"].update({"device": "cpu", "precision": "fp32", "eval_batch_size": 8})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    DetectionTask(load_config(DetectionTask, raw)).read_splits()  # generates the scenes before the processes start
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    runs = {"one": [PYTHON, str(WORKER)], "two": [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(WORKER)]}
    results = {}
    for name, command in runs.items():
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([*command, str(tmp_path / "config.json"), str(out), "60"], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[name] = json.loads(out.read_text())
    assert (results["one"]["world"], results["two"]["world"]) == (1, 2)
    assert results["one"]["val/mar100"] > 0.05  # it finds objects, so equality below means something
    for key in ("val/map", "val/map50", "val/map75", "val/mar100"):
        assert results["two"][key] == pytest.approx(results["one"][key], abs=1e-9), key
