"""`modelworks debug` in process: verdicts as exit codes, the files each command writes, and misplaced options."""

from __future__ import annotations

import json

from helpers import tiny_cli_args
from modelworks.cli import main


def debug_args(tmp_path, command: str, *extra: str) -> list[str]:
    """`debug classification COMMAND` on the tiny configuration (the same --set flags train would get)."""
    settings = tiny_cli_args(tmp_path, "debug")[2:]
    return ["debug", "classification", command, *settings, *extra]


def test_overfit_passes_writes_its_curve_and_says_what_it_changed(tmp_path, capsys):
    assert main(debug_args(tmp_path, "overfit", "--set", "optim.lr=0.01", "--steps", "150")) == 0
    out = capsys.readouterr().out
    assert "overfit: with model.label_smoothing=0" in out
    assert "PASS: the loss went from" in out
    picture = tmp_path / "runs" / "classification" / "debug" / "overfit.png"
    record = json.loads(picture.with_suffix(".json").read_text())
    assert picture.stat().st_size > 10_000
    assert record["passed"] is True and len(record["losses"]) == 150 and record["batch_size"] == 16
    assert record["losses"][-1] < 0.05 * record["losses"][0]


def test_overfit_fails_loudly_when_the_model_cannot_learn(tmp_path, capsys):
    out_png = tmp_path / "stuck.png"
    assert main(debug_args(tmp_path, "overfit", "--set", "optim.lr=1e-9", "--steps", "20", "--out",
                           str(out_png))) == 1
    out = capsys.readouterr().out
    assert "FAIL: the loss went from" in out and "optim.lr=1e-09" in out
    assert json.loads(out_png.with_suffix(".json").read_text())["passed"] is False


def test_augment_and_gradients_write_their_pictures(tmp_path, capsys):
    assert main(debug_args(tmp_path, "augment", "--samples", "4", "--views", "2")) == 0
    assert "4 samples, each as prepared and in 2 augmented views" in capsys.readouterr().out
    assert (tmp_path / "runs" / "classification" / "debug" / "augment.png").is_file()

    assert main(debug_args(tmp_path, "gradients", "--steps", "4")) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["parameter", "shape"]
    assert "no parameter flagged over 4 steps" in out
    record = json.loads((tmp_path / "runs" / "classification" / "debug" / "gradients.json").read_text())
    assert record["steps"] == 4 and record["parameters"][0]["name"] == "features.0.weight"


def test_an_option_of_another_command_is_refused(tmp_path, capsys):
    assert main(debug_args(tmp_path, "overfit", "--views", "2")) == 2
    err = capsys.readouterr().err
    assert "modelworks: error: --views: an option of `debug augment`, not of `debug overfit`" in err


def test_the_config_is_checked_as_for_train(tmp_path, capsys):
    assert main(debug_args(tmp_path, "gradients", "--set", "optim.lrr=1")) == 2
    assert "optim.lrr: unknown key; did you mean 'lr'?" in capsys.readouterr().err
