"""The image/mask pair source: real membrane data, broken copies, odd mask modes, fuzzing."""

from __future__ import annotations

import io
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from visionpipe.data.sources.image_folder import load_image
from visionpipe.data.sources.mask_folder import load_mask, load_pairs
from visionpipe.errors import DataError

# The membrane masks are white (255) inside cells and black (0) on the membranes; the shared
# README's "255 = membrane" has it the other way round (see the real-data test).
MEMBRANE = {255: "cell", 0: "membrane"}


def _save(path: Path, img: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _pair(root: Path, stem: str, mask: np.ndarray, image: np.ndarray | None = None,
          mask_name: str | None = None) -> None:
    """A grey-ramp RGB image and ``mask`` (saved as given) under root/images and root/masks."""
    h, w = mask.shape[:2]
    if image is None:
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 7
    _save(root / "images" / f"{stem}.png", Image.fromarray(image))
    _save(root / "masks" / (mask_name or f"{stem}.png"), Image.fromarray(mask))


def _copy_membrane(datasets_dir: Path, dest: Path, stems=("0", "1", "2", "3")) -> Path:
    """Copies of a few membrane pairs; the shared folder itself is never written to."""
    for sub in ("images", "masks"):
        (dest / sub).mkdir(parents=True)
        for stem in stems:
            shutil.copy(datasets_dir / "membrane" / sub / f"{stem}.png", dest / sub)
    return dest


def _error(root: Path, mapping=MEMBRANE, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_pairs(root, mapping, shown_root="ds", **kwargs)
    return str(info.value)


# --- the real membrane set -------------------------------------------------------------------

def test_membrane_loads_30_pairs_with_membrane_as_class_1(datasets_dir):
    root = datasets_dir / "membrane"
    seen = []
    names, examples, skipped = load_pairs(root, MEMBRANE,
                                          progress=lambda it: seen.extend(it) or seen)
    assert names == ["cell", "membrane"]
    assert skipped == []
    assert len(examples) == 30 and len(seen) == 30
    ids = [ex.id for ex in examples]
    assert ids == sorted(ids) and set(ids) == {str(i) for i in range(30)}
    for ex in examples:
        assert ex.image.shape == (512, 512, 3) and ex.image.dtype == np.uint8
        assert ex.mask.shape == (512, 512) and ex.mask.dtype == np.uint8
        assert set(np.unique(ex.mask).tolist()) == {0, 1}
    by_id = {ex.id: ex for ex in examples}
    for stem in ("0", "7", "29"):
        raw = np.asarray(Image.open(root / "masks" / f"{stem}.png"))
        assert np.array_equal(by_id[stem].mask == 1, raw == 0)  # membrane: black in the PNG
        assert np.array_equal(by_id[stem].mask == 0, raw == 255)
        grey = np.asarray(Image.open(root / "images" / f"{stem}.png"))
        assert np.array_equal(by_id[stem].image, np.repeat(grey[..., None], 3, axis=-1))
    membrane = np.mean([ex.mask.mean() for ex in examples])
    assert 0.1 < membrane < 0.5
    # the README's mapping would call ~77% of every image "membrane": thin outlines are not
    raw_255 = np.mean([(np.asarray(Image.open(p)) == 255).mean()
                       for p in sorted((root / "masks").iterdir())[:5]])
    assert raw_255 > 0.5


# --- broken copies -------------------------------------------------------------------------

def test_unexpected_mask_value_names_the_file_the_value_and_its_count(datasets_dir, tmp_path):
    root = _copy_membrane(datasets_dir, tmp_path / "ds")
    raw = np.asarray(Image.open(root / "masks" / "1.png")).copy()
    raw[10, 10:17] = 128
    Image.fromarray(raw).save(root / "masks" / "1.png")
    msg = _error(root)
    assert "1 problem(s)" in msg
    assert "ds/masks/1.png: values not in mask_values: 128 (7 px); allowed: 255, 0" in msg
    assert "masks/0.png" not in msg and "masks/2.png" not in msg
    assert msg.rstrip().endswith("run again")


def test_size_mismatch_names_both_files_and_sizes(datasets_dir, tmp_path):
    root = _copy_membrane(datasets_dir, tmp_path / "ds")
    small = Image.open(root / "masks" / "2.png").resize((256, 256), Image.NEAREST)
    small.save(root / "masks" / "2.png")
    msg = _error(root)
    assert "ds/images/2.png is 512x512 but its mask ds/masks/2.png is 256x256" in msg


def test_missing_mask_and_orphan_mask_are_named_in_one_error(datasets_dir, tmp_path):
    root = _copy_membrane(datasets_dir, tmp_path / "ds")
    (root / "masks" / "0.png").unlink()
    shutil.copy(root / "masks" / "1.png", root / "masks" / "99.png")
    msg = _error(root)
    assert "2 problem(s)" in msg
    assert "ds/images/0.png: image without a mask; looked for ds/masks/0.*" in msg
    assert "ds/masks/99.png: mask without an image; looked for ds/images/99.*" in msg


def test_several_problems_are_all_reported_together(datasets_dir, tmp_path):
    root = _copy_membrane(datasets_dir, tmp_path / "ds", stems=("0", "1", "2", "3", "4"))
    raw = np.asarray(Image.open(root / "masks" / "0.png")).copy()
    raw[0, :3] = 77
    Image.fromarray(raw).save(root / "masks" / "0.png")
    small = Image.open(root / "masks" / "1.png").resize((300, 200), Image.NEAREST)
    small.save(root / "masks" / "1.png")
    (root / "masks" / "2.png").unlink()
    colour = np.zeros((512, 512, 3), np.uint8)
    colour[:256, :, 0] = 255
    Image.fromarray(colour).save(root / "masks" / "3.png")
    msg = _error(root)
    assert "4 problem(s)" in msg
    assert "ds/masks/0.png: values not in mask_values: 77 (3 px)" in msg
    assert "ds/images/1.png is 512x512 but its mask ds/masks/1.png is 300x200" in msg
    assert "ds/images/2.png: image without a mask" in msg
    assert "ds/masks/3.png: colour mask (mode RGB" in msg
    assert "ds/masks/4.png" not in msg


def test_more_than_20_problems_are_listed_then_counted(tmp_path):
    root = tmp_path / "ds"
    for i in range(25):
        _save(root / "images" / f"{i:02d}.png", Image.fromarray(np.zeros((4, 4), np.uint8)))
    (root / "masks").mkdir()
    msg = _error(root)
    assert "26 problem(s)" in msg  # 25 images without a mask, then "no image/mask pairs"
    assert len(re.findall(r"^  - ", msg, flags=re.M)) == 20
    assert "ds/images/19.png: image without a mask" in msg
    assert "ds/images/20.png" not in msg
    assert "\n  ... and 6 more\n" in msg


def test_unreadable_files_are_skipped_with_their_pair(datasets_dir, tmp_path):
    root = _copy_membrane(datasets_dir, tmp_path / "ds")
    (root / "images" / "0.png").write_bytes(b"")
    data = (root / "masks" / "1.png").read_bytes()
    (root / "masks" / "1.png").write_bytes(data[: len(data) // 2])
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / ".DS_Store").write_bytes(b"\0\0")
    (root / "masks" / "extra").mkdir()
    _, examples, skipped = load_pairs(root, MEMBRANE, shown_root="ds")
    assert [ex.id for ex in examples] == ["2", "3"]
    by_path = {s.path: s.reason for s in skipped}
    assert set(by_path) == {"ds/images/0.png", "ds/masks/1.png", "ds/images/notes.txt",
                            "ds/masks/extra"}
    assert by_path["ds/images/0.png"] == ("empty file (0 bytes) (its mask ds/masks/0.png is "
                                          "not used)")
    assert by_path["ds/masks/1.png"].startswith("corrupt or truncated image")
    assert by_path["ds/masks/1.png"].endswith("(its image ds/images/1.png is not used)")
    assert "not an image file" in by_path["ds/images/notes.txt"]


def test_no_readable_pair_at_all_is_an_error(tmp_path):
    root = tmp_path / "ds"
    _pair(root, "a", np.zeros((4, 4), np.uint8))
    (root / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    msg = _error(root, {0: "bg"})
    assert "none of the 1 image/mask pair(s) could be read" in msg
    assert "ds/images/a.png" in msg


def test_missing_folders_and_empty_folders(tmp_path):
    assert "dataset folder not found" in _error(tmp_path / "nope")
    (tmp_path / "ds").mkdir()
    msg = _error(tmp_path / "ds")
    assert "ds/images: image folder not found" in msg and "ds/masks: mask folder not found" in msg
    (tmp_path / "ds" / "images").mkdir()
    msg = _error(tmp_path / "ds")
    assert "ds/masks: mask folder not found" in msg and "ds/images:" not in msg
    (tmp_path / "ds" / "masks").mkdir()
    assert "no image/mask pairs (0 image(s), 0 mask(s) found)" in _error(tmp_path / "ds")


def test_other_folder_names_and_any_extension_pair_by_stem(tmp_path):
    root = tmp_path / "ds"
    mask = np.array([[0, 255], [255, 0]], np.uint8)
    _save(root / "img" / "a.jpg", Image.fromarray(np.full((2, 2, 3), 99, np.uint8)))
    _save(root / "lbl" / "a.bmp", Image.fromarray(mask))
    names, examples, _ = load_pairs(root, {0: "bg", 255: "fg"}, images="img", masks="lbl")
    assert names == ["bg", "fg"] and examples[0].id == "a"
    assert examples[0].mask.tolist() == [[0, 1], [1, 0]]
    _save(root / "lbl" / "a.png", Image.fromarray(mask))
    msg = _error(root, {0: "bg", 255: "fg"}, images="img", masks="lbl")
    assert "ds/lbl/a.bmp, ds/lbl/a.png: 2 masks share the name 'a'" in msg


def test_jpeg_mask_with_blurred_values_says_jpeg_is_lossy(tmp_path):
    root = tmp_path / "ds"
    mask = np.zeros((32, 32), np.uint8)
    mask[5:19, 3:27] = 255  # edges inside JPEG's 8x8 blocks ring
    _pair(root, "a", mask, mask_name="a.jpg")
    msg = _error(root, {0: "bg", 255: "fg"})
    assert "ds/masks/a.jpg: values not in mask_values" in msg and "JPEG is lossy" in msg


# --- mask modes ----------------------------------------------------------------------------

def test_colour_rgb_mask_is_an_error_naming_its_mode(tmp_path):
    root = tmp_path / "ds"
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[:3, :, 1] = 200
    _pair(root, "a", colour)
    msg = _error(root, {0: "bg", 200: "fg"})
    assert "ds/masks/a.png: colour mask (mode RGB: (0, 0, 0), (0, 200, 0))" in msg
    assert "save it as 8-bit grey (mode L) or palette (mode P)" in msg


def test_palette_mask_uses_indices_not_colours(tmp_path):
    root = tmp_path / "ds"
    idx = np.array([[0, 1, 1], [1, 0, 0]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red: grey value 76
    _save(root / "masks" / "a.png", pal)
    _save(root / "images" / "a.png", Image.fromarray(np.zeros((2, 3, 3), np.uint8)))
    assert Image.open(root / "masks" / "a.png").mode == "P"
    names, examples, _ = load_pairs(root, {0: "a", 1: "b"})
    assert names == ["a", "b"] and examples[0].mask.tolist() == idx.tolist()
    # the mapping's order, not the values, gives the class ids
    _, examples, _ = load_pairs(root, {1: "b", 0: "a"})
    assert examples[0].mask.tolist() == (1 - idx).tolist()


def test_grey_stored_as_rgb_16bit_1bit_or_opaque_alpha_is_read_as_grey(tmp_path):
    values = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    grey16 = Image.fromarray(values.astype(np.uint16))
    files = {
        "rgb.png": Image.fromarray(np.repeat(values[..., None], 3, axis=-1)),
        "grey16.png": grey16,
        "bilevel.png": Image.fromarray(values).convert("1"),
        "la.png": Image.fromarray(values).convert("LA"),
        "rgba.png": Image.fromarray(values).convert("RGBA"),
        "tif.tif": Image.fromarray(values),
    }
    for name, img in files.items():
        path = _save(tmp_path / name, img)
        assert Image.open(path).mode == img.mode, name
        assert np.array_equal(load_mask(path), values), name


@pytest.mark.parametrize("name,make,words", [
    ("grey16_300.png", lambda: Image.fromarray(np.array([[0, 300]], np.uint16)),
     "16/32-bit mask (mode I;16) with values 0..300"),
    ("alpha.png", lambda: Image.fromarray(np.array([[[0, 0, 0, 255], [9, 9, 9, 10]]],
                                                   np.uint8)),
     "mode RGBA with varying transparency (alpha 10..255)"),
    ("cmyk.tif", lambda: Image.new("CMYK", (2, 2)), "mask in mode CMYK"),
])
def test_masks_that_cannot_hold_values_name_their_mode(tmp_path, name, make, words):
    root = tmp_path / "ds"
    _save(root / "masks" / name, make())
    stem = Path(name).stem
    size = Image.open(root / "masks" / name).size
    _save(root / "images" / f"{stem}.png", Image.new("RGB", size))
    msg = _error(root, {0: "bg", 255: "fg"})
    assert f"ds/masks/{name}: {words}" in msg
    assert "8-bit grey (mode L) or palette (mode P)" in msg


def test_masks_are_not_exif_rotated_but_images_are(tmp_path):
    root = tmp_path / "ds"
    mask = np.zeros((4, 6), np.uint8)  # 4 high, 6 wide
    mask[0, :] = 1
    img = Image.fromarray(mask)
    exif = img.getexif()
    exif[0x0112] = 6
    _save(root / "masks" / "a.png", img, exif=exif)
    assert load_image(root / "masks" / "a.png").shape == (6, 4, 3)  # PIL would turn it
    _save(root / "images" / "a.png", Image.new("RGB", (6, 4)))
    _, examples, _ = load_pairs(root, {0: "bg", 1: "top"})
    assert examples[0].mask.tolist() == mask.tolist()
    # an image turned upright by EXIF no longer matches a mask drawn on its stored pixels
    _save(root / "images" / "a.png", Image.new("RGB", (6, 4)), exif=exif)
    msg = _error(root, {0: "bg", 1: "top"})
    assert "ds/images/a.png is 4x6 but its mask ds/masks/a.png is 6x4" in msg
    assert "EXIF orientation 6" in msg


@pytest.mark.parametrize("mapping,words", [
    ({300: "x", 0: "bg"}, "300 (for 'x') is not 0..255"),
    ({0: "a", 255: "a"}, "class name 'a' is given for values 0 and 255"),
    ({}, "give a mapping of mask pixel value to class name"),
    ({"0": "bg"}, "'0' is not an integer pixel value"),
    ({-1: "bg"}, "-1 (for 'bg') is not 0..255"),
    ({0: ""}, "class name '' for value 0 is not a non-empty string"),
])
def test_bad_mask_values_mapping_is_an_error(tmp_path, mapping, words):
    _pair(tmp_path, "a", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=re.escape(words)):
        load_pairs(tmp_path, mapping)


# --- fuzzing -------------------------------------------------------------------------------

_VALID_MASK = _png_bytes(np.array([[0, 255, 0], [255, 255, 0]], np.uint8))
_VALID_IMAGE = _png_bytes(np.full((2, 3, 3), 40, np.uint8))

_mangled = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda base, cut: base[:cut], st.sampled_from([_VALID_MASK, _VALID_IMAGE]),
              st.integers(0, len(_VALID_IMAGE))),
    st.builds(lambda base, at, junk: base[:at] + junk + base[at + len(junk):],
              st.sampled_from([_VALID_MASK, _VALID_IMAGE]), st.integers(0, 80),
              st.binary(min_size=1, max_size=6)),
)


@settings(max_examples=60, deadline=None, database=None)
@given(data=_mangled, which=st.sampled_from(["images", "masks"]))
def test_fuzz_random_bytes_as_mask_or_image_never_crash(data, which):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub, good in (("images", _VALID_IMAGE), ("masks", _VALID_MASK)):
            (root / sub).mkdir()
            (root / sub / "ok.png").write_bytes(good)
            (root / sub / "fuzz.png").write_bytes(good)
        (root / which / "fuzz.png").write_bytes(data)
        try:
            _, examples, skipped = load_pairs(root, {0: "bg", 255: "fg"}, shown_root="ds")
        except DataError as exc:
            assert "ds/" in str(exc)
            return
        ids = [ex.id for ex in examples]
        assert "ok" in ids
        assert ("fuzz" in ids) != any(s.path == f"ds/{which}/fuzz.png" for s in skipped)


@settings(max_examples=60, deadline=None, database=None)
@given(mask=arrays(np.uint8, st.tuples(st.integers(1, 8), st.integers(1, 8)),
                   elements=st.one_of(st.sampled_from([0, 1, 7, 128, 255]),
                                      st.integers(0, 255))),
       allowed=st.lists(st.integers(0, 255), min_size=1, max_size=4, unique=True))
def test_fuzz_random_mask_values_map_or_list_exactly_the_unexpected(mask, allowed):
    mapping = {v: f"c{v}" for v in allowed}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _pair(root, "m", mask)
        values, counts = np.unique(mask, return_counts=True)
        unexpected = {int(v): int(n) for v, n in zip(values, counts, strict=True)
                      if int(v) not in mapping}
        if not unexpected:
            names, examples, skipped = load_pairs(root, mapping)
            assert names == [f"c{v}" for v in allowed] and skipped == []
            ids = examples[0].mask
            assert ids.dtype == np.uint8 and ids.shape == mask.shape
            for class_id, value in enumerate(allowed):
                assert np.array_equal(ids == class_id, mask == value)
            return
        with pytest.raises(DataError) as info:
            load_pairs(root, mapping)
        line = next(ln for ln in str(info.value).splitlines() if "values not in" in ln)
        listed = {int(v): int(n) for v, n in re.findall(r"(\d+) \((\d+) px\)", line)}
        expected = dict(sorted(unexpected.items())[:10])
        assert listed == expected
        more = len(unexpected) - 10
        assert (f"... and {more} more values" in line) == (more > 0)
        assert line.endswith("allowed: " + ", ".join(str(v) for v in allowed))
