"""`visionpipe benchmark --quick` on a tiny project: structure and arithmetic of the report.

No timed asserts: speed claims live in reports/benchmark.json. What is checked here is that
every figure is what it says it is (rates = images / time, ratios = quotients of the rates
reported beside them, FLOPs = the hand count), and that the files are written.
"""

from __future__ import annotations

import json
import statistics

import keras
import pytest
import yaml
from PIL import Image

from visionpipe import benchmark, cli
from visionpipe.config import parse_params
from visionpipe.layout import Layout

BATCH = 8
TRAIN = 48  # prepared train images; augment doubles them


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_params_dict):
    """A tiny classification project (prepare and augment really run) benchmarked through
    the CLI in this process, with two models."""
    from visionpipe.stages import augment, prepare

    root = tmp_path_factory.mktemp("benchmark")
    data = json.loads(json.dumps(default_params_dict))
    data["prepare"] = {"classification": {**data["prepare"]["classification"],
                                          "image_size": [32, 32], "shard_size": 32,
                                          "splits": {"train": TRAIN, "val": 8, "test": 16}}}
    data["augment"] = {"classification": {**data["augment"]["classification"], "preview": 4}}
    mlp, vgg = data["models"]["mlp"], data["models"]["vgg"]
    mlp["architecture"].update(hidden_units=[16], input_pool=1)
    vgg["architecture"].update(head_units=[8])
    for model in (mlp, vgg):
        model["train"].update(batch_size=BATCH)
    data["models"] = {"mlp": mlp, "vgg": vgg}
    data["tracking"].update(mlflow=False, codecarbon=False)  # the benchmark turns both on
    params = parse_params(data)
    layout = Layout(root)
    prepare.run(params, "classification", layout)
    augment.run(params, "classification", layout)
    (root / "params.yaml").write_text(yaml.safe_dump(data))
    out = root / "bench"
    code = cli.main(["benchmark", "--quick", "--root", str(root), "--params",
                     str(root / "params.yaml"), "--output", str(out), "--models", "mlp,vgg"])
    assert code == 0
    return json.loads((out / "benchmark.json").read_text()), out


def _rate_of(fit: dict) -> float:
    assert fit["median_epoch_seconds"] == pytest.approx(statistics.median(fit["epoch_seconds"]))
    assert fit["images_per_s"] > 0
    assert fit["images_per_s"] == pytest.approx(fit["images_per_epoch"]
                                                / fit["median_epoch_seconds"])
    return fit["images_per_s"]


@pytest.mark.slow
def test_every_model_with_rates_consistent_with_times_and_counts(report):
    rep, _ = report
    assert list(rep["models"]) == ["mlp", "vgg"] and rep["mode"] == "quick"
    images = min(dict(benchmark.QUICK.images)["classification"], 2 * TRAIN)
    for r in rep["models"].values():
        assert r["train_images_per_epoch"] == images
        for key in ("training", "naive"):
            assert r[key]["images_per_epoch"] == images
        assert r["ideal"]["images_per_epoch"] == images // BATCH * BATCH  # full batches
        assert len(r["training"]["warmup_epoch_seconds"]) == 1
        assert len(r["training"]["epoch_seconds"]) == benchmark.QUICK.repeats
        train, ideal, naive = (_rate_of(r[k]) for k in ("training", "ideal", "naive"))
        on, off = _rate_of(r["tracking"]["on"]), _rate_of(r["tracking"]["off"])
        pipe = r["input_pipeline"]
        assert pipe["images"] == images
        assert pipe["cold_images_per_s"] == pytest.approx(images / pipe["cold_seconds"])
        assert pipe["warm_images_per_s"] == pytest.approx(
            images / statistics.median(pipe["warm_seconds"]))
        d = r["derived"]
        assert d["train_vs_ideal"] == pytest.approx(train / ideal)
        assert d["train_vs_naive"] == pytest.approx(train / naive)
        assert d["input_vs_train"] == pytest.approx(pipe["warm_images_per_s"] / train)
        assert d["tracking_on_vs_off"] == pytest.approx(on / off)
        assert d["tracking_slowdown"] == pytest.approx(off / on - 1)
        assert r["tracking"]["on"]["mlflow_logged"] is True
        fl = r["flops"]
        assert fl["training_per_image"] == 3 * fl["forward_per_image"] > 0
        assert d["achieved_gflops"] == pytest.approx(train * fl["training_per_image"] / 1e9)
        assert d["peak_fraction"] == pytest.approx(
            d["achieved_gflops"] / rep["matmul_peak"]["gflops"])
        for fmt in ("keras", "saved_model", "tflite"):
            assert r["inference"][fmt]["batch_1"]["batch_size"] == 1
            assert r["inference"][fmt]["eval_batch"]["batch_size"] == benchmark.QUICK \
                .inference_batch
            assert r["inference"][fmt]["batch_1"]["images_per_s"] > 0
        assert r["memory"]["peak_rss_bytes"] >= r["memory"]["rss_bytes"] > 0


