"""Fine-tuning from a backbone pretrained on local data against training from scratch, on the
245 hymenoptera photos (docs/transfer-learning.md, "Measured here").

1. The default ``mobilenet`` model (MobileNetV2 at width 0.35, random weights) trains on the
   embedded shapes data, as ``train@mobilenet`` does; its model.keras becomes
   ``weights/mobilenet_shapes.keras`` of a work folder.
2. Hymenoptera is prepared as in examples/hymenoptera (128x128 centre crops, 70/15/15 split,
   seed 42), with 2 augmented copies of each train photo.
3. For each seed: ``scratch`` (random weights) and ``tuned`` (from mobilenet_shapes.keras: 3
   epochs with the backbone frozen, then all layers at 3e-4) train 12 epochs each (Adam 1e-3,
   cosine, the best val_accuracy epoch kept) and are evaluated on the 36 test photos. Only the
   training seed changes: the split and the augmented copies stay those of seed 42.

Usage: python scripts/transfer_hymenoptera.py WORK_DIR [SEED ...]   (default seeds 1 2 3)
Rows go to WORK_DIR/results.jsonl; the summary is printed. Datasets: VISIONPIPE_DATASETS or
../shared/datasets. MLflow and codecarbon are off. About 15 min for 3 seeds on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

from visionpipe.config import parse_params
from visionpipe.layout import Layout
from visionpipe.stages import augment, evaluate, prepare, train

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("VISIONPIPE_DATASETS", REPO.parent / "shared" / "datasets"))


def copy(data: dict) -> dict:
    return json.loads(json.dumps(data))


def main(root: Path, seeds: list[int]) -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["tracking"].update(mlflow=False, codecarbon=False)
    layout = Layout(root)
    start = root / "weights" / "mobilenet_shapes.keras"
    if not start.exists():  # 1. the backbone pretrained on local data
        root.mkdir(parents=True, exist_ok=True)
        params = parse_params(copy(base))
        prepare.run(params, "classification", layout)
        augment.run(params, "classification", layout)
        train.run(params, "mobilenet", layout)
        start.parent.mkdir(exist_ok=True)
        shutil.copy(root / "models/mobilenet/model.keras", start)
        shutil.rmtree(root / "data")
    # 2. hymenoptera as in the example, 2 augmented copies
    data = copy(base)
    example = yaml.safe_load((REPO / "examples/hymenoptera/params.yaml").read_text())
    data["prepare"]["classification"].update(example["prepare"]["classification"],
                                             path=str(DATASETS / "hymenoptera"))
    data["augment"]["classification"].update(example["augment"]["classification"], copies=2)
    model = data["models"]["mobilenet"]
    model["train"].update(epochs=12, batch_size=32, learning_rate=1e-3, lr_schedule="cosine",
                          monitor="val_accuracy")
    tuned = copy(model)
    tuned["architecture"]["weights"] = "weights/mobilenet_shapes.keras"
    tuned["train"].update(freeze_epochs=3, unfreeze="all", fine_tune_learning_rate=3e-4)
    data["models"] = {"scratch": model, "tuned": tuned}
    params = parse_params(copy(data))
    prepare.run(params, "classification", layout)
    augment.run(params, "classification", layout)
    rows = []
    for seed in seeds:  # 3. only the training seed changes
        for name in ("scratch", "tuned"):
            began = time.time()
            seeded = parse_params({**copy(data), "seed": seed})
            meta = train.run(seeded, name, layout)
            metrics = evaluate.run(seeded, name, layout)
            row = {"seed": seed, "model": name, "test_accuracy": metrics["test"]["accuracy"],
                   "test_images": metrics["test"]["num_test_images"],
                   "kept_epoch": meta["kept_epoch"],
                   "val_accuracy": meta["kept_epoch_metrics"].get("val_accuracy"),
                   "seconds": round(time.time() - began, 1)}
            rows.append(row)
            with open(root / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    for name in ("scratch", "tuned"):
        accuracy = [r["test_accuracy"] for r in rows if r["model"] == name]
        spread = f" sd {statistics.stdev(accuracy):.3f}" if len(accuracy) > 1 else ""
        print(f"{name}: test accuracy {', '.join(f'{a:.3f}' for a in accuracy)}; "
              f"mean {statistics.mean(accuracy):.3f}{spread}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), [int(a) for a in sys.argv[2:]] or [1, 2, 3])
