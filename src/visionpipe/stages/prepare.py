"""prepare: a task's source -> validated train/val/test TFRecord shards plus manifest.json."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from visionpipe.config import Params, PrepareConfig
from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.data.sources import tfds_source
from visionpipe.errors import DataError
from visionpipe.layout import Layout
from visionpipe.stages.common import fresh_dir

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
    return out


def resize(example: Example, size: tuple[int, int]) -> Example:
    """Stretch an Example to (height, width): bilinear image, nearest mask, scaled boxes."""
    h, w = example.image.shape[:2]
    if (h, w) == tuple(size):
        return example
    th, tw = size
    out = Example(id=example.id, label=example.label, box_labels=example.box_labels,
                  image=np.asarray(Image.fromarray(example.image).resize((tw, th),
                                                                         Image.BILINEAR)))
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
    yield from tqdm(examples, total=total, desc=desc, unit="img", leave=True)


def _shapes_splits(cfg: PrepareConfig, seed: int, task: str, tfds_dir: str):
    from visionpipe.data.sources import shapes

    sizes = {"train": int(cfg.splits.train), "val": int(cfg.splits.val),
             "test": int(cfg.splits.test)}
    builder = shapes.load_shapes_builder(tuple(cfg.image_size), sizes, seed, tfds_dir)
    tfds_source.prepare_builder(builder, name="shapes", task_key=f"prepare.{task}")
    source = {"kind": "shapes", "name": "shapes", "builder_config": builder.builder_config.name,
              "version": str(builder.version), "seed": seed}
    splits = {s: (tfds_source.iter_split(builder, s), n) for s, n in sizes.items()}
    return source, tfds_source.class_names(builder), splits


def _catalog_splits(cfg: PrepareConfig, seed: int, task: str):
    builder = tfds_source.catalog_builder(cfg.tfds_name, cfg.tfds_data_dir)
    tfds_source.prepare_builder(builder, name=cfg.tfds_name, task_key=f"prepare.{task}")
    examples = [resize(ex, cfg.image_size)
                for split in tfds_source.split_sizes(builder)
                for ex in tfds_source.iter_split(builder, split)]
    labels = (np.array([ex.label for ex in examples]) if task == "classification" else None)
    fractions = {"train": cfg.splits.train, "val": cfg.splits.val, "test": cfg.splits.test}
    parts = split_indices(labels, fractions, seed, len(examples))
    source = {"kind": "tfds", "name": cfg.tfds_name, "version": str(builder.version),
              "seed": seed}
    splits = {s: ((examples[i] for i in idx), len(idx)) for s, idx in parts.items()}
    return source, tfds_source.class_names(builder), splits


def run(params: Params, task: str, layout: Layout) -> dict:
    """Write data/prepared/<task>/ and return its manifest."""
    cfg = params.prepare_for(task)
    with tempfile.TemporaryDirectory(prefix="visionpipe-tfds-") as tfds_dir:
        if cfg.source == "shapes":
            # A throwaway TFDS folder: the generator's code, not a stale cache, decides bytes.
            source, names, splits = _shapes_splits(cfg, params.seed, task, tfds_dir)
        else:
            source, names, splits = _catalog_splits(cfg, params.seed, task)
        manifest_splits, class_counts = {}, {}
        with fresh_dir(layout.prepared(task)) as out:
            for split, (examples, total) in splits.items():
                counter: Counter = Counter()

                def kept(examples=examples, counter=counter):
                    for ex in examples:
                        ex = keep_targets(ex, task)
                        if ex.label is not None:
                            counter[names[ex.label]] += 1
                        yield ex

                count, shards = records.write_split(
                    _progress(kept(), total, f"prepare {task}/{split}"), out, split,
                    cfg.shard_size)
                if count == 0:
                    raise DataError(f"prepare.{task}: split '{split}' is empty; give it a "
                                    "larger share in params.yaml")
                manifest_splits[split] = {"count": count, "shards": shards}
                if counter:
                    class_counts[split] = {n: counter.get(n, 0) for n in names}
            manifest = {
                "task": task,
                "source": source,
                "class_names": names,
                "image_size": list(cfg.image_size),
                "targets": list(TASK_TARGETS[task]),
                "counts": {s: v["count"] for s, v in manifest_splits.items()},
                "class_counts": class_counts,
                "skipped": {"count": 0, "items": []},
                "shard_size": cfg.shard_size,
                "splits": manifest_splits,
            }
            manifest = records.write_manifest(out, manifest)
    return manifest
