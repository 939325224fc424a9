"""Config errors pinned by message: the dotted path, what is wrong, and the fix, all reported together."""

from __future__ import annotations

import re

import pytest
import yaml

from modelworks import config as config_mod
from modelworks.config import ConfigError, apply_override, load_config, resolve, to_dict
from modelworks.registry import get_task
from modelworks.tasks.classification.task import ClassificationTask


def load(*assignments: str):
    """A classification config from `--set` assignments only (no recipe), as the CLI builds it."""
    raw = {"task": "classification"}
    for assignment in assignments:
        apply_override(raw, assignment)
    return load_config(ClassificationTask, raw)


# ---------------------------------------------------------------------------------------------- strictness


def test_defaults_load_without_error():
    cfg = load()
    assert cfg.task == "classification"
    assert cfg.optim.lr == 1e-3 and cfg.train.batch_size == 128
    assert cfg.data.source == "fashion-mnist"


def test_unknown_key_names_its_path_the_closest_match_and_the_valid_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; did you mean 'lr'\? "
                                          r"Valid keys: name, lr, weight_decay, momentum"):
        load("optim.lrr=0.1")


def test_unknown_key_in_a_task_section_is_reported_with_its_dotted_path():
    with pytest.raises(ConfigError, match=r"data\.augment\.hflp: unknown key; did you mean 'hflip'\?"):
        load("data.augment.hflp=true")


def test_unknown_top_level_key_without_a_close_match_lists_the_sections():
    with pytest.raises(ConfigError, match=r"zzz: unknown key.*Valid keys: task, name, output_dir, recipe, model, "
                                          r"data, optim, train") as info:
        load("zzz=1")
    assert "did you mean" not in str(info.value)


def test_wrong_type_names_the_expected_type_and_the_value():
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float \(got 'fast'\)"):
        load("optim.lr=fast")


@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=2.5", r"train\.batch_size: expected int \(got 2\.5\)"),
    ("train.compile=1", r"train\.compile: expected bool \(got 1\)"),
    ("model.widths=8", r"model\.widths: expected a list \(got 8\)"),
    ("model.widths=[8,x]", r"model\.widths\[1\]: expected int \(got 'x'\)"),
])
def test_wrong_types_of_each_kind(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load(assignment)


def test_lossless_conversions_are_made():
    cfg = load("train.batch_size=64.0", "optim.lr=1", "model.widths=[8,16,16,32]")
    assert cfg.train.batch_size == 64 and type(cfg.train.batch_size) is int
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.model.widths == (8, 16, 16, 32)  # tuple field: the list becomes a tuple


def test_literal_lists_the_choices_and_the_closest_one():
    with pytest.raises(ConfigError, match=r"optim\.name: 'sdg' is not allowed; choose one of 'adamw', 'sgd', 'muon'; "
                                          r"did you mean 'sgd'\?"):
        load("optim.name=sdg")
    with pytest.raises(ConfigError, match=r"model\.name: 'resnet50' is not allowed; choose one of 'fastnet', "
                                          r"'resnet18', 'resnet34'"):
        load("model.name=resnet50")


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        load("optim.lrr=0.1", "train.batch_size=big", "optim.schedule=cosin", "data.augment.hflip=maybe")
    message = str(info.value)
    assert message.startswith("invalid configuration:")
    for expected in ("optim.lrr: unknown key", "train.batch_size: expected int (got 'big')",
                     "optim.schedule: 'cosin' is not allowed", "data.augment.hflip: expected bool (got 'maybe')"):
        assert expected in message
    assert len(message.splitlines()) == 5  # the heading and one line per problem


@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=0", r"train\.batch_size: must be >= 1 \(got 0\)"),
    ("train.epochs=0", r"train\.epochs: must be > 0 \(got 0\.0\)"),
    ("optim.lr=-0.1", r"optim\.lr: must be > 0 \(got -0\.1\)"),
    ("optim.warmup_fraction=1.0", r"optim\.warmup_fraction: must be in \[0, 1\) \(got 1\.0\)"),
    ("optim.accumulate_steps=3", r"optim\.accumulate_steps: must divide train\.batch_size=128 \(got 3\)"),
    ("train.ema.decay=1.0", r"train\.ema\.decay: must be in \[0, 1\) \(got 1\.0\)"),
    ("data.val_fraction=0", r"data\.val_fraction: must be in \(0, 1\) \(got 0\.0\)"),
    ("data.channels=2", r"data\.channels: must be 1 or 3 \(got 2\)"),
])
def test_cross_field_checks(assignment, message):
    with pytest.raises(ConfigError, match=message):
        load(assignment)


