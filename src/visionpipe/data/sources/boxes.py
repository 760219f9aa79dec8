"""Detection datasets read from files (VOC XML, YOLO txt, COCO JSON): the sample they all
yield, the one rule for boxes, and counts that are taken from the samples kept.

Boxes are corners ``xmin, ymin, xmax, ymax`` in pixels of the image as stored. A box reaching
outside the image is clipped to it (counted); a box with inverted corners, no width or height,
or nothing left inside the image is dropped (counted and listed with its file and place).

The counts ``samples``, ``boxes``, ``boxes_clipped``, ``boxes_dropped``, ``difficult_boxes``
and ``images_without_objects`` are never kept as running totals: :func:`recount` takes them
from the samples, so when prepare later leaves a sample out (its pixels do not decode) and
calls :meth:`BoxDataset.keep`, the report still adds up to what was written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionpipe.data.sources.files import Skipped
from visionpipe.errors import DataError

# Counts that follow from the samples kept (see recount).
SAMPLE_COUNTS = ("samples", "boxes", "boxes_clipped", "boxes_dropped", "difficult_boxes",
                 "images_without_objects")


@dataclass(frozen=True)
class Box:
    """One object as its annotation gives it: class name and corners in pixels."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    where: str = ""  # how messages name it in its file ("object 2", "line 7"); default by index


@dataclass(frozen=True, eq=False)
class BoxSample:
    """An image and its usable boxes (read-only arrays, one row per box)."""

    id: str               # VOC: the shared file stem; YOLO, COCO: the path without extension
    image: Path
    annotation: Path
    width: int            # the image's stored size, as PIL reports it
    height: int
    boxes: np.ndarray     # float32 (n, 4): xmin, ymin, xmax, ymax in pixels, inside the image
    class_ids: np.ndarray  # int64 (n,): index in the dataset's class_names
    difficult: np.ndarray  # bool (n,)
    clipped: int = 0      # boxes of this image clipped to it
    dropped: tuple[str, ...] = ()  # boxes of this image dropped: "<file>: <where> ...: why"
    shown_image: str = ""  # paths as reports write them
    shown_annotation: str = ""
    background: bool = False  # YOLO, COCO: an image without labels, kept with zero boxes

    def without(self, drop: np.ndarray, why: str) -> BoxSample:
        """This sample without the boxes where ``drop`` is true, listed as dropped for ``why``.
        """
        drop = np.asarray(drop, bool)
        lines = tuple(f"{self.shown_annotation or self.id}: box {int(i) + 1} "
                      f"({', '.join(f'{v:g}' for v in self.boxes[i])} px in the "
                      f"{self.width}x{self.height} image): {why}" for i in np.flatnonzero(drop))
        arrays = {name: _frozen(getattr(self, name)[~drop])
                  for name in ("boxes", "class_ids", "difficult")}
        return dataclasses.replace(self, **arrays, dropped=self.dropped + lines)


@dataclass(frozen=True)
class BoxDataset:
    """What a loader found: samples in id order, and what was left out and why."""

    class_names: list[str]
    samples: list[BoxSample]
    skipped: list[Skipped] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def keep(self, samples: Sequence[BoxSample], unreadable: Sequence[Skipped] = ()
             ) -> BoxDataset:
        """The dataset holding only ``samples`` (e.g. the ones whose pixels decoded), with
        ``unreadable`` skipped and counted as ``images_unreadable``, every count taken again.
        """
        counts = dict(self.counts)
        counts["images_unreadable"] = counts.get("images_unreadable", 0) + len(unreadable)
        return dataclasses.replace(self, samples=list(samples),
                                   skipped=[*self.skipped, *unreadable],
                                   dropped=dropped_lines(samples),
                                   counts=recount(samples, counts))


