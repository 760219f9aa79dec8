"""Tasks own what differs between classification, segmentation and detection: the
:class:`~visionpipe.tasks.base.Task` interface, one module per task, and the registry."""
