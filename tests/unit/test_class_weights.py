"""Class weights: params' list or ``balanced`` from the train split's counts, the weighted
classification and detection losses, and the resolved weights as MLflow logs them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from visionpipe import class_weights
from visionpipe.config import TrainConfig
from visionpipe.data import records
from visionpipe.data.example import Example
from visionpipe.errors import ParamsError
from visionpipe.tasks.classification import ClassificationTask, ClassWeightedCrossentropy
from visionpipe.tasks.detection import ClassWeightedBinaryCrossentropy
from visionpipe.tracking.stage_logs import class_weight_params

KEY = "models.m.train.class_weights"
NAMES = ["ant", "bee", "wasp"]


def _train_split(folder, task: str, examples: list[Example]):
    """``examples`` as the train split of ``folder``, written by the project's records writer
    (two shards), with its manifest."""
    count, shards = records.write_split(examples, folder, "train", shard_size=4)
    records.write_manifest(folder, {"task": task, "class_names": NAMES, "image_size": [4, 4],
                                    "splits": {"train": {"count": count, "shards": shards}}})
    return folder


def _image() -> np.ndarray:
    return np.zeros((4, 4, 3), np.uint8)


def test_balanced_is_n_over_k_times_count_of_images_per_class(tmp_path):
    labels = [0] * 6 + [1] * 3 + [2]  # 10 images: 6 ants, 3 bees, 1 wasp
    folder = _train_split(tmp_path, "classification",
                          [Example(f"i{i}", _image(), label=k) for i, k in enumerate(labels)])
    assert class_weights.train_counts(folder, "classification", 3).tolist() == [6, 3, 1]
    weights = class_weights.resolve("balanced", folder, "classification", NAMES, KEY)
    assert weights == (10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1))
    assert class_weights.as_mapping(weights, NAMES) == {"ant": 10 / 18, "bee": 10 / 9,
                                                        "wasp": 10 / 3}
    assert class_weights.as_mapping(None, NAMES) is None


def test_balanced_counts_boxes_for_detection_and_pixels_for_segmentation(tmp_path):
    boxes = [[0, 1, 1], [0, 0], [], [2, 0, 0, 0]]  # box classes per image: 6, 2 and 1 boxes
    detection = [Example(f"d{i}", _image(), boxes=np.tile([0, 0, 2, 2], (len(b), 1)),
                         box_labels=np.array(b, np.int32)) for i, b in enumerate(boxes)]
    folder = _train_split(tmp_path / "det", "detection", detection)
    assert class_weights.resolve("balanced", folder, "detection", NAMES, KEY) == (
        9 / (3 * 6), 9 / (3 * 2), 9 / (3 * 1))
    masks = [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]
    masks[2][0, :3] = 2  # 29 pixels of class 0, 16 of class 1, 3 of class 2
    segmentation = [Example(f"s{i}", _image(), mask=m) for i, m in enumerate(masks)]
    folder = _train_split(tmp_path / "seg", "segmentation", segmentation)
    assert class_weights.train_counts(folder, "segmentation", 3).tolist() == [29, 16, 3]
    assert class_weights.resolve("balanced", folder, "segmentation", NAMES, KEY) == (
        48 / (3 * 29), 48 / (3 * 16), 48 / (3 * 3))


def test_a_list_is_kept_and_needs_one_weight_per_class(tmp_path):
    assert class_weights.resolve(None, tmp_path, "classification", NAMES, KEY) is None
    assert class_weights.resolve((1, 2.5, 0), tmp_path, "detection", NAMES, KEY) == (
        1.0, 2.5, 0.0)
    with pytest.raises(ParamsError) as err:
        class_weights.resolve((1.0, 2.0), tmp_path, "classification", NAMES, KEY)
    assert str(err.value) == ("params.yaml: models.m.train.class_weights = [1.0, 2.0]: "
                              "expected one weight per class, 3 in class order (ant, bee, "
                              "wasp); or 'balanced'")


def test_balanced_refuses_a_class_the_train_split_lacks(tmp_path):
    folder = _train_split(tmp_path, "classification",
                          [Example(f"i{i}", _image(), label=i % 2) for i in range(6)])
    with pytest.raises(ParamsError) as err:
        class_weights.resolve("balanced", folder, "classification", NAMES, KEY)
    assert str(err.value) == (
        "params.yaml: models.m.train.class_weights = 'balanced': the train split has no images "
        "of class 'wasp', so its weight would be infinite; give a list of 3 weights in class "
        "order (ant, bee, wasp) instead")


def test_balanced_refuses_a_weight_above_what_a_list_may_hold():
    with pytest.raises(ParamsError) as err:
        class_weights.balanced([2999, 1], ["common", "rare"], KEY, "boxes")
    assert str(err.value) == (
        "params.yaml: models.m.train.class_weights = 'balanced': class 'rare' would weigh 1500 "
        "(1 of 3000 boxes in the train split), more than 1000; give a list of 2 weights in "
        "class order (common, rare) instead")


# ------------------------------------------------------------------ classification loss

Y_TRUE = np.eye(3, dtype=np.float32)[[0, 2, 1, 2]]
Y_PRED = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25], [0.5, 0.3, 0.2]],
                  np.float32)


def _loss(weights, smoothing=0.0) -> keras.losses.Loss:
    return ClassificationTask().loss(TrainConfig(class_weights=weights,
                                                 label_smoothing=smoothing), 3)


def test_weighted_cross_entropy_is_the_weighted_mean_of_the_images_terms():
    weights = (0.5, 2.0, 4.0)
    per_image = -np.log(Y_PRED[np.arange(4), [0, 2, 1, 2]].astype(np.float64))
    expected = np.mean(per_image * np.array([0.5, 4.0, 2.0, 4.0]))
    got = float(_loss(weights)(Y_TRUE, Y_PRED))
    assert got == pytest.approx(expected, rel=1e-6)
    # Label smoothing 0.3 over 3 classes: targets 0.8 and 0.1, the weights of the true class.
    smooth = np.where(Y_TRUE > 0, 0.8, 0.1)
    terms = -(smooth * np.log(Y_PRED.astype(np.float64))).sum(axis=1)
    assert float(_loss(weights, 0.3)(Y_TRUE, Y_PRED)) == pytest.approx(
        np.mean(terms * [0.5, 4.0, 2.0, 4.0]), rel=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_unweighted_is_todays_loss_and_weights_of_one_give_it_exactly(smoothing):
    today = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    unweighted = _loss(None, smoothing)
    assert type(unweighted) is keras.losses.CategoricalCrossentropy
    assert unweighted.get_config() == today.get_config()
    ones = _loss((1.0, 1.0, 1.0), smoothing)
    assert isinstance(ones, ClassWeightedCrossentropy)
    assert float(ones(Y_TRUE, Y_PRED)) == float(today(Y_TRUE, Y_PRED))


def test_a_model_compiled_with_the_weighted_loss_reloads_in_safe_mode(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss=_loss((0.5, 2.0, 4.0), 0.1))
    x = np.random.default_rng(0).uniform(0, 1, (4, 4, 4, 3)).astype(np.float32)
    model.train_on_batch(x, Y_TRUE)  # builds the optimizer's variables, saved with it
    path = tmp_path / "model.keras"
    model.save(path)
    back = keras.models.load_model(path, safe_mode=True)
    assert isinstance(back.loss, ClassWeightedCrossentropy)
    assert (back.loss.class_weights, back.loss.label_smoothing) == ([0.5, 2.0, 4.0], 0.1)
    assert back.evaluate(x, Y_TRUE, verbose=0) == pytest.approx(
        model.evaluate(x, Y_TRUE, verbose=0), rel=1e-6)


def _rare_class_recall(weights) -> float:
    """Recall of the rare class of a softmax regression trained on 2-D points, 90% of class 0
    around (0, 0) and 10% of class 1 around (1, 1), both with unit spread, judged on new
    points of class 1."""
    rng = np.random.default_rng(0)
    counts = (450, 50)
    x = np.concatenate([rng.normal(0.0, 1.0, (counts[0], 2)),
                        rng.normal(1.0, 1.0, (counts[1], 2))]).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[np.repeat([0, 1], counts)]
    test = rng.normal(1.0, 1.0, (2000, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.1),
                  loss=ClassificationTask().loss(TrainConfig(class_weights=weights), 2))
    steps = 150  # full-batch steps, as one epoch of the points repeated (fast)
    model.fit(np.tile(x, (steps, 1)), np.tile(y, (steps, 1)), batch_size=len(x), epochs=1,
              shuffle=False, verbose=0)
    return float((model.predict(test, batch_size=2000, verbose=0).argmax(1) == 1).mean())


def test_balanced_weights_raise_the_rare_class_recall():
    """Unweighted, the 9:1 prior pushes the boundary towards the rare class (Bayes-optimal
    recall 0.20 here); balanced (5/9, 5) moves it to the middle (0.76)."""
    balanced = class_weights.balanced([450, 50], ["common", "rare"], KEY)
    assert balanced == (500 / 900, 5.0)
    plain, weighted = _rare_class_recall(None), _rare_class_recall(balanced)
    # Seed 0 gives 0.18 and 0.82; seeds 0-5 gave 0.18-0.29 and 0.70-0.82.
    assert plain < 0.4 and weighted > 0.6, (plain, weighted)


# ----------------------------------------------------------------------- detection loss

# 2 images x 3 anchors x 2 classes of sigmoid targets (keras-cv's target scores) and scores.
T = np.array([[[0.9, 0.0], [0.0, 0.0], [0.0, 0.6]],
              [[0.0, 0.0], [0.0, 0.8], [0.3, 0.0]]], np.float32)
P = np.array([[[0.8, 0.2], [0.1, 0.3], [0.4, 0.5]],
              [[0.2, 0.1], [0.3, 0.7], [0.6, 0.05]]], np.float32)


def _bce(t, p):
    t, p = t.astype(np.float64), p.astype(np.float64)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def test_weighted_class_loss_weights_each_class_column():
    """keras-cv sums the per-anchor loss (reduction "sum") and scales it by a sample weight
    (class_loss_weight / the targets' sum)."""
    loss = ClassWeightedBinaryCrossentropy([2.0, 0.5], reduction="sum")
    expected = (_bce(T, P) * [2.0, 0.5]).mean(axis=-1).sum() * 0.25
    assert float(loss(T, P, sample_weight=0.25)) == pytest.approx(expected, rel=1e-6)


def test_class_weights_of_one_give_keras_cv_loss_and_zero_drops_a_class():
    keras_cv_loss = keras.losses.BinaryCrossentropy(reduction="sum")  # YOLOv8's
    ones = ClassWeightedBinaryCrossentropy([1.0, 1.0], reduction="sum")
    assert float(ones(T, P)) == float(keras_cv_loss(T, P))
    no_bees = ClassWeightedBinaryCrossentropy([1.0, 0.0], reduction="sum")
    other = P.copy()
    other[..., 1] = [[0.9, 0.01, 0.5], [0.4, 0.02, 0.99]]  # any scores for class 1
    assert float(no_bees(T, P)) == float(no_bees(T, other))
    assert float(no_bees(T, P)) == pytest.approx(_bce(T, P)[..., 0].sum() / 2, rel=1e-6)


def test_yolo_compiles_the_weighted_class_loss_only_when_weighted(tmp_path):
    """Through the detection task on a tiny YOLOv8: no weights keep keras-cv's loss; weights
    of one give its value; a zero weight on a class changes it; the model saves and reloads
    in safe mode."""
    from visionpipe.models.registry import create_model, parse_architecture
    from visionpipe.models.saving import load_model
    from visionpipe.tasks.registry import task_for

    tiny = {"variant": "n", "width_multiplier": 0.25, "depth_multiplier": 0.1}
    arch = parse_architecture("yolo", tiny, "models.det.architecture")
    model = create_model("yolo", (32, 32, 3), 2, tiny)
    task = task_for("yolo", "detection")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    y = {"boxes": np.array([[[2, 2, 14, 14], [16, 16, 30, 30]], [[4, 4, 20, 20], [-1] * 4]],
                           np.float32),
         "classes": np.array([[0, 1], [1, -1]], np.float32)}
    raw = model(x, training=False)

    def loss(weights):
        task.compile(model, keras.optimizers.Adam(), TrainConfig(class_weights=weights),
                     arch, 2)
        return float(model.compute_loss(x, y, raw))

    today = loss(None)
    assert type(model.classification_loss) is keras.losses.BinaryCrossentropy
    assert loss((1.0, 1.0)) == today
    assert model.classification_loss.class_weights == [1.0, 1.0]
    assert loss((1.0, 0.0)) < today < loss((3.0, 3.0))
    loss((2.0, 0.5))
    model.save(tmp_path / "model.keras")
    back = load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(back(x, training=False)["classes"], raw["classes"], atol=1e-6)


# ----------------------------------------------------------------------------- MLflow param

def test_resolved_weights_become_one_mlflow_param_in_class_order():
    meta = {"class_weights": {"ant": 10 / 18, "bee": 10 / 9, "wasp": 10 / 3}}
    assert class_weight_params(meta) == {
        "class_weights_resolved": "ant=0.555556, bee=1.11111, wasp=3.33333"}
    assert class_weight_params({"class_weights": None}) == {}
    assert class_weight_params({}) == {}  # a model.json from before class weights
    many = {"class_weights": {f"class_{i:04d}": 1.0 for i in range(1000)}}
    assert class_weight_params(many) == {
        "class_weights_resolved": "1000 classes: see the class_weights of train/model.json"}
