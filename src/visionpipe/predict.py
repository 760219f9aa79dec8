"""`visionpipe predict`: an exported model on a folder of new images.

Reads only the export folder (``export.json`` and the chosen format's file) through
:mod:`visionpipe.serving`; no training code, params of the model or dataset are needed, so
it runs where only ``models/<model>/export/`` was pulled.

Every format runs at the model's input size; the resizing, the tiling of a segmentation
model trained on crops and the decoding of a detector's raw head happen here, the same way for
every format (and the way the SavedModel's ``serving_default`` does them inside its graph).
Images stream through in batches: memory holds one batch of images, whatever the folder's
size. A video file (read through PyAV) is predicted frame by frame: each frame is a record
with its ``frame`` index and ``time_s``, and the rendered frames make ``rendered/<file>.mp4``.
What each task writes:

- labels (classification): class, score and top-k per image; ``rendered/`` copies with a
  banner.
- masks (segmentation): ``masks/<file>.png`` (class id per pixel, at the image's own size),
  ``rendered/<file>.png`` (the mask over the image) and each class's share of the pixels.
- boxes (detection): boxes in the image's own pixels with class and score, ``rendered/``
  copies with the boxes drawn, and ``coco_results.json`` (COCO's results format).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visionpipe import box_decoding, video
from visionpipe.atomic import atomic_path
from visionpipe.console import progress
from visionpipe.data import records
from visionpipe.data.sources.files import (
    UnreadableFile,
    listing_problem,
    open_file,
    shown_text,
)
from visionpipe.data.sources.image_folder import Skipped, load_image
from visionpipe.drawing import draw_detections, overlay
from visionpipe.errors import DataError, ModelError
from visionpipe.geometry import RESIZE_POLICIES, fit_images, resize_geometry
from visionpipe.integrity import check_meta, open_checked, remedy
from visionpipe.serving import FILES, KINDS, META_FILE, first_line, read_meta
from visionpipe.tiling import sliding_window

PREDICTIONS_FILE = "predictions.json"
COCO_FILE = "coco_results.json"


@dataclass(frozen=True)
class Options:
    """What the command line and ``predict`` in params.yaml decide."""

    top_k: int = 3
    render: bool = True
    confidence: float = 0.25
    iou: float = 0.7
    max_detections: int = 100
    batch_size: int = 16
    # Run a SavedModel whose graph reads or writes files or calls Python (--trust-saved-model).
    trust_saved_model: bool = False


def list_files(input_dir: Path, exclude: Path | None = None,
               skipped: list[Skipped] | None = None) -> list[Path]:
    """Every readable regular file under ``input_dir`` (hidden ones, and the folder
    ``exclude``, aside), in a stable order: a folder's files, then its sub-folders'.

    Links to folders are followed, each folder read once. What cannot be read goes to
    ``skipped`` with its reason, in the kinds prepare's folder sources count
    (:func:`~visionpipe.data.sources.files.open_file`), and is never read: a symbolic link
    loop, a dangling link, a file or folder this user may not read, or what is not a regular
    file (a named pipe would block the read, a device never end it)."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found; pass --input a folder of images")
    skip = _identity(exclude) if exclude is not None else None
    found = skipped if skipped is not None else []
    seen = {_identity(input_dir): "."}  # folder -> where it was read
    files: list[Path] = []
    todo = [input_dir]
    while todo:
        folder = todo.pop()
        try:
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it if not e.name.startswith("."))
        except OSError as exc:
            rel = _rel(folder, input_dir)
            found.append(Skipped(rel, listing_problem(exc, rel)))
            continue
        folders = []
        for name in names:
            path = folder / name
            rel = _rel(path, input_dir)
            key = _identity(path) if os.path.isdir(path) else None
            if key is None:
                try:
                    with open_file(path):  # stat first: a pipe is never opened blocking
                        files.append(path)
                except UnreadableFile as exc:
                    found.append(Skipped(rel, exc.reason, exc.kind))
            elif key == skip:
                continue  # predict's own output inside the input
            elif key in seen:
                found.append(_read_before(path, folder, seen[key], rel))
            else:
                seen[key] = rel
                folders.append(path)
        todo.extend(reversed(folders))
    return files


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _rel(path: Path, root: Path) -> str:
    return shown_text(path.relative_to(root).as_posix()) if path != root else "."


def _read_before(link: Path, folder: Path, first: str, rel: str) -> Skipped:
    """A link to a folder already read, not followed: a loop (it leads to a folder holding
    it) or a second way to the same folder."""
    target, here = os.path.realpath(link), os.path.realpath(folder)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        return Skipped(rel, f"symbolic link loop: the link leads back to {first}, which holds "
                            "it, so it would be read forever; remove the link or point it "
                            "elsewhere")
    return Skipped(rel, f"folder already read as {first} (a symbolic link leads to it again); "
                        "its files are read once", "folder already read")


