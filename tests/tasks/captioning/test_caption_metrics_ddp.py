"""Caption metrics under DDP: each rank decodes its shard of the validation split, the captions are gathered, and
rank 0 scores the whole split (CIDEr-D's document frequencies need every caption at once), so two ranks report
exactly what one process reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers import PYTHON, TORCHRUN, cli_env
from modelworks.config import load_config
from modelworks.tasks.captioning.task import CaptioningTask

pytestmark = pytest.mark.ddp
WORKER = Path(__file__).parents[2] / "engine" / "ddp_eval_worker.py"


def test_two_ranks_report_the_caption_scores_of_one_process(tmp_path):
    raw = CaptioningTask.tiny(tmp_path / "data")  # written once here, read by every process
    raw.update(task="captioning", output_dir=str(tmp_path / "runs"))
    raw["train"].update({"device": "cpu", "precision": "fp32"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    CaptioningTask(load_config(CaptioningTask, raw)).read_splits()  # generates the scenes before the processes start
    env = cli_env()
    env["OMP_NUM_THREADS"] = "1"
    runs = {"one": [PYTHON, str(WORKER)], "two": [TORCHRUN, "--standalone", "--nproc-per-node", "2", str(WORKER)]}
    results = {}
    for name, command in runs.items():
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([*command, str(tmp_path / "config.json"), str(out), "40"], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        results[name] = json.loads(out.read_text())
    assert (results["one"]["world"], results["two"]["world"]) == (1, 2)
    assert results["one"]["val/cider"] > 0.05  # it names things, so equality below means something
    for key in ("val/bleu4", "val/cider", "val/rouge_l"):  # scored once, over the same gathered captions
        assert results["two"][key] == pytest.approx(results["one"][key], abs=1e-9), key
    assert results["two"]["val/loss"] == pytest.approx(results["one"]["val/loss"], rel=1e-6)  # summed in two parts
