"""Video files for `visionpipe predict`: frames in, a rendered video out, through PyAV.

PyAV (the ``av`` package, FFmpeg's libraries in a wheel) is optional: ``pip install av`` (or
``visionpipe[video]``; requirements.txt pins it). Without it a video in a predict folder is
skipped, counted and named with what to install, like any file that is not an image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from visionpipe.atomic import temporary_name
from visionpipe.errors import DataError

SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg"})
# The rendered video's codec: FFmpeg's own MPEG-4 part 2 encoder, in every PyAV build.
CODEC = "mpeg4"
NO_PYAV = "a video; reading it needs PyAV: pip install av"


def is_video(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise DataError(NO_PYAV) from None
    return av


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its index in the file, its time in seconds, its RGB pixels and the
    stream's frame rate."""

    index: int
    time_s: float
    image: np.ndarray
    rate: Fraction


def frame_count(path: Path) -> int | None:
    """The frame count the container declares for a progress bar's total: None when it
    declares none, 0 when the file cannot be opened (reading it then says why)."""
    try:
        with _av().open(str(path)) as container:
            return int(container.streams.video[0].frames) or None
    except Exception:  # noqa: BLE001 - any failure here resurfaces, with its reason, in frames()
        return 0


def frames(path: Path) -> Iterator[Frame]:
    """Every frame of the first video stream, decoded one at a time (memory holds one).

    Raises DataError saying what is wrong: no PyAV, not a video, no video stream, or where
    decoding stopped (frames decoded before that have already been yielded)."""
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise DataError(f"not a readable video: {_why(exc)}") from None
    with container:
        if not container.streams.video:
            raise DataError("no video stream in the file")
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate) if stream.average_rate else Fraction(25)
        index = 0
        try:
            for frame in container.decode(stream):
                time_s = float(frame.time) if frame.time is not None else float(index / rate)
                yield Frame(index, round(time_s, 6), frame.to_ndarray(format="rgb24"), rate)
                index += 1
        except av.error.FFmpegError as exc:
            raise DataError(f"decoding stopped after frame {index}: {_why(exc)}") from None


def _why(exc: Exception) -> str:
    """FFmpeg's reason without its error number and the file's path (reports name the file)."""
    return getattr(exc, "strerror", None) or str(exc)


class Writer:
    """Frames (RGB arrays or PIL images, all of one size) into a video file at ``rate``;
    the size is made even (YUV 4:2:0 needs it) by padding the last row or column. The file
    is written under a temporary name and renamed by :meth:`close` (visionpipe.atomic)."""

    def __init__(self, path: Path, rate: Fraction):
        self.path, self.rate = Path(path), rate
        self.tmp = temporary_name(self.path)
        self.container = None
        self.stream = None

    def write(self, picture) -> None:
        av = _av()
        image = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
        h, w = image.shape[:2]
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.tmp), "w")
            self.stream = self.container.add_stream(CODEC, rate=self.rate)
            self.stream.height, self.stream.width = image.shape[:2]
            self.stream.pix_fmt = "yuv420p"
            self.stream.bit_rate = 4_000_000
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self, keep: bool = True) -> None:
        """Finish the file and give it its name; ``keep=False`` (after a failure) removes it,
        leaving any earlier file of that name as it was."""
        if self.container is None:
            return
        try:
            if keep:
                for packet in self.stream.encode():
                    self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