def render_label(image: np.ndarray, text: str) -> Image.Image:
    """The image with a black banner on top carrying ``text``."""
    pil = Image.fromarray(image)
    scale = max(1, round(max(pil.size) / 256))
    banner = 14 * scale
    canvas = Image.new("RGB", (pil.width, pil.height + banner))
    canvas.paste(pil, (0, banner))
    draw = ImageDraw.Draw(canvas)
    draw.text((3, 1), text, fill=(255, 255, 0), font_size=11 * scale)
    return canvas


def kind_of(meta: dict) -> str:
    """What the export predicts, from the outputs export.json lists: boxes, masks or labels."""
    outputs = meta.get("outputs") or {}
    if "boxes" in outputs:
        return "boxes"
    if "mask" in outputs:
        return "masks"
    return "labels"


@dataclass(frozen=True)
class Item:
    """One picture to predict: its file's path under the input folder and its pixels; for a
    video frame also the frame's index, time and the video's frame rate."""

    rel: str
    image: np.ndarray
    frame: int | None = None
    time_s: float | None = None
    rate: Fraction | None = None


def _items(files: list[Path], input_dir: Path, skipped: list[Skipped]) -> Iterator[Item]:
    for path in files:
        rel = _rel(path, input_dir)  # names that are not UTF-8 written with \xNN escapes
        try:
            if video.is_video(path):
                for f in video.frames(path):
                    yield Item(rel, f.image, f.index, f.time_s, f.rate)
            else:
                yield Item(rel, load_image(path))
        except DataError as exc:
            skipped.append(Skipped(rel, str(exc)))
        except OSError as exc:  # changed since it was listed (removed, permissions)
            detail = exc.strerror or first_line(exc)
            skipped.append(Skipped(rel, f"cannot read the file: {detail} (errno {exc.errno})"))


