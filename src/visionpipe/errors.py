"""Errors a user can cause; the CLI prints them on one line, without a traceback."""


class VisionpipeError(Exception):
    """Base class: the message says what was wrong and what to do."""


class ParamsError(VisionpipeError):
    """params.yaml has an unknown key, a wrong type or an out-of-range value."""


class DataError(VisionpipeError):
    """A dataset, record file or manifest is missing, malformed or inconsistent."""


class SourceUnavailableError(DataError):
    """A data source cannot be reached (e.g. a TFDS download with no network)."""


class ModelError(VisionpipeError):
    """A model cannot be built, loaded or found."""


class ExportParityError(VisionpipeError):
    """An exported model disagrees with the Keras model beyond the allowed threshold."""


class TrainingDivergedError(VisionpipeError):
    """The training loss became NaN or infinite."""