def dataset_of(names: list[str], samples: list[BoxSample], skipped: list[Skipped],
          counts: Mapping[str, int], shown: str, listed: str) -> BoxDataset:
    """The dataset a YOLO or COCO loader found; none usable is an error naming the first
    skipped file (``listed``: what was looked at, e.g. "the 12 found")."""
    if not samples:
        first = skipped[0] if skipped else None
        example = f", e.g. {first.path}: {first.reason}" if first else ""
        raise DataError(f"{shown}: no usable image among {listed} ({len(skipped)} file(s) "
                        f"skipped{example}); fix the files named")
    return BoxDataset(class_names=names, samples=samples, skipped=skipped,
                      dropped=dropped_lines(samples), counts=recount(samples, counts))


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


def dropped_lines(samples: Iterable[BoxSample]) -> list[str]:
    """Every dropped box of ``samples``, in sample order."""
    return [line for s in samples for line in s.dropped]


def recount(samples: Sequence[BoxSample], counts: Mapping[str, int]) -> dict[str, int]:
    """``counts`` with :data:`SAMPLE_COUNTS` (and ``background_images`` where it is one of
    them) taken from ``samples``; the other keys unchanged."""
    out = dict(counts)
    out.update(samples=len(samples), boxes=sum(len(s.boxes) for s in samples),
               boxes_clipped=sum(s.clipped for s in samples),
               boxes_dropped=sum(len(s.dropped) for s in samples),
               difficult_boxes=sum(int(s.difficult.sum()) for s in samples),
               images_without_objects=sum(len(s.boxes) == 0 for s in samples))
    if "background_images" in out:
        out["background_images"] = sum(s.background for s in samples)
    return out


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def clip(objects: Sequence[Box], width: int, height: int, shown: str
         ) -> tuple[list[tuple[Box, tuple[float, ...]]], int, list[str]]:
    """The objects whose box keeps an area inside the image, with the box clipped to it (as
    float32 holds it); how many were clipped; one line per dropped box naming why."""
    kept, clipped, dropped = [], 0, []
    for index, obj in enumerate(objects, 1):
        x0, y0, x1, y1 = obj.xmin, obj.ymin, obj.xmax, obj.ymax
        why = []
        for lo, hi, axis, side in ((x0, x1, "x", "width"), (y0, y1, "y", "height")):
            if hi < lo:
                why.append(f"inverted corners ({axis}max < {axis}min)")
            elif hi == lo:
                why.append(f"zero {side}")
        box = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
               min(max(x1, 0.0), width), min(max(y1, 0.0), height))
        stored = tuple(float(v) for v in np.array(box, np.float32))  # as the array holds it
        if not why and (box[2] <= box[0] or box[3] <= box[1]):
            why.append(f"outside the {width}x{height} image")
        elif not why and (stored[2] <= stored[0] or stored[3] <= stored[1]):
            why.append("zero width or height at float32 precision")
        if why:
            dropped.append(f"{shown}: {obj.where or f'object {index}'} {_quote(obj.name)} "
                           f"({x0:g}, {y0:g}, {x1:g}, {y1:g}): {', '.join(why)}")
            continue
        clipped += box != (x0, y0, x1, y1)
        kept.append((obj, stored))
    return kept, clipped, dropped


def make_sample(id: str, image: Path, annotation: Path, width: int, height: int,
                objects: Sequence[Box], class_ids: Mapping[str, int], *, shown_image: str,
                shown_annotation: str, background: bool = False) -> BoxSample:
    """A sample of ``objects`` clipped to the ``width`` x ``height`` image (see :func:`clip`);
    ``class_ids`` maps each object's name to its id."""
    kept, clipped, dropped = clip(objects, width, height, shown_annotation)
    return BoxSample(
        id=id, image=image, annotation=annotation, width=width, height=height,
        boxes=_frozen(np.array([box for _, box in kept], np.float32).reshape(-1, 4)),
        class_ids=_frozen(np.array([class_ids[obj.name] for obj, _ in kept], np.int64)),
        difficult=_frozen(np.array([obj.difficult for obj, _ in kept], bool)),
        clipped=clipped, dropped=tuple(dropped), shown_image=shown_image,
        shown_annotation=shown_annotation, background=background)
