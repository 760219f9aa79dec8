"""The image-folder source: decoding odd files, resize policies, skips reported, real data."""

from __future__ import annotations

import io
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from visionpipe.data.sources.image_folder import load_folder, load_image
from visionpipe.errors import DataError
from visionpipe.geometry import fit_to_size


def _save(path, img: Image.Image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _gradient(h=24, w=40) -> np.ndarray:
    """A left-to-right red ramp, top-to-bottom green ramp: orientation is visible."""
    out = np.zeros((h, w, 3), np.uint8)
    out[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    out[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    out[..., 2] = 77
    return out


def test_palette_grey_rgba_cmyk_and_16bit_become_uint8_rgb(tmp_path):
    rgb = _gradient()
    base = Image.fromarray(rgb)
    files = {
        "palette.png": base.quantize(64),
        "grey.png": base.convert("L"),
        "greyalpha.png": base.convert("LA"),
        "rgba.png": base.convert("RGBA"),
        "cmyk.jpg": base.convert("CMYK"),
        "bmp.bmp": base,
    }
    for name, img in files.items():
        _save(tmp_path / name, img, **({"quality": 95} if name.endswith(".jpg") else {}))
    grey16 = (np.arange(24 * 40).reshape(24, 40) * 60).astype(np.uint16)  # up to 57540
    _save(tmp_path / "grey16.png", Image.fromarray(grey16))
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")

    for name in [*files, "grey16.png"]:
        out = load_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (24, 40, 3), name
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(load_image(tmp_path / "bmp.bmp"), rgb)
    grey = np.asarray(base.convert("L"))
    assert np.array_equal(load_image(tmp_path / "grey.png")[..., 1], grey)
    # CMYK JPEG back to RGB: close to the original (JPEG is lossy)
    assert np.abs(load_image(tmp_path / "cmyk.jpg").astype(int) - rgb).mean() < 6
    # 16-bit scaled by 255/65535, not clipped at 255
    g16 = load_image(tmp_path / "grey16.png")[..., 0]
    assert g16.max() == round(57540 * 255 / 65535) and g16[0, 0] == 0
    assert np.array_equal(g16, np.round(grey16 * (255 / 65535)).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    rgb = _gradient()  # 24 high, 40 wide
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display needs a 90-degree clockwise turn
    path = _save(tmp_path / "rotated.jpg", img, exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (40, 24, 3)
    expected = np.asarray(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(out.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file (0 bytes)"),
    (b"hello, I am a text file\n", "not an image PIL can read"),
    ("truncated", "corrupt or truncated image"),
])
def test_unusable_files_raise_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(_gradient(64, 64)).save(buf, format="JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(reason)):
        load_image(path)


def test_resize_policies_keep_or_ignore_aspect():
    img = np.full((20, 40, 3), 200, np.uint8)  # wide, uniform
    stretched = fit_to_size(img, (32, 32), "stretch")
    assert stretched.shape == (32, 32, 3) and (stretched == 200).all()
    padded = fit_to_size(img, (32, 32), "pad")
    # 40x20 -> 32x16 centred: 8 black rows above and below
    assert padded.shape == (32, 32, 3)
    assert (padded[:8] == 0).all() and (padded[24:] == 0).all() and (padded[8:24] == 200).all()
    marked = img.copy()
    marked[:, :10] = 0  # the left quarter is black
    cropped = fit_to_size(marked, (32, 32), "crop")
    # 40x20 -> 64x32, centre 32 columns: columns 16..48 of the scaled image, all grey
    assert cropped.shape == (32, 32, 3) and (cropped[:, 2:30] == 200).all()
    assert fit_to_size(img, (20, 40), "pad") is img


def _make_folder(root, per_class=3):
    for c, colour in (("cats", 50), ("dogs", 200)):
        for i in range(per_class):
            _save(root / c / f"{i}.png", Image.fromarray(np.full((10 + i, 12, 3), colour,
                                                                 np.uint8)))
    return root


def test_load_folder_labels_sorted_classes_and_reports_every_skip(tmp_path):
    root = _make_folder(tmp_path / "ds")
    (root / "cats" / "notes.txt").write_text("not an image")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    (root / "README.md").write_text("loose file")
    names, examples, skipped = load_folder(root, (8, 8), "stretch", shown_root="ds")
    assert names == ["cats", "dogs"]
    assert len(examples) == 6
    assert [ex.label for ex in examples] == [0, 0, 0, 1, 1, 1]
    assert examples[0].id == "cats/0.png" and examples[0].image.shape == (8, 8, 3)
    assert {(s.path, s.reason) for s in skipped} == {
        ("ds/README.md", "not inside a class folder"),
        ("ds/cats/notes.txt", "not an image PIL can read"),
        ("ds/dogs/empty.jpg", "empty file (0 bytes)"),
    }


def test_class_folder_without_usable_images_is_an_error(tmp_path):
    root = _make_folder(tmp_path / "ds")
    (root / "birds").mkdir()
    (root / "birds" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"class folder\(s\) birds hold no usable image"):
        load_folder(root, (8, 8), "stretch")


def test_missing_or_flat_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        load_folder(tmp_path / "nope", (8, 8), "stretch")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "a.png", Image.fromarray(_gradient()))
    with pytest.raises(DataError, match="no class sub-folders"):
        load_folder(tmp_path / "flat", (8, 8), "stretch")


def test_hymenoptera_loads_every_image_including_the_palette_gif(datasets_dir):
    root = datasets_dir / "hymenoptera"
    names, examples, skipped = load_folder(root, (32, 32), "pad")
    assert names == ["ants", "bees"]
    assert skipped == []
    counts = np.bincount([ex.label for ex in examples])
    assert counts.tolist() == [len(list((root / n).iterdir())) for n in names] == [124, 121]
    gif = next(ex for ex in examples if ex.id == "ants/imageNotFound.gif")
    assert Image.open(root / "ants/imageNotFound.gif").mode == "P"
    assert gif.image.shape == (32, 32, 3) and gif.image.dtype == np.uint8


def test_hymenoptera_copy_with_a_corrupt_file_reports_its_path(datasets_dir, tmp_path):
    root = tmp_path / "hymenoptera"
    shutil.copytree(datasets_dir / "hymenoptera", root)
    victim = sorted((root / "bees").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    _, examples, skipped = load_folder(root, (32, 32), "crop", shown_root="hymenoptera")
    assert len(examples) == 244
    assert [s.path for s in skipped] == [f"hymenoptera/bees/{victim.name}"]
    assert skipped[0].reason.startswith("corrupt or truncated image")


def test_a_single_class_folder_is_an_error_through_the_cli(tmp_path, repo_root):
    """One class folder: a classifier that is always right. prepare refuses it in one line,
    before reading any image."""
    import subprocess
    import sys

    import yaml

    root = tmp_path / "ds"
    (root / "cats").mkdir(parents=True)
    _save(root / "cats" / "a.png", Image.fromarray(_gradient()))
    with pytest.raises(DataError, match=r"one class folder \(cats\); a classifier needs at "
                                        r"least two"):
        load_folder(root, (8, 8), "stretch")
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["prepare"]["classification"].update(source="folder", path=str(root))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "visionpipe.cli", "prepare", "--task",
                             "classification"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("visionpipe:")]
    assert len(lines) == 1 and "one class folder (cats)" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing written