def test_missing_task_is_reported():
    with pytest.raises(ConfigError, match=r"task: required key is missing"):
        load_config(ClassificationTask, {})


# ---------------------------------------------------------------------------------------------- data.source


@pytest.mark.parametrize("source", ["mnist", "imagefolder", "cifar10:/some/path"])
def test_bad_data_source_lists_the_valid_sources(source):
    with pytest.raises(ConfigError, match=rf"data\.source: '{source}' is not a data source; use fashion-mnist, "
                                          r"cifar10 or imagefolder:PATH"):
        load(f"data.source={source}")


@pytest.mark.parametrize("source", ["fashion-mnist", "cifar10", "imagefolder:/data/pets"])
def test_good_data_sources(source):
    assert load(f"data.source={source}").data.source == source


def test_non_string_data_source_is_a_config_error_not_a_crash():
    with pytest.raises(ConfigError, match=r"data\.source: expected str \(got True\)"):
        load("data.source=true")


def test_a_wrongly_typed_field_gives_one_message_only():
    with pytest.raises(ConfigError) as info:
        load("data.val_fraction=abc")
    assert str(info.value).splitlines()[1:] == ["  data.val_fraction: expected float (got 'abc')"]


def test_fixed_length_tuple_checks_its_length():
    with pytest.raises(ConfigError, match=r"data\.augment\.erasing_scale"):
        load("data.augment.erasing_scale=[0.1]")


def test_nesterov_without_momentum_is_rejected_before_training():
    with pytest.raises(ConfigError, match=r"optim\.(momentum|nesterov)"):
        load("optim.name=sgd", "optim.momentum=0")


# ---------------------------------------------------------------------------------------------- --set parsing


def test_apply_override_parses_values_as_yaml():
    raw: dict = {}
    apply_override(raw, "optim.lr=0.002")
    apply_override(raw, "train.batch_size=64")
    apply_override(raw, "train.compile=true")
    apply_override(raw, "model.widths=[8, 16, 16, 32]")
    apply_override(raw, "data.source=imagefolder:/data/x")
    apply_override(raw, "name=a=b")  # only the first '=' separates key and value
    assert raw == {"optim": {"lr": 0.002}, "train": {"batch_size": 64, "compile": True},
                   "model": {"widths": [8, 16, 16, 32]}, "data": {"source": "imagefolder:/data/x"}, "name": "a=b"}


def test_apply_override_later_assignment_wins():
    raw: dict = {"optim": {"lr": 0.1, "name": "sgd"}}
    apply_override(raw, "optim.lr=0.5")
    assert raw == {"optim": {"lr": 0.5, "name": "sgd"}}


def test_apply_override_without_equals_sign_explains_the_form():
    with pytest.raises(ConfigError, match=r"--set optim\.lr: expected KEY=VALUE, e\.g\. --set optim\.lr=0\.002"):
        apply_override({}, "optim.lr")


def test_apply_override_into_a_value_is_refused():
    raw = {"optim": {"lr": 0.1}}
    with pytest.raises(ConfigError, match=r"--set optim\.lr\.x=1: 'lr' is a value, not a section"):
        apply_override(raw, "optim.lr.x=1")


def test_scientific_notation_is_a_float():
    assert load("optim.lr=1e-3").optim.lr == pytest.approx(0.001)


# ---------------------------------------------------------------------------------------------- recipes, tasks


def test_unknown_recipe_suggests_the_nearest_and_lists_all():
    with pytest.raises(ConfigError, match=r"--recipe: no recipe 'cifar10-resnet' for task 'classification'\. "
                                          r"Did you mean 'cifar10-resnet18'\? Recipes: .*cifar10-fast"):
        resolve(ClassificationTask, "cifar10-resnet", [])