@pytest.mark.slow
def test_mlp_flops_are_its_dense_arithmetic(report):
    rep, _ = report
    # 32x32x3 -> 16 -> 4: matmuls 2*in*out each; the profiler adds the element-wise ops:
    # input rescaling (2 per pixel value) and a few per unit (batch norm, ReLU, softmax).
    pixels = 32 * 32 * 3
    matmuls = 2 * (pixels * 16 + 16 * 4)
    forward = rep["models"]["mlp"]["flops"]["forward_per_image"]
    assert matmuls <= forward <= matmuls + 2 * pixels + 20 * (16 + 4)


@pytest.mark.slow
def test_peak_targets_scaling_and_files(report):
    rep, out = report
    peak = rep["matmul_peak"]
    assert peak["gflops"] > 0
    assert peak["gflops"] == max(peak["start"]["gflops"], peak["end"]["gflops"])
    assert {t["model"] for t in rep["targets"]} == {"mlp", "vgg"}
    for t in rep["targets"]:
        limit = benchmark.TARGETS[t["target"]]
        higher = t["required"].startswith(">=")
        assert t["met"] == (t["value"] >= limit if higher else t["value"] <= limit)
        assert ("missed_by" in t) == (not t["met"])
        if not t["met"]:
            assert t["missed_by"] == pytest.approx(abs(limit - t["value"])) and t["why"]
    sc = rep["scaling"]
    assert sc["model"] == "mlp"  # no resnet in this project: the first classifier
    base = sc["base_images"]
    assert [sc[f"{k}x"]["images_per_epoch"] for k in (1, 2, 4)] == [base, 2 * base, 4 * base]
    assert sc["epoch_time_4x_vs_1x"] == pytest.approx(
        sc["4x"]["median_epoch_seconds"] / sc["1x"]["median_epoch_seconds"])
    assert sc["half_size"]["image_size"] == [16, 16]
    env = rep["environment"]
    assert env["tensorflow"] and env["keras"] and len(env["loadavg_before"]) == 3
    with Image.open(out / "benchmark.png") as image:
        image.verify()
    with Image.open(out / "benchmark.png") as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 400


def test_flops_of_a_known_dense_model_are_the_hand_count():
    """Convention: a Dense layer of in -> out units costs 2*in*out FLOPs per image (a
    multiply and an add per weight); no bias, no activation here, so nothing else counts."""
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(7, use_bias=False),
                              keras.layers.Dense(3, use_bias=False)])
    assert benchmark.flops(model, (12,)) == {"forward_per_image": 2 * (12 * 7 + 7 * 3),
                                             "training_per_image": 3 * 2 * (12 * 7 + 7 * 3)}


def test_matmul_probe_reports_a_positive_peak_for_the_best_size():
    probe = benchmark.matmul_peak((64, 128), repeats=1, seconds=0.01)
    assert probe["gflops"] > 0 and probe["best_n"] in (64, 128)
    assert probe["gflops"] == max(v["gflops"] for v in probe["by_size"].values())


def test_unknown_model_is_a_one_line_error(tmp_path, repo_root, capsys):
    code = cli.main(["benchmark", "--models", "nope", "--params",
                     str(repo_root / "params.yaml"), "--root", str(tmp_path)])
    assert code == 2
    assert "unknown model(s) nope" in capsys.readouterr().err
