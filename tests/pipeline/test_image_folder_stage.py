"""`dvc repro prepare@classification` on a real image folder with broken files in it."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import copy_repo, run
from visionpipe.data import records

pytestmark = pytest.mark.slow


def test_prepare_reports_every_skipped_file_by_path(tmp_path, repo_root, datasets_dir):
    images = tmp_path / "hymenoptera"
    shutil.copytree(datasets_dir / "hymenoptera", images)
    truncated = sorted((images / "bees").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:500])
    (images / "ants" / "notes.txt").write_text("not an image")
    (images / "ants" / "empty.png").write_bytes(b"")

    def use_folder(params):
        params["prepare"]["classification"].update(
            source="folder", path=str(images), image_size=[48, 48], resize="pad",
            splits={"train": 0.7, "val": 0.15, "test": 0.15})
        params["models"] = {"mlp": params["models"]["mlp"]}

    repo = copy_repo(repo_root, tmp_path / "repo", use_folder)
    result = run(["dvc", "repro", "prepare@classification"], repo)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "prepare classification: skipped 3 file(s), listed in " \
           "reports/prepare/classification.json" in result.stdout
    report = json.loads((repo / "reports/prepare/classification.json").read_text())
    skipped = {item["path"]: item["reason"] for item in report["skipped"]["items"]}
    assert set(skipped) == {f"{images}/bees/{truncated.name}", f"{images}/ants/notes.txt",
                            f"{images}/ants/empty.png"}
    assert skipped[f"{images}/ants/empty.png"] == "empty file (0 bytes)"
    assert skipped[f"{images}/bees/{truncated.name}"].startswith("corrupt or truncated image")
    assert report["skipped"]["by_reason"] == {"corrupt or truncated image": 1,
                                              "not an image PIL can read": 1,
                                              "empty file (0 bytes)": 1}
    manifest = records.read_manifest(repo / "data/prepared/classification")
    assert manifest["skipped"] == report["skipped"]
    assert manifest["class_names"] == ["ants", "bees"]
    # 245 real images minus the truncated one; the two added files were never images
    assert sum(manifest["counts"].values()) == 244 and manifest["source"]["files"] == 247
    per_class = {c: sum(manifest["class_counts"][s][c] for s in manifest["counts"])
                 for c in ("ants", "bees")}
    assert per_class == {"ants": 124, "bees": 120}
    # stratified: each split holds both classes in about the same ratio
    for split in ("val", "test"):
        counts = manifest["class_counts"][split]
        assert abs(counts["ants"] - counts["bees"]) <= 1, counts
    assert records.checksum(repo / "data/prepared/classification",
                            [s for v in manifest["splits"].values() for s in v["shards"]]
                            ) == manifest["checksum"]
    # The folder is a dependency: fixing the broken image makes prepare stale.
    status = run(["dvc", "status", "prepare@classification"], repo)
    assert "up to date" in status.stdout, status.stdout
    shutil.copy2(datasets_dir / "hymenoptera" / "bees" / truncated.name, truncated)
    status = run(["dvc", "status", "prepare@classification"], repo)
    assert "changed deps" in status.stdout and str(images) in status.stdout, status.stdout