def test_missing_recipe_file_is_reported():
    with pytest.raises(ConfigError, match=r"--recipe: file /nonexistent/r\.yaml does not exist"):
        resolve(ClassificationTask, "/nonexistent/r.yaml", [])


def test_recipe_of_another_task_is_refused(tmp_path):
    path = tmp_path / "lm.yaml"
    path.write_text("task: language_model\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=rf"--recipe {path}: it is a 'language_model' recipe, not "
                                          r"'classification'"):
        resolve(ClassificationTask, str(path), [])


def test_set_cannot_change_the_task():
    with pytest.raises(ConfigError, match=r"task"):
        resolve(ClassificationTask, None, ["task=language_model"])


def test_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a recipe must be a mapping of sections \(got list\)"):
        resolve(ClassificationTask, str(path), [])


def test_invalid_yaml_recipe_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        resolve(ClassificationTask, str(path), [])


def test_resolve_applies_recipe_then_data_then_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: classification\noptim:\n  lr: 0.5\ndata:\n  source: cifar10\n")
    cfg = resolve(ClassificationTask, str(path), ["optim.lr=0.25"], data="fashion-mnist")
    assert cfg.optim.lr == 0.25
    assert cfg.data.source == "fashion-mnist"
    assert cfg.recipe == str(path)


def test_unknown_task_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"task: 'classifcation' is not a task\. Did you mean 'classification'\? "
                                          r"Tasks: classification"):
        get_task("classifcation")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve(ClassificationTask, "cifar10-resnet18", ["train.epochs=3", "model.widths=[8,16,16,32]"])
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)  # what the run directory's config.yaml holds
    again = load_config(ClassificationTask, yaml.safe_load(text))
    assert again == cfg


def test_list_recipes_names_the_shipped_files():
    assert {"cifar10-fast", "cifar10-resnet18"} <= set(config_mod.list_recipes("classification"))
    assert config_mod.list_recipes("no-such-task") == []


@pytest.mark.parametrize("value", ["2001-13-45", "!!int x", "!!float nope", "[" * 3000, "{a: [1, }"])
def test_a_set_value_yaml_cannot_build_is_kept_as_text(value):
    """Dates that do not exist, explicit tags that do not fit and nesting too deep to parse stay the typed text,
    and the field's type check then reports them."""
    raw: dict = {}
    apply_override(raw, f"name={value}")
    assert raw == {"name": value}
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float \(got '2001-13-45'\)"):
        load("optim.lr=2001-13-45")


@pytest.mark.parametrize("assignment", ["=1", " =1", "optim..lr=1", "optim.=1", ".lr=1"])
def test_apply_override_refuses_an_empty_key_part(assignment):
    with pytest.raises(ConfigError, match=rf"--set {re.escape(assignment)}: .* is not a dotted key; write e\.g\. "
                                          r"--set optim\.lr=0\.002"):
        apply_override({}, assignment)


def test_a_non_utf8_recipe_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: cannot be read \(not UTF-8 text: .*\); correct "
                                          r"the recipe"):
        resolve(ClassificationTask, str(path), [])


def test_an_invalid_yaml_recipe_names_the_line_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 1\n   batch_size: 2\n")
    with pytest.raises(ConfigError) as info:
        resolve(ClassificationTask, str(path), [])
    assert str(info.value) == (f"{path}: not valid YAML (line 3, column 14: mapping values are not allowed here); "
                               "correct the recipe")


@pytest.mark.parametrize("name", [["classification"], 3, None])
def test_a_task_that_is_not_a_string_is_a_config_error(name):
    with pytest.raises(ConfigError, match=rf"task: {re.escape(repr(name))} is not a task\. Tasks: classification"):
        get_task(name)


@pytest.mark.parametrize("value, shown", [(".nan", "nan"), ("-.inf", "-inf"), ("1e400", "'1e400'"),
                                          ("1" + "0" * 400, "1" + "0" * 400)])
def test_a_float_must_be_finite(value, shown):
    """NaN passes every range check (all comparisons are false) and would only fail mid-training; an integer past
    float's range raised OverflowError (found by tests/config/test_config_properties.py)."""
    with pytest.raises(ConfigError, match=rf"optim\.lr: expected a finite float \(got {re.escape(shown)}\)"):
        load(f"optim.lr={value}")
