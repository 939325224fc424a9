"""Every shipped recipe loads and validates for its task, and states its evidence."""

from __future__ import annotations

import pytest

from modelworks.config import list_recipes, recipe_dir, resolve
from modelworks.registry import TASKS

RECIPES = [(task, recipe) for task in TASKS for recipe in list_recipes(task)]


def test_recipes_are_found():
    assert RECIPES, "no recipes found: are the YAML files shipped as package data?"


@pytest.mark.parametrize("task, recipe", RECIPES, ids=[f"{t}/{r}" for t, r in RECIPES])
def test_recipe_loads_and_validates(task, recipe):
    task_cls = TASKS[task]
    cfg = resolve(task_cls, recipe, [])
    assert cfg.task == task
    assert cfg.recipe == recipe
    assert isinstance(cfg.model, task_cls.ModelConfig)
    assert isinstance(cfg.data, task_cls.DataConfig)
    task_cls(cfg)  # the task accepts it (no data is read until datasets())


@pytest.mark.parametrize("task, recipe", RECIPES, ids=[f"{t}/{r}" for t, r in RECIPES])
def test_recipe_header_states_its_evidence(task, recipe):
    text = (recipe_dir(task) / f"{recipe}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header, f"{recipe}.yaml has no header comment"
    assert any("Evidence" in line for line in header), f"{recipe}.yaml: header does not state its evidence"


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_ships_a_recipe(task):
    assert list_recipes(task), f"task {task!r} has no recipe under configs/{task}/"
