"""The tasks modelworks knows, by the name used on the command line and in recipes."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping

from .errors import ConfigError

# name -> (module, class). Imported on first use, so a run pays only for its own task's imports (detection's
# pycocotools and friends would otherwise add about a second to every classification run).
_TASK_CLASSES = {
    "classification": ("modelworks.tasks.classification.task", "ClassificationTask"),
    "detection": ("modelworks.tasks.detection.task", "DetectionTask"),
    "language_model": ("modelworks.tasks.language_model.task", "LanguageModelTask"),
    "recommendation": ("modelworks.tasks.recommendation.task", "RecommendationTask"),
    "captioning": ("modelworks.tasks.captioning.task", "CaptioningTask"),
    "diffusion": ("modelworks.tasks.diffusion.task", "DiffusionTask"),
}


class _Tasks(Mapping):
    def __getitem__(self, name: str) -> type:
        module, cls = _TASK_CLASSES[name]
        return getattr(importlib.import_module(module), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(_TASK_CLASSES)

    def __len__(self) -> int:
        return len(_TASK_CLASSES)


TASKS: Mapping[str, type] = _Tasks()


def get_task(name: str) -> type:
    # The name may come from a hand-edited file as any YAML value; only a string can name a task.
    if not isinstance(name, str) or name not in TASKS:
        near = difflib.get_close_matches(name, list(TASKS), n=1) if isinstance(name, str) else []
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"task: {name!r} is not a task.{hint} Tasks: {', '.join(TASKS)}")
    return TASKS[name]
