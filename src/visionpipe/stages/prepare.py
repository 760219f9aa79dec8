"""prepare: a task's source -> validated train/val/test TFRecord shards plus manifest.json."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from visionpipe import geometry
from visionpipe.config import Params, PrepareConfig
from visionpipe.console import progress
from visionpipe.data import archive, records
from visionpipe.data.example import Example
from visionpipe.data.sources import image_folder, tfds_source
from visionpipe.data.sources.files import Skipped, reason_kind, shown_text
from visionpipe.errors import DataError
from visionpipe.layout import Layout
from visionpipe.stages.common import fresh_dir

# Detection sources read from files: the same checks, counts and records for each.
BOX_SOURCES = ("voc", "yolo", "coco")

# What each task keeps of an Example; the rest is not written.
TASK_TARGETS = {"classification": ("label",), "segmentation": ("mask",),
                "detection": ("boxes", "box_labels")}


def keep_targets(example: Example, task: str) -> Example:
    """A copy holding the image and only the targets ``task`` trains on."""
    keep = TASK_TARGETS[task]
    out = Example(id=example.id, image=example.image)
    for name in keep:
        value = getattr(example, name)
        if value is None:
            raise DataError(f"example {example.id}: has no {name}, which task '{task}' "
                            "needs; choose a source that provides it")
        setattr(out, name, value)
    if "boxes" in keep:
        out.difficult = example.difficult
    return out


def resize(example: Example, size: tuple[int, int]) -> Example:
    """Stretch an Example to (height, width): bilinear image, nearest mask, scaled boxes."""
    h, w = example.image.shape[:2]
    if (h, w) == tuple(size):
        return example
    th, tw = size
    out = Example(id=example.id, label=example.label, box_labels=example.box_labels,
                  difficult=example.difficult,
                  image=geometry.fit_to_size(example.image, (th, tw), "stretch"))
    if example.mask is not None:
        out.mask = np.asarray(Image.fromarray(example.mask).resize((tw, th), Image.NEAREST))
    if example.boxes is not None:
        out.boxes = (np.asarray(example.boxes, np.float32)
                     * np.array([tw / w, th / h, tw / w, th / h], np.float32))
    return out


def split_indices(labels: np.ndarray | None, fractions: dict[str, float], seed: int,
                  count: int) -> dict[str, np.ndarray]:
    """Reproducible split of ``count`` examples by ``fractions``, stratified by label if given."""
    total = sum(fractions.values())
    if total <= 0:
        raise DataError("prepare: splits add up to 0; give train/val/test shares")
    shares = {k: v / total for k, v in fractions.items()}
    rng = np.random.default_rng(seed)
    groups = ([np.flatnonzero(labels == c) for c in np.unique(labels)] if labels is not None
              else [np.arange(count)])
    out: dict[str, list[int]] = {k: [] for k in shares}
    for group in groups:
        group = rng.permutation(group)
        start = 0
        names = list(shares)
        for i, name in enumerate(names):
            end = len(group) if i == len(names) - 1 else start + round(shares[name] * len(group))
            out[name].extend(group[start:end].tolist())
            start = end
    return {k: np.sort(np.asarray(v, np.int64)) for k, v in out.items()}


def _progress(examples: Iterable[Example], total: int, desc: str) -> Iterator[Example]:
    yield from progress(examples, total=total, desc=desc, unit="img", leave=True)


def _shapes_examples(seed: int, split: str, count: int, size: tuple[int, int]
                     ) -> Iterator[Example]:
    """The examples of one ``shapes`` split as the built TFDS dataset gives them back
    (``tfds_source.to_example`` over the features it stores), generated without building it:
    storing 5000 images as PNG in TFDS records only to decode them again took half the stage."""
    from visionpipe.data.sources import shapes

    for index, example in enumerate(shapes.generate(seed, split, count, size)):
        yield tfds_source.to_example(shapes.stored_features(example), index, split)


def _shapes_splits(cfg: PrepareConfig, seed: int, task: str):
    from visionpipe.data.sources import shapes

    sizes = {"train": int(cfg.splits.train), "val": int(cfg.splits.val),
             "test": int(cfg.splits.test)}
    size = tuple(cfg.image_size)
    config = shapes.shapes_config(size, sizes, seed)  # checks the settings, names the dataset
    source = {"kind": "shapes", "name": "shapes", "builder_config": config.name,
              "version": str(shapes.Shapes.VERSION), "seed": seed}
    splits = {s: (_shapes_examples(seed, s, n, size), n) for s, n in sizes.items()}
    names = list(shapes.CLASS_NAMES)  # the builder's ClassLabel names
    if task == "segmentation":  # shapes masks: 0 is background, k is shape class k-1
        names = ["background", *names]
    return source, names, splits


def _resplit(examples: list[Example], cfg: PrepareConfig, seed: int, task: str):
    """Pool ``examples`` and split them by params' shares, stratified by class if labelled."""
    labels = (np.array([ex.label for ex in examples]) if task == "classification" else None)
    fractions = {"train": cfg.splits.train, "val": cfg.splits.val, "test": cfg.splits.test}
    parts = split_indices(labels, fractions, seed, len(examples))
    return {s: ((examples[i] for i in idx), len(idx)) for s, idx in parts.items()}