def batches(files: list[Path], input_dir: Path, size: int, skipped: list[Skipped]
            ) -> Iterator[list[Item]]:
    """Images and video frames in lists of ``size``; unreadable files go to ``skipped`` with
    their reason. A progress bar counts images and frames on a terminal."""
    counts = [video.frame_count(p) if video.is_video(p) else 1 for p in files]
    total = None if None in counts else sum(counts)
    chunk: list[Item] = []
    for item in progress(_items(files, input_dir, skipped), total=total, desc="predict",
                         unit="image"):
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _save(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(tmp,
                                                                                  format="PNG")


class Predictor:
    """One export's runner and the geometry export.json records, for one output kind."""

    def __init__(self, export_dir: Path, fmt: str, meta: dict, options: Options,
                 output_dir: Path):
        self.runner = open_checked(export_dir, fmt, meta,
                                   trust_saved_model=options.trust_saved_model)
        self.model_file = Path(export_dir) / FILES[fmt]
        self.fmt, self.fix = fmt, remedy(Path(export_dir), meta)
        self.meta, self.options, self.out = meta, options, output_dir
        self.names = list(meta["class_names"])
        self.size = tuple(int(d) for d in meta["image_size"])
        self.policy = meta["resize"]
        # A segmentation model trained on crops sees images at prepare's size, in tiles.
        self.scale = tuple(int(d) for d in meta.get("scale") or self.size)
        self.overlap = float(meta.get("tile_overlap", 0.25))
        self.kind = kind_of(meta)
        self.coco: list[dict] = []
        self.writer: video.Writer | None = None
        self.writing: str | None = None  # the video being rendered
        if self.kind == "boxes":
            self.decoder = self._checked_decoder(export_dir)

    def _checked_decoder(self, export_dir: Path) -> dict:
        try:
            return box_decoding.check_decoder(self.meta.get("decoder"))
        except ValueError as exc:
            raise ModelError(f"{Path(export_dir) / 'export.json'}: {exc}") from None

    def fitted(self, images: list[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
        """Each image resized to ``size`` as prepare resized the training images (images of
        one shape go through together)."""
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        for indices in groups.values():
            batch = np.stack([images[i] for i in indices])
            fit = fit_images(batch, size, self.policy).numpy().astype(np.uint8)
            for i, image in zip(indices, fit, strict=True):
                out[i] = image
        return out

    def raw(self, images: list[np.ndarray]) -> np.ndarray:
        """The format's outputs for images already at the model's size; a model that loads
        but fails when run is a ModelError naming its file."""
        try:
            return self.runner.predict(np.stack(images))
        except self.runner.run_errors as exc:
            raise ModelError(f"{self.model_file}: the {KINDS[self.fmt]} failed on a batch "
                             f"of images ({first_line(exc)}); the file is damaged or not this "
                             f"export's: {self.fix}") from None

    def run(self, chunk: list[Item], start: int) -> list[dict]:
        """Records of one batch (``start``: the index of its first image among those read)."""
        images = [item.image for item in chunk]
        base = [{"file": item.rel} | ({} if item.frame is None else
                                      {"frame": item.frame, "time_s": item.time_s})
                | {"height": int(item.image.shape[0]), "width": int(item.image.shape[1])}
                for item in chunk]
        if self.kind == "boxes":
            return self._boxes(chunk, images, base, start)
        if self.kind == "masks":
            return self._masks(chunk, images, base)
        return self._labels(chunk, images, base)

    def render(self, item: Item, picture) -> None:
        """An image's rendering to ``rendered/<file>.png``; a frame's to the next frame of
        ``rendered/<file>.mp4``."""
        if item.frame is None:
            _save(picture, self.out / "rendered" / f"{item.rel}.png")
            return
        if self.writing != item.rel:
            self.close()
            self.writer = video.Writer(self.out / "rendered" / f"{item.rel}.mp4", item.rate)
            self.writing = item.rel
        self.writer.write(picture)

    def close(self, keep: bool = True) -> None:
        """Finish the video being rendered, if any (``keep=False``: drop it, after a failure)."""
        if self.writer is not None:
            self.writer.close(keep)
            self.writer, self.writing = None, None

    def _labels(self, items, images, base) -> list[dict]:
        scores = self.raw(self.fitted(images, self.size))
        k = min(self.options.top_k, len(self.names))
        records_ = []
        for rec, item, image, row in zip(base, items, images, scores, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            rec.update(class_id=int(order[0]), class_name=self.names[order[0]],
                       score=float(row[order[0]]),
                       top_k=[{"class_name": self.names[i], "score": float(row[i])}
                              for i in order])
            if self.options.render:
                self.render(item, render_label(image, f"{rec['class_name']} {rec['score']:.2f}"))
            records_.append(rec)
        return records_

    def _masks(self, items, images, base) -> list[dict]:
        import tensorflow as tf

        fitted = self.fitted(images, self.scale)
        if self.scale == self.size:
            scores = list(self.raw(fitted))
        else:
            scores = [sliding_window(lambda tiles: self.raw(list(tiles.astype(np.uint8))),
                                     image, self.size, self.overlap, self.options.batch_size)
                      for image in fitted]
        for rec, item, image, s in zip(base, items, images, scores, strict=True):
            full = tf.image.resize(s[None].astype(np.float32), image.shape[:2],
                                   method="bilinear")
            mask = tf.argmax(full[0], axis=-1).numpy().astype(np.uint8)
            counts = np.bincount(mask.ravel(), minlength=len(self.names))
            rec["class_shares"] = {n: round(float(c) / mask.size, 6)
                                   for n, c in zip(self.names, counts, strict=True)}
            rec["mask"] = (f"masks/{item.rel}.png" if item.frame is None
                           else f"masks/{item.rel}/{item.frame:06d}.png")
            _save(mask, self.out / rec["mask"])
            if self.options.render:
                self.render(item, overlay(image, mask))
        return base

    def _boxes(self, items, images, base, start: int) -> list[dict]:
        o = self.options
        raw = self.raw(self.fitted(images, self.size))
        found = box_decoding.decode_raw(raw, self.size, confidence=o.confidence, iou=o.iou,
                                        max_detections=o.max_detections, decoder=self.decoder)
        for i, (rec, item, image, det) in enumerate(zip(base, items, images, found,
                                                        strict=True)):
            boxes = to_image_pixels(det["boxes"], image.shape[:2], self.size, self.policy)
            rec["image_id"] = start + i
            rec["detections"] = [
                {"class_id": int(k), "class_name": self.names[int(k)], "score": float(s),
                 "box": [round(float(v), 2) for v in b]}
                for b, k, s in zip(boxes, det["class_ids"], det["scores"], strict=True)]
            self.coco.extend(
                {"image_id": start + i, "category_id": int(k),
                 "bbox": [round(float(b[0]), 2), round(float(b[1]), 2),
                          round(float(b[2] - b[0]), 2), round(float(b[3] - b[1]), 2)],
                 "score": round(float(s), 5)}
                for b, k, s in zip(boxes, det["class_ids"], det["scores"], strict=True))
            if o.render:
                labels = [f"{self.names[int(k)]} {s:.2f}" for k, s in
                          zip(det["class_ids"], det["scores"], strict=True)]
                self.render(item, draw_detections(image, boxes, det["class_ids"], labels))
        return base


def to_image_pixels(boxes: np.ndarray, hw: tuple[int, int], size: tuple[int, int],
                    policy: str) -> np.ndarray:
    """Boxes in the model's input pixels back in the pixels of the (height, width) ``hw``
    image they came from (the inverse of prepare's ``fit_boxes``), clipped to it."""
    (nh, nw), (top, left) = resize_geometry(hw, size, policy)
    h, w = hw
    scale = np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
    offset = np.array([left, top, left, top], np.float32)
    out = (np.asarray(boxes, np.float32).reshape(-1, 4) - offset) / scale
    return np.clip(out, 0, np.array([w, h, w, h], np.float32))


def predict_folder(export_dir: Path, input_dir: Path, output_dir: Path, fmt: str,
                   options: Options) -> dict:
    """Predict every image under ``input_dir`` in batches; write predictions.json (one record
    per image, plus every skipped file with its reason) and what the task renders."""
    meta = read_meta(export_dir)
    if "visionpipe_predict" not in meta:
        raise ModelError(f"{export_dir}: export.json does not say whether visionpipe predict "
                         "runs this export (an export of an older visionpipe); rerun `dvc repro "
                         "export@<model>`")
    if not isinstance(meta["visionpipe_predict"], bool):
        raise ModelError(f"{Path(export_dir) / META_FILE}: key 'visionpipe_predict' is "
                         f"{meta['visionpipe_predict']!r:.60}; expected true or false. "
                         "export.json was edited or damaged: rebuild it with `dvc repro "
                         "export@<model>`")
    if not meta["visionpipe_predict"]:
        raise ModelError(f"{export_dir}: a {meta.get('task')} export; visionpipe predict does "
                         "not run those yet (load saved_model with tf.saved_model.load)")
    check_meta(meta, Path(export_dir) / META_FILE, RESIZE_POLICIES)
    skipped: list[Skipped] = []
    # An output inside the input is not read.
    files = list_files(input_dir, exclude=output_dir, skipped=skipped)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(export_dir, fmt, meta, options, output_dir)
    predictions: list[dict] = []
    try:
        for chunk in batches(files, input_dir, options.batch_size, skipped):
            predictions.extend(predictor.run(chunk, len(predictions)))
    except BaseException:
        predictor.close(keep=False)
        raise
    predictor.close()
    if not predictions:
        raise DataError(f"{input_dir}: no image could be read ({len(skipped)} file(s) skipped"
                        + (f", e.g. {skipped[0].path}: {skipped[0].reason}" if skipped else "")
                        + "); pass a folder of JPEG/PNG/BMP/GIF images or videos")
    result = {
        "model": meta.get("model"), "task": meta["task"], "format": fmt,
        "model_file": str(Path(export_dir) / FILES[fmt]), "input": str(input_dir),
        "class_names": predictor.names, "count": len(predictions),
        "skipped": {"count": len(skipped), "items": [s.to_dict() for s in skipped]},
    }
    if predictor.kind == "boxes":
        records.write_json(output_dir / COCO_FILE, predictor.coco)
        result["thresholds"] = {"confidence": options.confidence, "iou": options.iou,
                                "max_detections": options.max_detections}
        result["detections"] = len(predictor.coco)
        result["coco"] = {"results": COCO_FILE,
                          "categories": [{"id": i, "name": n}
                                         for i, n in enumerate(predictor.names)]}
    result["predictions"] = predictions
    records.write_json(output_dir / PREDICTIONS_FILE, result)
    return result


def options_from(args, settings) -> Options:
    """Flags over ``predict`` in params.yaml."""
    def pick(flag, key):
        value = getattr(args, flag, None)
        return getattr(settings, key) if value is None else value

    return Options(top_k=settings.top_k, render=settings.render,
                   confidence=pick("conf", "confidence"), iou=pick("iou", "iou"),
                   max_detections=pick("max_det", "max_detections"),
                   batch_size=pick("batch_size", "batch_size"),
                   trust_saved_model=bool(getattr(args, "trust_saved_model", False)))


def run(args, params_predict) -> None:
    """The CLI command: resolve the export folder and format, predict, print a summary."""
    export_dir = args.export_dir or args.root / "models" / args.model / "export"
    fmt = args.format or params_predict.format
    result = predict_folder(export_dir, args.input, args.output, fmt,
                            options_from(args, params_predict))
    skipped = result["skipped"]
    found = (f" ({result['detections']} detection(s) at confidence >= "
             f"{result['thresholds']['confidence']})" if "detections" in result else "")
    frames = sum("frame" in rec for rec in result["predictions"])
    what = f"{result['count'] - frames} image(s)" + (
        f" and {frames} video frame(s)" if frames else "")
    print(f"predicted {what}{found} with {fmt} ({result['model_file']}); "
          f"wrote {args.output / PREDICTIONS_FILE}", flush=True)
    if skipped["count"]:
        print(f"skipped {skipped['count']} file(s) that are not readable images or videos:",
              file=sys.stderr)
        for item in skipped["items"]:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
