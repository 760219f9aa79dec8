"""`visionpipe predict`: an exported model on a folder of new images.

Reads only the export folder (``export.json`` and the chosen format's file) through
:mod:`visionpipe.serving`; no training code, params of the model or dataset are needed, so
it runs where only ``models/<model>/export/`` was pulled.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visionpipe.atomic import atomic_path
from visionpipe.data import records
from visionpipe.data.sources.image_folder import Skipped, load_image
from visionpipe.errors import DataError, ModelError
from visionpipe.serving import FILES, open_runner, predict_images, read_meta

PREDICTIONS_FILE = "predictions.json"


def list_files(input_dir: Path, exclude: Path | None = None) -> list[Path]:
    """Every file under ``input_dir`` (hidden ones, and the folder ``exclude``, aside), in a
    stable order."""
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found; pass --input a folder of images")
    skip = exclude.resolve() if exclude is not None else None
    files = []
    for dirpath, dirnames, filenames in os.walk(input_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (Path(dirpath) / d).resolve() != skip)
        files.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
    return files


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


def predict_folder(export_dir: Path, input_dir: Path, output_dir: Path, fmt: str, top_k: int,
                   render: bool) -> dict:
    """Predict every image under ``input_dir``; write predictions.json (one record per image,
    plus every skipped file with its reason) and, with ``render``, labelled copies."""
    meta = read_meta(export_dir)
    if "visionpipe_predict" not in meta:
        raise ModelError(f"{export_dir}: export.json does not say whether visionpipe predict "
                         "runs this export (an export of an older visionpipe); rerun `dvc repro "
                         "export@<model>`")
    if not meta["visionpipe_predict"]:
        raise ModelError(f"{export_dir}: a {meta.get('task')} export; visionpipe predict does "
                         "not run those yet (load saved_model with tf.saved_model.load)")
    runner = open_runner(export_dir, fmt, meta)
    names, size, policy = meta["class_names"], tuple(meta["image_size"]), meta["resize"]
    images, used, skipped = [], [], []
    for path in list_files(input_dir, exclude=output_dir):  # an output inside the input
        rel = path.relative_to(input_dir).as_posix()
        try:
            images.append(load_image(path))
            used.append(rel)
        except DataError as exc:
            skipped.append(Skipped(rel, str(exc)))
    if not images:
        raise DataError(f"{input_dir}: no image could be read ({len(skipped)} file(s) skipped"
                        + (f", e.g. {skipped[0].path}: {skipped[0].reason}" if skipped else "")
                        + "); pass a folder of JPEG/PNG/BMP/GIF images")
    scores = predict_images(runner, images, size, policy)
    k = min(top_k, len(names))
    predictions = []
    for rel, image, row in zip(used, images, scores, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        predictions.append({
            "file": rel, "height": int(image.shape[0]), "width": int(image.shape[1]),
            "class_id": int(order[0]), "class_name": names[order[0]],
            "score": float(row[order[0]]),
            "top_k": [{"class_name": names[i], "score": float(row[i])} for i in order]})
    output_dir.mkdir(parents=True, exist_ok=True)
    if render:
        for rec, image in zip(predictions, images, strict=True):
            with atomic_path(output_dir / "rendered" / f"{rec['file']}.png") as tmp:
                render_label(image, f"{rec['class_name']} {rec['score']:.2f}").save(tmp)
    result = {
        "model": meta.get("model"), "task": meta["task"], "format": fmt,
        "model_file": str(Path(export_dir) / FILES[fmt]), "input": str(input_dir),
        "class_names": names, "count": len(predictions),
        "skipped": {"count": len(skipped), "items": [s.to_dict() for s in skipped]},
        "predictions": predictions,
    }
    records.write_json(output_dir / PREDICTIONS_FILE, result)
    return result


def run(args, params_predict) -> None:
    """The CLI command: resolve the export folder and format, predict, print a summary."""
    export_dir = args.export_dir or args.root / "models" / args.model / "export"
    fmt = args.format or params_predict.format
    result = predict_folder(export_dir, args.input, args.output, fmt, params_predict.top_k,
                            params_predict.render)
    skipped = result["skipped"]
    print(f"predicted {result['count']} image(s) with {fmt} ({result['model_file']}); "
          f"wrote {args.output / PREDICTIONS_FILE}")
    if skipped["count"]:
        print(f"skipped {skipped['count']} file(s) that are not readable images:",
              file=sys.stderr)
        for item in skipped["items"]:
            print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
