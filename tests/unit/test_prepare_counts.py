"""prepare's report counts must be the records written plus the files skipped: the counts
each source declares (issue 20, point 8), and prepare's own check of them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visionpipe.data.sources.mask_folder import load_pairs_counted
from visionpipe.stages.prepare import check_counts, declared_counts


@pytest.mark.parametrize("source, skipped, declared", [
    ({"kind": "voc", "annotations": {"samples": 6, "boxes": 11, "images_unreadable": 1}},
     [{"path": "x.jpg", "reason": "corrupt or truncated image: ..."}],
     {"samples": 6, "boxes": 11}),
    ({"kind": "folder", "files": 247}, [{}] * 3, {"samples": 244}),
    ({"kind": "pairs", "pairs": 30, "pairs_unreadable": 2, "samples": 28}, [{}] * 5,
     {"samples": 28}),
    ({"kind": "shapes"}, [], {}),
])
def test_each_source_declares_what_it_wrote(source, skipped, declared):
    assert declared_counts(source, skipped) == declared
    written = Counter(declared)
    check_counts("detection", source, skipped, written)  # agrees: no error
    if declared:
        written["samples"] += 1
        with pytest.raises(RuntimeError, match=r"samples: report \d+, written \d+"):
            check_counts("detection", source, skipped, written)


def test_pairs_count_pairs_not_skipped_files(tmp_path):
    """A pair with both files unreadable is one pair left out; a stray file is no pair."""
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for stem in ("a", "b", "c"):
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / sub / f"{stem}.png")
    (tmp_path / "images" / "b.png").write_bytes(b"")
    (tmp_path / "masks" / "b.png").write_bytes(b"")
    (tmp_path / "masks" / "c.png").write_text("not a png")
    (tmp_path / "images" / "notes.txt").write_text("stray")
    _, examples, skipped, counts = load_pairs_counted(tmp_path, {0: "bg"}, shown_root="p")
    assert [ex.id for ex in examples] == ["a"] and len(skipped) == 4
    assert counts == {"pairs": 3, "samples": 1, "pairs_unreadable": 2}
    kinds = Counter(s.kind for s in skipped)
    assert kinds == {"empty file (0 bytes)": 2, "not an image PIL can read": 1,
                     "not an image file": 1}