def remap_mask(mask: np.ndarray, values: dict[int, str], where: str) -> np.ndarray:
    """Mask pixel values -> class ids in the order of ``values``; other values are an error
    naming ``where`` and the values found."""
    table = np.zeros(256, np.uint8)
    valid = np.zeros(256, bool)
    for class_id, value in enumerate(values):
        table[value], valid[value] = class_id, True
    bad = ~valid[mask]
    if bad.any():
        found, counts = np.unique(mask[bad], return_counts=True)
        shown = dict(zip(found.tolist(), counts.tolist(), strict=True))
        raise DataError(f"{where}: mask values {shown} (value: pixels) are not in mask_values "
                        f"{values}; add them to prepare.segmentation.mask_values")
    return table[mask]


def mask_classes(cfg: PrepareConfig) -> dict[int, str]:
    """prepare.segmentation.mask_values, or the known mapping of a catalog dataset."""
    from visionpipe.config import KNOWN_MASK_VALUES

    return dict(cfg.mask_values or KNOWN_MASK_VALUES[cfg.tfds_name])


# What a detection user without a local TFDS copy can do instead.
_VOC_ALTERNATIVE = ("or set prepare.detection.source: voc and put the images and their VOC "
                    "XML annotations under prepare.detection.path")


def fit_detection(example: Example, size: tuple[int, int], policy: str,
                  tally: tfds_source.BoxTally) -> Example:
    """``example`` at ``size`` as ``_box_splits`` fits it: the image by ``policy`` (pad:
    letterbox), the boxes moved with it by ``geometry.fit_boxes`` and clipped to the image. A
    box left without area (only a sub-pixel box can be, at float32) is dropped and listed in
    ``tally``."""
    hw = example.image.shape[:2]
    boxes = np.clip(geometry.fit_boxes(example.boxes, hw, size, policy), 0,
                    np.array([size[1], size[0]] * 2, np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        for i in np.flatnonzero(~keep):
            tally.dropped.append(f"{example.id}: object {int(i) + 1} (box "
                                 f"{', '.join(f'{v:g}' for v in example.boxes[i])} px in a "
                                 f"{hw[1]}x{hw[0]} image): no area left at {size[1]}x"
                                 f"{size[0]}")
        tally.boxes -= int((~keep).sum())
        tally.images_without_objects += bool(len(keep)) and not keep.any()
    return Example(id=example.id, image=geometry.fit_to_size(example.image, size, policy),
                   boxes=boxes[keep], box_labels=np.asarray(example.box_labels,
                                                            np.int32)[keep],
                   difficult=None if example.difficult is None else example.difficult[keep])


def _catalog_splits(cfg: PrepareConfig, seed: int, task: str):
    """A TFDS catalog dataset (a local copy in tfds_data_dir, or downloaded), all its splits
    pooled and split again by params' shares."""
    key = f"prepare.{task}"
    alternative = _VOC_ALTERNATIVE if task == "detection" else ""
    builder = tfds_source.catalog_builder(cfg.tfds_name, cfg.tfds_data_dir)
    if task == "detection":  # before any download: a dataset without boxes is no use
        tfds_source.class_names(builder, boxes=True)
    tfds_source.require_network(builder, name=cfg.tfds_name, task_key=key,
                                alternative=alternative)
    tfds_source.prepare_builder(builder, name=cfg.tfds_name, task_key=key, catalog=True,
                                alternative=alternative)
    values = mask_classes(cfg) if task == "segmentation" else None
    tally = tfds_source.BoxTally() if task == "detection" else None
    size = tuple(cfg.image_size)
    examples = []
    for split, count in tfds_source.split_sizes(builder).items():
        for ex in progress(tfds_source.iter_split(builder, split, tally), total=count,
                       desc=f"prepare {task}/read {split}", unit="img"):
            if task == "classification":
                ex.image = geometry.fit_to_size(ex.image, size, cfg.resize)
            elif task == "detection":
                ex = fit_detection(ex, size, cfg.resize, tally)
            else:
                if values is not None:
                    ex.mask = remap_mask(ex.mask, values, f"{cfg.tfds_name} {ex.id}")
                ex = resize(ex, size)
            examples.append(ex)
    source = {"kind": "tfds", "name": cfg.tfds_name, "version": str(builder.version),
              "data_dir": str(builder.data_dir), "seed": seed}
    if tally is not None:  # as the voc source records them
        source.update({"annotations": tally.counts(), "dropped_boxes": tally.dropped,
                       "difficult_boxes_kept": tally.difficult})
    splits = _resplit(examples, cfg, seed, task)
    if values is not None:
        names = list(values.values())
    else:
        names = tfds_source.class_names(builder, boxes=task == "detection")
    return source, names, splits


def _pairs_splits(cfg: PrepareConfig, seed: int, task: str, root: Path):
    from visionpipe.data.sources import mask_folder

    folder = archive.source_folder(cfg.path, root)
    names, examples, skipped, counts = mask_folder.load_pairs_counted(
        folder, cfg.mask_values, images=cfg.images_dir, masks=cfg.masks_dir,
        shown_root=cfg.path,
        progress=lambda files: progress(files, desc=f"prepare {task}/read", unit="pair"))
    examples = [resize(ex, cfg.image_size) for ex in examples]
    # pairs found, not pairs + skipped files: a pair with both files unreadable is one pair,
    # and stray files beside the pairs are none
    source = {"kind": "pairs", "name": shown_text(folder.name), "path": cfg.path, **counts,
              "seed": seed}
    return source, names, _resplit(examples, cfg, seed, task), [s.to_dict() for s in skipped]


def crops(example: Example, size: tuple[int, int]) -> Iterator[Example]:
    """Non-overlapping crops of ``size`` on a grid from the top-left corner (a remainder
    narrower than a crop is not used)."""
    ch, cw = size
    h, w = example.image.shape[:2]
    for r, top in enumerate(range(0, h - ch + 1, ch)):
        for c, left in enumerate(range(0, w - cw + 1, cw)):
            yield Example(id=f"{example.id}-r{r}c{c}",
                          image=example.image[top:top + ch, left:left + cw],
                          mask=example.mask[top:top + ch, left:left + cw])


def _folder_splits(cfg: PrepareConfig, seed: int, task: str, root: Path):
    folder = archive.source_folder(cfg.path, root)
    names, examples, skipped, counts = image_folder.load_folder_counted(
        folder, tuple(cfg.image_size), cfg.resize, shown_root=cfg.path,
        progress=lambda files: progress(files, desc=f"prepare {task}/read", unit="file"))
    source = {"kind": "folder", "name": shown_text(folder.name), "path": cfg.path,
              "files": len(examples) + len(skipped), "samples": len(examples), **counts,
              "seed": seed}
    return source, names, _resplit(examples, cfg, seed, task), [s.to_dict() for s in skipped]


def _load_boxes(cfg: PrepareConfig, folder: Path):
    """The detection source's BoxDataset: VOC XML, YOLO txt or COCO JSON under ``folder``."""
    if cfg.source == "voc":
        from visionpipe.data.sources import voc

        return voc.load_voc(folder / cfg.images_dir, folder / cfg.annotations_dir,
                            cfg.class_names, shown_root=cfg.path)
    if cfg.source == "yolo":
        from visionpipe.data.sources import yolo_txt

        return yolo_txt.load_yolo(folder, images=cfg.images_dir, labels=cfg.labels_dir,
                                  data_yaml=cfg.data_yaml, class_names=cfg.class_names,
                                  shown_root=cfg.path)
    from visionpipe.data.sources import coco

    return coco.load_coco(folder / cfg.annotations_file, folder / cfg.images_dir, root=folder,
                          shown_root=cfg.path)


def _box_splits(cfg: PrepareConfig, seed: int, task: str, root: Path):
    """Detection files (VOC, YOLO, COCO): images at their stored orientation (the boxes'
    frame), fitted to image_size by ``resize`` (pad: letterbox) with the boxes moved to match.

    The loaders read image headers only; an image whose pixels then fail to decode is skipped
    here and the dataset's counts are taken again from the samples written (a truncated JPEG
    once left the report one sample and its boxes above the records)."""
    folder = archive.source_folder(cfg.path, root)
    data = _load_boxes(cfg, folder)
    size = tuple(cfg.image_size)
    limit = np.array([size[1], size[0]] * 2, np.float32)
    kept, unreadable, examples = [], [], []
    for sample in progress(data.samples, desc=f"prepare {task}/read", unit="image"):
        try:
            image = image_folder.decode(sample.image, image_folder.to_uint8_rgb)
        except DataError as exc:  # the header read, the pixels did not
            unreadable.append(Skipped(sample.shown_image, f"{exc} (its annotation "
                                      f"{sample.shown_annotation} is not used)",
                                      reason_kind(str(exc))))
            continue
        boxes = np.clip(geometry.fit_boxes(sample.boxes, image.shape[:2], size, cfg.resize),
                        0, limit)
        gone = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if gone.any():  # only a sub-pixel box can lose its area, at float32
            sample = sample.without(gone, f"no area left at {size[1]}x{size[0]}")
            boxes = boxes[~gone]
        kept.append(sample)
        examples.append(Example(
            id=sample.id, image=geometry.fit_to_size(image, size, cfg.resize), boxes=boxes,
            box_labels=sample.class_ids.astype(np.int32), difficult=sample.difficult))
    data = data.keep(kept, unreadable)
    escaped = data.counts.pop("file_names_escaped", 0)
    source = {"kind": cfg.source, "name": shown_text(folder.name), "path": cfg.path,
              **({"file_names_escaped": escaped} if escaped else {}), "seed": seed,
              **({"annotations_file": cfg.annotations_file} if cfg.source == "coco" else {}),
              "annotations": data.counts, "dropped_boxes": data.dropped,
              "difficult_boxes_kept": data.counts["difficult_boxes"]}
    return (source, data.class_names, _resplit(examples, cfg, seed, task),
            [s.to_dict() for s in data.skipped])


def _report_skipped(task: str, skipped: list[dict], report: Path) -> None:
    if not skipped:
        return
    print(f"prepare {task}: skipped {len(skipped)} file(s), listed in {report}:",
          file=sys.stderr)
    for item in skipped[:20]:
        print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)


def run(params: Params, task: str, layout: Layout) -> dict:
    """Write data/prepared/<task>/ and return its manifest."""
    cfg = params.prepare_for(task)
    skipped: list[dict] = []
    if cfg.source == "shapes":
        # Generated here, never from a TFDS cache: the generator's code decides the bytes.
        source, names, splits = _shapes_splits(cfg, params.seed, task)
    elif cfg.source == "folder":
        source, names, splits, skipped = _folder_splits(cfg, params.seed, task,
                                                        layout.root)
    elif cfg.source == "pairs":
        source, names, splits, skipped = _pairs_splits(cfg, params.seed, task,
                                                       layout.root)
    elif cfg.source in BOX_SOURCES:
        source, names, splits, skipped = _box_splits(cfg, params.seed, task, layout.root)
    else:
        source, names, splits = _catalog_splits(cfg, params.seed, task)
    crop = tuple(cfg.crop_size) if cfg.crop_size else None
    per_image = (cfg.image_size[0] // crop[0]) * (cfg.image_size[1] // crop[1]) if crop else 1
    manifest_splits, class_counts, class_pixels = {}, {}, {}
    written: Counter = Counter()  # examples (before cropping) and boxes, every split
    with fresh_dir(layout.prepared(task)) as out:
        for split, (examples, total) in splits.items():
            counter: Counter = Counter()
            pixels = np.zeros(len(names), np.int64)
            cut = crop is not None and split != "test"  # test images stay whole
            total = total * per_image if cut else total

            def kept(examples=examples, counter=counter, pixels=pixels, cut=cut):
                for ex in examples:
                    ex = keep_targets(ex, task)
                    written["samples"] += 1
                    written["boxes"] += 0 if ex.boxes is None else len(ex.boxes)
                    if ex.label is not None:
                        counter[names[ex.label]] += 1
                    if ex.box_labels is not None:  # detection: boxes per class
                        counter.update(names[i] for i in ex.box_labels)
                    for part in (crops(ex, crop) if cut else [ex]):
                        if part.mask is not None:
                            pixels += np.bincount(part.mask.ravel(),
                                                  minlength=len(names))[:len(names)]
                        yield part

            count, shards = records.write_split(
                _progress(kept(), total, f"prepare {task}/{split}"), out, split,
                cfg.shard_size)
            if count == 0:
                raise DataError(f"prepare.{task}: split '{split}' is empty; give it a "
                                "larger share in params.yaml")
            manifest_splits[split] = {"count": count, "shards": shards}
            if counter:
                class_counts[split] = {n: counter.get(n, 0) for n in names}
            if pixels.any():
                class_pixels[split] = dict(zip(names, pixels.tolist(), strict=True))
        check_counts(task, source, skipped, written)
        warnings = escaped_names(source) + absent_classes(task, names, class_counts,
                                                          class_pixels)
        manifest = {
            "task": task,
            "source": source,
            "class_names": names,
            # What the model trains on; test images are test_image_size.
            "image_size": list(crop or cfg.image_size),
            "test_image_size": list(cfg.image_size),
            "targets": list(TASK_TARGETS[task]),
            "counts": {s: v["count"] for s, v in manifest_splits.items()},
            "class_counts": class_counts,
            **({"class_pixels": class_pixels} if class_pixels else {}),
            "skipped": {"count": len(skipped),
                        "by_reason": dict(Counter(x.get("kind") or reason_kind(x["reason"])
                                                  for x in skipped)),
                        "items": skipped},
            "warnings": warnings,
            "resize": cfg.resize,
            "shard_size": cfg.shard_size,
            "splits": manifest_splits,
        }
        manifest = records.write_manifest(out, manifest)
    report = layout.prepare_report(task)
    records.write_json(report, {
        "task": task, "source": source, "counts": manifest["counts"],
        "class_counts": class_counts, **({"class_pixels": class_pixels} if class_pixels else {}),
        "skipped": manifest["skipped"], "warnings": warnings,
        "checksum": manifest["checksum"]})
    _report_skipped(task, skipped, report.relative_to(layout.root))
    for line in warnings:
        print(f"prepare {task}: warning: {line}", file=sys.stderr)
    counts = manifest["counts"]
    print(f"prepare@{task}: {source.get('name') or cfg.source}: "
          + ", ".join(f"{counts[s]} {s}" for s in counts)
          + f" images, {len(names)} classes, {len(skipped)} skipped; "
          f"report: {report.relative_to(layout.root)}", flush=True)
    from visionpipe.data.stats import describe  # class balance, boxes, masks: data/stats.py
    describe(layout.prepared(task), task, names, layout.data_stats(task))
    return manifest


def declared_counts(source: dict, skipped: list[dict]) -> dict[str, int]:
    """What the report says was taken from the source: samples (and boxes), from its own
    counts. Generated and catalog sources state none."""
    annotations = source.get("annotations") or {}
    if "samples" in annotations:  # voc, yolo, coco
        return {"samples": annotations["samples"], "boxes": annotations["boxes"]}
    if source.get("kind") == "folder":
        return {"samples": source["files"] - len(skipped)}
    if source.get("kind") == "pairs":
        return {"samples": source["pairs"] - source["pairs_unreadable"]}
    return {}


def check_counts(task: str, source: dict, skipped: list[dict], written: Counter) -> None:
    """The report's counts must be the records written: a mismatch is a bug in prepare (the
    truncated-JPEG one: a sample counted before its pixels failed to decode), so it stops the
    stage before anything is kept rather than publish wrong figures."""
    declared = declared_counts(source, skipped)
    wrong = {k: (v, written[k]) for k, v in declared.items() if v != written[k]}
    if wrong:
        detail = "; ".join(f"{k}: report {a}, written {b}" for k, (a, b) in wrong.items())
        raise RuntimeError(f"prepare.{task}: the report's counts disagree with the records "
                           f"written ({detail}); this is a bug in visionpipe, please report it")


def escaped_names(source: dict) -> list[str]:
    """A warning when file names were not UTF-8: kept, but shown with escapes (the source's
    ``file_names_escaped``, set by the folder sources only when there are such names)."""
    count = source.get("file_names_escaped", 0)
    if not count:
        return []
    return [f"{count} file or folder name(s) under {source.get('path')} are not valid UTF-8 "
            "(or hold control characters): the images are kept, and their ids and paths in "
            "the records and reports write those bytes as backslash escapes (\\xff); rename "
            "them to UTF-8 to see the names as they are"]


def absent_classes(task: str, names: list[str], class_counts: dict, class_pixels: dict
                   ) -> list[str]:
    """One line per split missing some class. A class with no training image (classification)
    or box (detection) is an error: the model could never predict it. Elsewhere it is a
    warning: that class's validation or test figures are not measured."""
    found = class_pixels if task == "segmentation" else class_counts
    unit = {"classification": "image", "detection": "box"}.get(task, "pixel")
    lines = []
    for split, counts in found.items():
        missing = [n for n in names if not counts.get(n)]
        if not missing:
            continue
        if split == "train" and task != "segmentation":
            raise DataError(f"prepare.{task}: no training {unit} of class(es) "
                            f"{', '.join(missing)}: the model could never predict them; add "
                            f"images of them, or give train a larger share in "
                            f"prepare.{task}.splits")
        lines.append(f"split '{split}' has no {unit} of class(es) {', '.join(missing)}; "
                     f"their {split} figures will not be measured (more images, or a larger "
                     f"{split} share in prepare.{task}.splits)")
    return lines

