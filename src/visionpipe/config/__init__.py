"""params.yaml -> frozen dataclasses; unknown keys, wrong types and out-of-range values are errors.

Every error names the key (dotted path), the value found and what is allowed, on one line.

- :mod:`~visionpipe.config.schema`: the sections as pydantic dataclasses, and the JSON Schema
  of params.yaml generated from them (``visionpipe schema > params.schema.json``).
- :mod:`~visionpipe.config.rules`: checks across fields and sections, per-task rules.
- :mod:`~visionpipe.config.loader`: reading the YAML, pydantic's errors as one line.
- :mod:`~visionpipe.config.families`: ``spec`` fields of the model families' stdlib
  dataclasses (architecture params), validated the same way.

Importing it does not import TensorFlow.
"""

from visionpipe.config.families import spec
from visionpipe.config.loader import load_params, parse_dataclass, parse_params
from visionpipe.config.rules import KNOWN_MASK_VALUES
from visionpipe.config.schema import (
    EXPORT_FORMATS,
    PREDICT_FORMATS,
    TASKS,
    AugmentConfig,
    EvaluateConfig,
    ExportConfig,
    ExportFormat,
    ModelConfig,
    NMSConfig,
    Params,
    ParityThreshold,
    PredictConfig,
    PredictFormat,
    PrepareConfig,
    SplitSizes,
    TrackingConfig,
    TrainConfig,
    params_json_schema,
)

__all__ = [
    "EXPORT_FORMATS",
    "KNOWN_MASK_VALUES",
    "PREDICT_FORMATS",
    "TASKS",
    "AugmentConfig",
    "EvaluateConfig",
    "ExportConfig",
    "ExportFormat",
    "ModelConfig",
    "NMSConfig",
    "Params",
    "ParityThreshold",
    "PredictConfig",
    "PredictFormat",
    "PrepareConfig",
    "SplitSizes",
    "TrackingConfig",
    "TrainConfig",
    "load_params",
    "params_json_schema",
    "parse_dataclass",
    "parse_params",
    "spec",
]
