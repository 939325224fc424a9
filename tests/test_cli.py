"""The `modelworks` command in process: run directory files, user errors as one line and exit code 2, the
reproduce command, and ImageFolder trees."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
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
                 "checkpoints/last.pt", "checkpoints/best.pt", "evaluation/test.json", "calibration.json",
                 "evaluation/reliability.png"):
        assert (run_dir / name).is_file(), name
    # train calibrates at its end, so the test report is of the calibrated model it will export.
    assert "calibration (" in out
    report = json.loads((run_dir / "evaluation" / "test.json").read_text())
    assert {"test/ece", "test/ece_uncalibrated", "val/temperature"} <= set(report)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["widths"] == [8, 16, 16, 32] and saved["name"] == "first"
    assert {"python", "torch", "torchvision"} <= set(json.loads((run_dir / "environment.json").read_text()))


def test_calibrate_fits_the_temperature_of_an_existing_run(tiny_run_dir, tmp_path, capsys):
    import shutil

    run_dir = shutil.copytree(tiny_run_dir, tmp_path / "run")
    assert main(["calibrate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    fitted = json.loads((run_dir / "calibration.json").read_text())["fitted"]
    assert f"temperature       {fitted['temperature']:.4f}" in out
    assert f"next: modelworks evaluate {run_dir}, then modelworks export {run_dir} --force" in out


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


# ---------------------------------------------------------------------------------------------- export, fail fast


def run_config_copy(run_dir, dest, **changes):
    """A run directory `dest` holding only `run_dir`'s config.yaml, with top-level or dotted `changes`."""
    from helpers import set_dotted

    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key, value in changes.items():
        set_dotted(raw, key, value)
    dest.mkdir(parents=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


RULE = "1-64 letters, digits, '.', '_' and '-', starting with a letter or digit"


@pytest.mark.parametrize("run_name, flags, changes, message", [
    ("run", ["--version", "v-日本"], {}, f"--version: 'v-日本' is not a valid version; use {RULE}"),
    ("run", ["--name", "my model"], {}, f"--name: 'my model' is not a valid name; use {RULE}"),
    ("run 日本", ["--name", "ok"], {}, f"--version: 'run 日本' is not a valid version; it defaults to the run "
                                     f"directory's name: pass --version with {RULE}"),
    ("run 日本", [], {}, f"--name: 'run 日本' is not a valid name; it defaults to the run's name less its time "
                       f"stamp: pass --name with {RULE}"),
])
def test_export_refuses_an_invalid_name_or_version_before_any_work(tiny_run_dir, tmp_path, capsys, run_name, flags,
                                                                   changes, message):
    # The data folder does not exist and there is no checkpoint: reaching either would give another error.
    run = run_config_copy(tiny_run_dir, tmp_path / run_name,
                          **{"data.source": f"imagefolder:{tmp_path / 'no-data'}", **changes})
    assert main(["export", str(run), "--out", str(tmp_path / "pkg"), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"modelworks: error: {message}\n"
    assert captured.out == ""  # not even "exporting ..."
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_name]


# ---------------------------------------------------------------------------------------------- damaged run files


VERBS = {"evaluate": ["evaluate"], "export": ["export"], "resume": ["train", "--resume"]}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("content, message", [
    pytest.param(b"task: classification\nmodel: [unclosed\n", r"not valid YAML \(line 3, column 1: expected ',' or "
                 r"']', but got '<stream end>'\); correct the file or restore it from a copy", id="unclosed"),
    pytest.param(b"task: classification\nmodel:\n\t- 1\n", r"not valid YAML \(line 3, column 1: found character "
                 r"'\\t' that cannot start any token\)", id="tab"),
    pytest.param(b"- task\n- model\n", r"expected a mapping of config sections \(got list\); correct the file or "
                 r"restore it", id="list"),
    pytest.param(b"task: classification\nname: \xff\xfe\n", r"cannot be read \(not UTF-8 text: .*\); correct the "
                 r"file or restore it", id="not-utf8"),
    pytest.param(b"task: [classification]\n", r"task: \['classification'\] is not a task\. Tasks: classification",
                 id="task-list"),
])
def test_a_damaged_run_config_is_one_line_and_exit_2(tmp_path, capsys, verb, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(content)
    assert main([*VERBS[verb], str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    prefix = "" if message.startswith("task") else re.escape(f"{run / 'config.yaml'}: ")
    assert re.match(rf"modelworks: error: {prefix}{message}", err), err


def test_a_recipe_file_that_is_not_yaml_is_one_line_and_exit_2(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lr: [0.1\n")
    assert main(["train", "classification", "--recipe", str(recipe)]) == 2
    assert capsys.readouterr().err == (f"modelworks: error: {recipe}: not valid YAML (line 3, column 1: expected ',' "
                                       "or ']', but got '<stream end>'); correct the recipe\n")
    recipe.write_bytes(b"optim: \xff\n")
    assert main(["train", "classification", "--recipe", str(recipe)]) == 2
    assert re.fullmatch(rf"modelworks: error: {re.escape(str(recipe))}: cannot be read \(not UTF-8 text: .*\); "
                        r"correct the recipe\n", capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- checkpoints


def break_model_keys(state):
    model = dict(state["model"])
    model.pop("features.0.weight")
    model["features.99.weight"] = torch.zeros(1)
    return {**state, "model": model}


def break_model_shape(state):
    model = dict(state["model"])
    model["features.1.bias"] = torch.zeros(3)
    return {**state, "model": model}


BREAKAGES = {
    "no-model": (lambda state: {"step": 1}, r"not a complete modelworks checkpoint \(missing '[^)]*model[^)]*; it has "
                                            r"'step'\); use a checkpoint `modelworks train` wrote for this run"),
    "not-a-dict": (lambda state: [state["model"]], r"holds a list, not a modelworks checkpoint \(a dict with 'step'|"
                                                   r"holds a list, not a modelworks checkpoint \(a dict with 'model'"),
    "keys": (break_model_keys, r"the weights in 'model' do not fit the model the run's config builds \(missing 1: "
                               r"features\.0\.weight; unexpected 1: features\.99\.weight\); was the checkpoint copied "
                               r"from another run, or config\.yaml edited\?"),
    "shape": (break_model_shape, r"the weights in 'model' do not fit the model the run's config builds \(wrong shape "
                                 r"1: features\.1\.bias \(3,\) in the file, \(8,\) in the model\)"),
}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_checkpoint_that_does_not_fit_is_one_line_and_exit_2(tiny_run_dir, tmp_path, capsys, verb, breakage):
    from modelworks.engine import checkpoint

    run = run_config_copy(tiny_run_dir, tmp_path / "run")
    state = checkpoint.load(tiny_run_dir / "checkpoints" / "last.pt")
    change, message = BREAKAGES[breakage]
    for name in ("best.pt", "last.pt"):
        checkpoint.save_atomic(change(state), run / "checkpoints" / name)
    assert main([*VERBS[verb], str(run), *(["--set", "train.test_at_end=false"] if verb == "resume" else [])]) == 2
    err = capsys.readouterr().err
    path = run / "checkpoints" / ("last.pt" if verb == "resume" else "best.pt")
    assert len(err.splitlines()) == 1, err
    assert re.match(rf"modelworks: error: {re.escape(str(path))}: (?:{message})", err), err


def test_resume_with_an_optimizer_state_of_another_model_is_one_line_and_exit_2(tiny_run_dir, tmp_path, capsys):
    from modelworks.engine import checkpoint

    run = run_config_copy(tiny_run_dir, tmp_path / "run")
    state = checkpoint.load(tiny_run_dir / "checkpoints" / "last.pt")
    checkpoint.save_atomic({**state, "optimizer": {"state": {}, "param_groups": []}}, run / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    path = run / "checkpoints" / "last.pt"
    assert err == (f"modelworks: error: {path}: its optimizer state does not fit this run (ValueError: loaded state "
                   "dict has a different number of parameter groups); resume with the run's own config.yaml, or "
                   "start a new run\n")


def test_a_run_failing_before_its_first_step_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = tiny_cli_args(tmp_path, "no-data", **{"data.source": f"imagefolder:{tmp_path / 'empty'}"})  # fit: no data
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


@pytest.mark.parametrize("cores,threads", [({0}, 1), ({0, 1}, 1), ({0, 1, 2, 3}, 3)])
def test_a_server_gives_its_runtime_every_core_but_one(monkeypatch, cores, threads):
    import os

    from modelworks.cli import serving_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores, raising=False)
    assert serving_threads() == threads
