"""The tasks modelworks knows, by the name used on the command line and in recipes."""

from __future__ import annotations

import difflib

from .errors import ConfigError
from .tasks.classification.task import ClassificationTask
from .tasks.detection.task import DetectionTask

TASKS = {
    "classification": ClassificationTask,
    "detection": DetectionTask,
}


def get_task(name: str) -> type:
    if name not in TASKS:
        near = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"task: {name!r} is not a task.{hint} Tasks: {', '.join(TASKS)}")
    return TASKS[name]
