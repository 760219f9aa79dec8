"""The registered tasks: name -> the ``"module:Class"`` of its Task subclass.

Nothing here is imported: the params check and the CLI read task names from this table without
loading any task module (they import TensorFlow), so a stage that only needs the names (prepare,
augment) does not depend on the tasks' code. :mod:`visionpipe.tasks.registry` loads the classes.
A new task is one module under ``visionpipe/tasks/`` plus one line here (docs/extending.md).
"""

from __future__ import annotations

TASKS: dict[str, str] = {
    "classification": "visionpipe.tasks.classification:ClassificationTask",
    "segmentation": "visionpipe.tasks.segmentation:SegmentationTask",
    "detection": "visionpipe.tasks.detection:DetectionTask",
}


def task_names() -> tuple[str, ...]:
    """Every registered task name, in registry order."""
    return tuple(TASKS)
