"""augment: an augmented, materialised copy of a task's train split plus a preview grid."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import asdict

from visionpipe import plots
from visionpipe.config import Params
from visionpipe.console import progress
from visionpipe.data import records
from visionpipe.data.augment import augment_example
from visionpipe.data.example import Example
from visionpipe.data.pipeline import damaged_records
from visionpipe.drawing import overlay
from visionpipe.layout import Layout
from visionpipe.stages.common import fresh_dir

# Mosaic partners are drawn from the last this-many train images read: memory stays bounded,
# and prepare has already shuffled the split, so they are a random sample of it.
MOSAIC_POOL = 64


def _tile(ex: Example):
    return overlay(ex.image, ex.mask, ex.boxes, ex.box_labels)


def run(params: Params, task: str, layout: Layout) -> dict:
    """Write data/augmented/<task>/ (originals, if kept, then copies) and the preview PNG."""
    cfg = params.augment_for(task)
    src = layout.prepared(task)
    restore = records.restore_hint(src, layout.root)
    src_manifest = records.verify_shards(src, restore)  # a damaged shard: one line
    n_train = src_manifest["splits"]["train"]["count"]
    total = n_train * (cfg.copies + int(cfg.keep_original))
    stats = {"boxes_dropped": 0}
    preview: list[Example] = []
    pool: deque[Example] = deque(maxlen=MOSAIC_POOL)

    def examples() -> Iterator[Example | bytes]:
        for i, record in enumerate(records.read_records(src, "train")):
            ex = records.deserialize(record)
            if cfg.keep_original:
                # The record as prepare wrote it: serialising what it decodes to gives these
                # same bytes (lossless PNG), only slower.
                yield record
            for copy in range(cfg.copies):
                aug, dropped = augment_example(ex, cfg, params.seed, copy, i, pool)
                stats["boxes_dropped"] += dropped
                if copy == 0 and len(preview) < 2 * cfg.preview:
                    preview.extend([ex, aug])
                yield aug
            if cfg.copies == 0 and len(preview) < cfg.preview:
                preview.append(ex)
            if cfg.mosaic:
                pool.append(ex)

    with fresh_dir(layout.augmented(task)) as out, damaged_records({src: restore}):
        count, shards = records.write_split(
            progress(examples(), total=total, desc=f"augment {task}", unit="img"), out, "train",
            src_manifest["shard_size"])
        manifest = {
            "task": task,
            "source": {"kind": "augmented", "from": str(src.relative_to(layout.root)),
                       "from_checksum": src_manifest["checksum"], "seed": params.seed},
            "class_names": src_manifest["class_names"],
            "image_size": src_manifest["image_size"],
            "targets": src_manifest["targets"],
            "augment": asdict(cfg),
            "counts": {"train": count, "original": n_train if cfg.keep_original else 0,
                       "augmented": n_train * cfg.copies},
            "boxes_dropped": stats["boxes_dropped"],
            "shard_size": src_manifest["shard_size"],
            "splits": {"train": {"count": count, "shards": shards}},
        }
        manifest = records.write_manifest(out, manifest)
    # Columns of 8: with copies, each original sits left of its first augmented copy.
    plots.image_grid([_tile(ex) for ex in preview], 8, layout.augment_preview(task))
    print(f"augment@{task}: {count} train images ({manifest['counts']['original']} "
          f"original, {manifest['counts']['augmented']} augmented); preview: "
          f"{layout.augment_preview(task).relative_to(layout.root)}", flush=True)
    return manifest
