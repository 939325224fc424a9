"""The `modelworks` command in process: run directory files, user errors as one line and exit code 2, the
reproduce command, and ImageFolder trees."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from helpers import run_cli, tiny_cli_args
from modelworks.cli import main
from modelworks.data.synthetic import write_image_folder


def test_train_writes_the_run_directory(tmp_path, capsys):
    assert main(tiny_cli_args(tmp_path, "first", **{"train.epochs": 1})) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "classification" / "first"
    assert f"run finished at step 7: {run_dir}" in out
    assert "test/acc1" in out
    for name in ("config.yaml", "command.txt", "environment.json", "metrics.jsonl", "summary.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "evaluation/test.json"):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["widths"] == [8, 16, 16, 32] and saved["name"] == "first"
    assert {"python", "torch", "torchvision"} <= set(json.loads((run_dir / "environment.json").read_text()))


def test_reproduce_command_replays_the_saved_config(tmp_path, capsys):
    assert main(tiny_cli_args(tmp_path, "orig", **{"train.epochs": 1, "train.test_at_end": False})) == 0
    run_dir = tmp_path / "runs" / "classification" / "orig"
    command = (run_dir / "command.txt").read_text().splitlines()
    assert command[0] == "# as typed:" and command[2] == "# reproduce exactly:"
    argv = shlex.split(command[3])
    assert argv[0] == "modelworks"
    assert main(argv[1:]) == 0
    again = tmp_path / "runs" / "classification" / "orig-again"
    first, second = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, again))
    for cfg in (first, second):
        cfg.pop("name"), cfg.pop("recipe")
    assert first == second


def test_same_name_twice_is_refused(tmp_path, capsys):
    args = tiny_cli_args(tmp_path, "twice", **{"train.epochs": 1, "train.test_at_end": False})
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    run_dir = tmp_path / "runs" / "classification" / "twice"
    assert (f"modelworks: error: --name: run directory {run_dir} already holds a run; choose another name or "
            f"continue it with --resume {run_dir}") in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "classifcation"], "modelworks: error: task: 'classifcation' is not a task. Did you mean "
                                 "'classification'?"),
    (["train"], "modelworks: error: train: name a task"),
    (["train", "classification", "--recipe", "fashion-mnst"], "Did you mean 'fashion-mnist'?"),
    (["train", "classification", "--set", "train.epochs"], "expected KEY=VALUE"),
    (["evaluate", "/nonexistent/run"], "modelworks: error: /nonexistent/run: not a run directory (no config.yaml)"),
])
def test_user_errors_exit_2_with_one_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err


def test_recipes_lists_the_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("classification: ")
    assert {"cifar10-fast", "cifar10-resnet18", "fashion-mnist"} <= set(line.split(": ", 1)[1].split(", "))


def test_typo_in_set_exits_2_with_did_you_mean_and_no_traceback(tmp_path):
    """A real process: the message reaches stderr as one line per problem, and nothing else."""
    result = run_cli(["train", "classification", "--set", "optim.lrr=0.1", "--set", f"output_dir={tmp_path}"])
    assert result.returncode == 2
    assert "optim.lrr: unknown key; did you mean 'lr'?" in result.stderr
    assert result.stderr.startswith("modelworks: error: invalid configuration:")
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was created


def image_folder_args(tmp_path, tree_name: str, **sets) -> list[str]:
    values = {"data.image_size": 16, "data.val_fraction": 0.25, "model.widths": "[8, 16, 16]",
              "train.batch_size": 6, "train.eval_batch_size": 12, "train.epochs": 1, "train.device": "cpu",
              "output_dir": str(tmp_path / "runs"), **sets}
    args = ["train", "classification", "--data", f"imagefolder:{tmp_path / tree_name}", "--name", tree_name]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_image_folder_tree_with_a_test_split_trains_and_tests(tmp_path, capsys):
    write_image_folder(tmp_path / "tree" / "train", ["a", "b", "c"], per_class=8, size=20)
    write_image_folder(tmp_path / "tree" / "test", ["a", "b", "c"], per_class=2, size=20, seed=5)
    assert main(image_folder_args(tmp_path, "tree")) == 0
    metrics = json.loads((tmp_path / "runs" / "classification" / "tree" / "evaluation" / "test.json").read_text())
    assert {"test/acc1", "test/acc1/a", "test/acc1/c"} <= set(metrics)


def test_image_folder_tree_without_a_test_split_finishes_with_exit_0(tmp_path, capsys):
    write_image_folder(tmp_path / "flat", ["a", "b", "c"], per_class=8, size=20)
    code = main(image_folder_args(tmp_path, "flat"))
    assert code == 0, capsys.readouterr().err


def test_a_run_failing_before_its_first_step_leaves_no_folder(tmp_path, capsys):
    args = tiny_cli_args(tmp_path, "no-data", **{"train.batch_size": 4096})  # larger than the data: fit refuses
    assert main(args) == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "classification" / "no-data"
    assert f"removed {run_dir}: the run stopped before anything was saved" in err and "modelworks: error:" in err
    assert not run_dir.exists()
    assert main(tiny_cli_args(tmp_path, "no-data", **{"train.epochs": 1, "train.test_at_end": False})) == 0


@pytest.mark.parametrize("recipe, data, expected", [
    ("bccd", None, "bccd"),  # the recipe's own data
    ("bccd", "voc:/photos/Raccoon", "bccd-raccoon"),  # a raccoon model is not a "bccd" model
    ("fmnist-scenes", "yolo:/sets/road signs/data.yaml", "fmnist-scenes-road-signs"),
    (None, "voc:/photos/raccoon/", "raccoon"),
    (None, "coco:/sets/kitchen/annotations/instances_{split}.json:/sets/kitchen/images/{split}", "kitchen"),
    (None, None, "fmnist-scenes"),  # the task's default data
])
def test_runs_and_their_packages_are_named_after_recipe_and_data(recipe, data, expected):
    from modelworks import config as config_mod
    from modelworks.engine import rundir
    from modelworks.tasks.detection.task import DetectionTask

    cfg = config_mod.resolve(DetectionTask, recipe, [], data)
    name = rundir.new_run_dir(cfg).name
    assert rundir.model_name(name) == expected and name.startswith(expected + "-20")
    assert rundir.model_name("raccoon-v2") == "raccoon-v2"  # a chosen name is kept whole
