"""Caption metrics under DDP: each rank decodes its shard of the validation split, the captions are gathered, and
rank 0 scores the whole split (CIDEr-D's document frequencies need every caption at once), so two ranks report
exactly what one process reports."""

from __future__ import annotations

import pytest

from helpers import evaluate_in_one_and_two_processes
from modelworks.config import load_config
from modelworks.tasks.captioning.task import CaptioningTask

pytestmark = pytest.mark.ddp


def test_two_ranks_report_the_caption_scores_of_one_process(tmp_path):
    raw = CaptioningTask.tiny(tmp_path / "data")  # written once here, read by every process
    raw.update(task="captioning", output_dir=str(tmp_path / "runs"))
    raw["train"].update({"device": "cpu", "precision": "fp32"})
    CaptioningTask(load_config(CaptioningTask, raw)).read_splits()  # generates the scenes before the processes start
    results = evaluate_in_one_and_two_processes(raw, tmp_path, steps=40)
    assert results["one"]["val/cider"] > 0.05  # it names things, so equality below means something
    for key in ("val/bleu4", "val/cider", "val/rouge_l"):  # scored once, over the same gathered captions
        assert results["two"][key] == pytest.approx(results["one"][key], abs=1e-9), key
    assert results["two"]["val/loss"] == pytest.approx(results["one"]["val/loss"], rel=1e-6)  # summed in two parts
