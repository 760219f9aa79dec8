"""Task registry: task name -> its :class:`~visionpipe.tasks.base.Task` class and objects.

The table of names lives in :mod:`visionpipe.tasks.catalog` (no imports: the params check and
the CLI read names there). ``task_class`` imports a task's module on first use and checks that
it holds a Task of that name.
"""

from __future__ import annotations

from importlib import import_module

from visionpipe.errors import ModelError
from visionpipe.tasks.catalog import TASKS, task_names

__all__ = ["TASKS", "get_task", "task_class", "task_for", "task_names"]


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
