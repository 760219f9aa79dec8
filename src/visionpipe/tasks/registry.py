"""Task registry: task name -> its :class:`~visionpipe.tasks.base.Task` class.

Names are listed here without importing the task modules (they import TensorFlow), so the
params check, the CLI's choices and ``visionpipe --help`` stay fast. ``get_task`` imports the
class on first use and checks that it is a Task of that name.
"""

from __future__ import annotations

from importlib import import_module

from visionpipe.errors import ModelError

# name -> "module:Class". A new task is one module under visionpipe/tasks/ plus one line here
# (docs/extending.md).
TASKS: dict[str, str] = {
    "classification": "visionpipe.tasks.classification:ClassificationTask",
    "segmentation": "visionpipe.tasks.segmentation:SegmentationTask",
    "detection": "visionpipe.tasks.detection:DetectionTask",
}


def task_names() -> tuple[str, ...]:
    """Every registered task name, in registry order."""
    return tuple(TASKS)


def task_class(name: str) -> type:
    """The Task subclass registered as ``name``; an unknown name lists the known ones."""
    from visionpipe.tasks.base import Task

    if name not in TASKS:
        raise ModelError(f"unknown task '{name}'; known: {', '.join(TASKS)}")
    module, _, attr = TASKS[name].partition(":")
    cls = getattr(import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Task) and cls.name == name):
        raise ModelError(f"task registry: {TASKS[name]} is not a Task named '{name}'")
    return cls


def get_task(name: str, hooks=None):
    """A task object for ``name``, with the hooks its model family hands over (if any)."""
    return task_class(name)(hooks)


def task_for(family: str, task: str):
    """The task object of a model of ``family``: ``task`` with the family's hooks."""
    from visionpipe.models.registry import get_family

    return get_task(task, get_family(family).hooks)
