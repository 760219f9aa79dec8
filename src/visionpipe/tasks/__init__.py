"""Tasks own what differs between classification, segmentation and detection."""

from __future__ import annotations

from visionpipe.errors import ModelError


def get_task(name: str):
    """The task object for ``name`` (loss, metrics, model inputs/targets, evaluation)."""
    if name == "classification":
        from visionpipe.tasks.classification import ClassificationTask

        return ClassificationTask()
    if name == "segmentation":
        from visionpipe.tasks.segmentation import SegmentationTask

        return SegmentationTask()
    if name == "detection":
        from visionpipe.tasks.detection import DetectionTask

        return DetectionTask()
    raise ModelError(f"unknown task '{name}'; known: classification, segmentation, detection")
