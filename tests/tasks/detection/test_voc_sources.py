"""A VOC folder as labelling tools leave it (annotations/ + images/, no split files) through the detection task:
class names found in the annotations, seeded held-out splits, both logged, and a tiny training run from the
command line with `--data voc:PATH` and nothing else about the data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from modelworks import cli
from modelworks import config as config_mod
from modelworks.errors import DataError
from modelworks.tasks.detection.task import DetectionTask

from helpers import detection_samples as samples
from helpers import tiny_detection_raw, write_labelling_tool_voc

CLASSES = ["cat", "dog", "bird"]


def voc_task(tmp_path: Path, root: Path, **data) -> DetectionTask:
    raw = tiny_detection_raw(tmp_path)
    raw["data"] = {"source": f"voc:{root}", "image_size": 64, **data}
    return DetectionTask(config_mod.load_config(DetectionTask, raw))


def test_voc_without_split_files_holds_out_seeded_splits_and_says_so(tmp_path):
    root = write_labelling_tool_voc(tmp_path, samples(20), CLASSES, "lower")
    task = voc_task(tmp_path, root, val_fraction=0.2, test_fraction=0.1)
    splits = task.read_splits()
    assert {name: len(s) for name, s in splits.items()} == {"train": 14, "test": 2, "val": 4}
    assert task.classes == sorted(CLASSES)  # from the annotations, sorted
    again = voc_task(tmp_path, root, val_fraction=0.2, test_fraction=0.1).read_splits()
    assert [r.image for r in again["val"].records] == [r.image for r in splits["val"].records]  # seeded
    notes = "\n".join(task.notes)
    assert "3 classes from the annotations (data.classes not set), sorted: bird, cat, dog" in notes
    assert "VOC layout annotations/ + images/, no ImageSets/Main split files" in notes
    assert "val 4 images (0.2 of train, data.val_fraction)" in notes and "data.split_seed=0" in notes


def test_recipe_classes_that_do_not_match_the_data_keep_the_clear_error(tmp_path):
    root = write_labelling_tool_voc(tmp_path, samples(4), CLASSES, "beside")
    task = voc_task(tmp_path, root, classes=["RBC", "WBC", "Platelets"])
    with pytest.raises(DataError, match=r"train_00000\d\.xml: object 0 has unknown class name '(cat|dog|bird)'; "
                                        r"known classes: RBC, WBC, Platelets \(set data.classes to the full list, "
                                        r"or to \[\] to take the names from the annotations\)"):
        task.read_splits()


def test_a_labelling_tool_voc_folder_trains_with_data_voc_path_alone(tmp_path, capsys, monkeypatch):
    """The README's promise, literally: a labelling tool's export trains with `--data voc:PATH` and no other flag,
    although its few dozen images are fewer than the default batch of 128 (the batch is fitted, and logged)."""
    root = write_labelling_tool_voc(tmp_path, samples(24, width=64, height=64), CLASSES, "lower")
    monkeypatch.chdir(tmp_path)  # runs/ lands here, as in a user's working folder
    assert cli.main(["train", "detection", "--data", f"voc:{root}"]) == 0
    out = capsys.readouterr().out
    assert "classes from the annotations" in out and "held out of the 24 training images" in out
    assert re.search(r"train.batch_size=128 is more than the (\d+) training samples: training with batches of 16", out)
    runs = list((tmp_path / "runs" / "detection").iterdir())
    assert len(runs) == 1
    assert json.loads((runs[0] / "summary.json").read_text())["status"] == "finished"
    report = json.loads((runs[0] / "evaluation" / "val.json").read_text())  # no test split: reported on val
    # Named for what it times (the model from a decoded tensor), not "end to end" from file bytes.
    assert report["val/ms_per_image_batch1_model"] > 0 and "val/ms_per_image_batch1" not in report
