"""`visionpipe benchmark --quick` on a tiny project: structure and arithmetic of the report.

No timed asserts: speed claims live in reports/benchmark.json. What is checked here is that
every figure is what it says it is (rates = images / time, ratios = quotients of the rates
reported beside them, FLOPs = the hand count, verdicts = what the figures beside them say),
and that the files are written.
"""

from __future__ import annotations

import json
import math
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
TEST = 16
JSON = "benchmark-test.json"  # --json-name: the PNG takes its stem
# An earlier run for --compare: mlp at another batch size, and a model since removed.
BEFORE = {"environment": {"date": "2026-01-02T03:04:05+00:00", "git_commit": "abc"},
          "mode": "full", "matmul_peak": {"gflops": 50.0},
          "models": {"mlp": {"batch_size": 64, "train_images_per_epoch": 1024,
                             "training": {"images_per_s": 1000.0},
                             "derived": {"peak_fraction": 0.125},
                             "train_params": {"precision": "float32"}},
                     "gone": {"batch_size": 16, "training": {"images_per_s": 5.0},
                              "derived": {"peak_fraction": 0.5}}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory, default_params_dict):
    """A tiny classification project (prepare and augment really run) benchmarked through
    the CLI in this process, with two models."""
    from visionpipe.stages import augment, prepare

    root = tmp_path_factory.mktemp("benchmark")
    data = json.loads(json.dumps(default_params_dict))
    data["prepare"] = {"classification": {**data["prepare"]["classification"],
                                          "image_size": [32, 32], "shard_size": 32,
                                          "splits": {"train": TRAIN, "val": 8, "test": TEST}}}
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
    before = root / "before.json"
    before.write_text(json.dumps(BEFORE))
    code = cli.main(["benchmark", "--quick", "--root", str(root), "--params",
                     str(root / "params.yaml"), "--output", str(out), "--models", "mlp,vgg",
                     "--compare", str(before), "--json-name", JSON])
    assert code == 0
    assert not (out / "benchmark.json").exists()
    return json.loads((out / JSON).read_text()), out


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
    with Image.open(out / "benchmark-test.png") as image:
        image.verify()
    with Image.open(out / "benchmark-test.png") as image:
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


@pytest.mark.slow
def test_precision_compares_float32_and_a_mixed_policy_after_the_same_training(report):
    from visionpipe.training import resolve_precision

    rep, _ = report
    auto, reason = resolve_precision("auto")
    assert rep["precision_auto"]["policy"] == auto and rep["precision_auto"]["reason"] == reason
    peaks = rep["matmul_peak"]["by_dtype"]
    for r in rep["models"].values():
        p, d = r["precision"], r["derived"]
        production = r["train_params"]["precision_resolved"]
        assert production == resolve_precision(r["train_params"]["precision"], r["family"])[0]
        assert p["production"] == production and p["auto"] == {"policy": auto, "reason": reason}
        base, mixed = p["compared"]
        assert base == "float32" and mixed == benchmark.compared_policies(production, auto)[1]
        assert mixed.startswith("mixed_") and production in p["compared"]
        assert p["epochs_trained"] == 1 + benchmark.QUICK.precision_repeats
        assert (p["test_images"], p["val_images"], p["metric"]) == (TEST, 8, "accuracy")
        assert p["images_per_epoch"] == r["train_images_per_epoch"]
        rates = {}
        for policy in (base, mixed):
            fit = p[policy]
            rates[policy] = _rate_of(fit)
            assert fit["images_per_epoch"] == r["train_images_per_epoch"]
            assert len(fit["epoch_seconds"]) == benchmark.QUICK.precision_repeats
            assert len(fit["warmup_epoch_seconds"]) == 1
            assert fit["compute_dtype"] == benchmark.compute_dtype(policy)
            assert fit["metric"] == fit["test"]["accuracy"] and 0.0 <= fit["metric"] <= 1.0
            assert fit["metric"] * TEST == pytest.approx(round(fit["metric"] * TEST))  # k/16
            assert 0.0 <= fit["test"]["macro_f1"] <= 1.0 and math.isfinite(fit["val_loss"])
            assert d["precision_peak_fraction"][policy] == pytest.approx(
                rates[policy] * r["flops"]["training_per_image"]
                / (peaks[fit["compute_dtype"]] * 1e9))
        assert p["speedup"] == pytest.approx(rates[mixed] / rates[base])
        delta = p[mixed]["metric"] - p[base]["metric"]
        assert p["metric_delta"] == pytest.approx(delta)
        assert p["val_loss_delta"] == pytest.approx(p[mixed]["val_loss"] - p[base]["val_loss"])
        assert p["tolerance"] == benchmark.PRECISION_TOLERANCE
        quality = ("the same" if abs(delta) <= p["tolerance"]
                   else "higher" if delta > 0 else "lower")
        faster = rates[mixed] > rates[base]
        assert (p["quality"], p["verdict"]) == (
            quality, f"{'faster' if faster else 'slower'} at {quality} quality")
        assert p["recommended"] == (mixed if faster and quality != "lower" else base)
        # The production model's first epoch, in the comparison, is the main figures' warm-up.
        assert r["training"]["warmup_epoch_seconds"] == p[production]["warmup_epoch_seconds"]


@pytest.mark.parametrize(("speedup", "base", "mixed", "verdict", "recommended"), [
    (1.5, 0.80, 0.79, "faster at the same quality", "mixed"),
    (1.5, 0.80, 0.70, "faster at lower quality", "float32"),
    (1.5, 0.70, 0.80, "faster at higher quality", "mixed"),
    (0.5, 0.80, 0.81, "slower at the same quality", "float32"),
    (0.5, 0.80, None, "slower, quality not comparable (a test metric is missing)", "float32"),
])
def test_precision_verdict_needs_speed_and_the_metric_within_the_tolerance(
        speedup, base, mixed, verdict, recommended):
    found = benchmark.precision_verdict(speedup, base, mixed, tolerance=0.02)
    assert (found["verdict"], found["recommended"]) == (verdict, recommended)


def test_thread_pairs_follow_the_core_count():
    assert benchmark.thread_pairs(2) == [(0, 0), (2, 1), (1, 1), (2, 2), (1, 2)]
    assert benchmark.thread_pairs(8) == [(0, 0), (8, 1), (1, 1), (8, 2), (1, 8)]
    assert benchmark.thread_pairs(1) == [(0, 0), (1, 1), (1, 2)]


@pytest.mark.slow
def test_thread_settings_each_ran_in_a_child_with_the_counts_in_effect(report):
    rep, _ = report
    th = rep["threads"]
    assert th["models"] == ["mlp"] and th["errors"] == [] and th["models_why"]
    assert [(s["intra_op"], s["inter_op"]) for s in th["settings"]] == list(
        benchmark.QUICK.thread_pairs)
    images = rep["models"]["mlp"]["train_images_per_epoch"]
    rates = {}
    for s in th["settings"]:
        # Read back from TensorFlow in the child: the counts asked for (0: its default).
        assert s["in_effect"] == {"intra_op": s["intra_op"], "inter_op": s["inter_op"]}
        fit = s["models"]["mlp"]
        assert fit["images_per_epoch"] == images and len(fit["warmup_epoch_seconds"]) == 1
        assert len(fit["epoch_seconds"]) == benchmark.QUICK.repeats
        rates[f"{s['intra_op']}/{s['inter_op']}"] = _rate_of(fit)
    row = th["by_model"]["mlp"]
    assert row["images_per_s"] == rates
    assert row["vs_default"] == pytest.approx({k: v / rates["0/0"] for k, v in rates.items()})
    assert row["best"] == max(rates, key=rates.get)
    assert row["main_process_images_per_s"] == rep["models"]["mlp"]["training"]["images_per_s"]
    env = rep["environment"]["threads"]
    assert (env["intra_op"], env["inter_op"]) == (th["main_process"]["intra_op"],
                                                  th["main_process"]["inter_op"])


@pytest.mark.slow
def test_compare_sets_each_model_beside_the_earlier_run_by_name(report):
    rep, out = report
    cmp = rep["compare"]
    assert cmp["before"]["path"] == str(out.parent / "before.json")
    assert (cmp["before"]["date"], cmp["before"]["git_commit"]) == (
        BEFORE["environment"]["date"], "abc")
    assert cmp["before"]["matmul_peak_gflops"] == 50.0
    assert cmp["after"]["date"] == rep["environment"]["date"]
    assert cmp["after"]["matmul_peak_gflops"] == rep["matmul_peak"]["gflops"]
    assert (list(cmp["models"]), cmp["only_before"], cmp["only_after"]) == (
        ["mlp"], ["gone"], ["vgg"])
    row, now = cmp["models"]["mlp"], rep["models"]["mlp"]
    assert row["before"] == {"images_per_s": 1000.0, "peak_fraction": 0.125, "batch_size": 64,
                             "train_images_per_epoch": 1024, "image_size": None,
                             "precision": "float32"}
    assert row["after"] == {"images_per_s": now["training"]["images_per_s"],
                            "peak_fraction": now["derived"]["peak_fraction"],
                            "batch_size": BATCH,
                            "train_images_per_epoch": now["train_images_per_epoch"],
                            "image_size": [32, 32],
                            "precision": now["train_params"]["precision_resolved"]}
    assert row["images_per_s_after_vs_before"] == pytest.approx(
        now["training"]["images_per_s"] / 1000.0)
    assert row["peak_fraction_after_minus_before"] == pytest.approx(
        now["derived"]["peak_fraction"] - 0.125)


@pytest.mark.slow
def test_gpu_rows_gather_each_models_gpu_figures(report):
    rep, _ = report
    if rep["environment"]["gpus"]:
        assert list(rep["gpu"]["models"]) == list(rep["models"])
    else:  # this machine: the rows are absent and the report says why
        assert rep["gpu"] is None and rep["gpu_reason"].startswith("no GPU visible")
    peaks = rep["matmul_peak"]["by_dtype"]
    rows = benchmark.gpu_rows(rep, peaks)
    assert rows["matmul_peak_gflops"] == peaks
    for name, r in rep["models"].items():
        g, inf = rows["models"][name], r["inference"]
        assert g["training_images_per_s"] == r["training"]["images_per_s"]
        assert g["inference_images_per_s"] == {
            f"{f}_{b}": inf[f][b]["images_per_s"] for f in ("keras", "saved_model")
            for b in ("batch_1", "eval_batch")}
        assert g["precision"] == r["train_params"]["precision_resolved"]
        assert g["own_dtype"] == benchmark.compute_dtype(g["precision"])
        assert g["peak_fraction_float32"] == r["derived"]["peak_fraction"]
        assert g["peak_fraction_own_dtype"] == pytest.approx(
            r["training"]["images_per_s"] * r["flops"]["training_per_image"]
            / (peaks[g["own_dtype"]] * 1e9))
        assert g["gpu_peak_bytes"] == r["memory"].get("gpu_peak_bytes")


@pytest.mark.slow
def test_table_shows_precision_threads_and_before_after(report):
    rep, _ = report
    text = benchmark.table(rep)
    assert f"precision (auto here: {rep['precision_auto']['policy']}" in text
    for name, r in rep["models"].items():
        assert f"{name:8} {r['precision']['compared'][1]:>14}" in text
        assert r["precision"]["verdict"] in text
    assert "threads: training images/s" in text and " 0/0 " in text
    assert f"before ({BEFORE['environment']['date']}" in text
    assert f"{'mlp':8} {'64->' + str(BATCH):>9}" in text and "only before: gone" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--skip", "threads,nope"], "--skip threads,nope: unknown section(s) nope; choose from "
                                 "precision, threads, scaling"),
    (["--json-name", "reports/x.json"], "--json-name reports/x.json: a file name ending in "
                                        ".json, without a folder"),
    (["--json-name", "x.txt"], "--json-name x.txt: a file name ending in .json"),
    (["--compare", "{tmp}/missing.json"], "--compare {tmp}/missing.json: no such file; copy "
                                          "reports/benchmark.json aside"),
    (["--compare", "{tmp}/other.json"], "--compare {tmp}/other.json: not a benchmark.json"),
])
def test_bad_benchmark_options_are_one_line_errors(tmp_path, repo_root, capsys, args,
                                                   message):
    (tmp_path / "other.json").write_text('{"accuracy": 0.5}')
    code = cli.main(["benchmark", "--models", "mlp", "--params", str(repo_root / "params.yaml"),
                     "--root", str(tmp_path), *[a.format(tmp=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("visionpipe: error: " + message.format(tmp=tmp_path))
