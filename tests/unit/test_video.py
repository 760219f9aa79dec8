"""Video files in a predict folder: frames read one by one with their index and time, a
rendered video written back, and videos that cannot be read skipped with their reason."""

from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from visionpipe import video
from visionpipe.predict import batches, list_files


def bar_frames(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """Frames with a white bar 8 px wide moving right by 4 px a frame: each frame's index can
    be read back from where its bar is, through lossy coding."""
    out = []
    for i in range(n):
        frame = np.zeros((h, w, 3), np.uint8)
        frame[:, 4 * i:4 * i + 8] = 255
        out.append(frame)
    return out


def bar_at(frame: np.ndarray) -> int:
    return int(np.argmax(np.convolve(frame[..., 0].mean(0), np.ones(8), "valid")))


def write_video(path, frames, rate=10) -> None:
    writer = video.Writer(path, Fraction(rate))
    for frame in frames:
        writer.write(frame)
    writer.close()


def test_frames_come_back_in_order_with_their_times(tmp_path):
    write_video(tmp_path / "clip.mp4", bar_frames(12), rate=10)
    got = list(video.frames(tmp_path / "clip.mp4"))
    assert [f.index for f in got] == list(range(12))
    assert [f.time_s for f in got] == pytest.approx([i / 10 for i in range(12)])
    assert [bar_at(f.image) for f in got] == [4 * i for i in range(12)]
    assert all(f.image.shape == (48, 64, 3) and f.rate == 10 for f in got)
    assert video.frame_count(tmp_path / "clip.mp4") == 12
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    assert video.frame_count(tmp_path / "bad.mp4") == 0


def test_the_writer_evens_odd_sizes_and_takes_pil_images(tmp_path):
    frames = [Image.fromarray(f[:47, :63]) for f in bar_frames(3)]
    write_video(tmp_path / "odd.mp4", frames)
    back = list(video.frames(tmp_path / "odd.mp4"))
    assert len(back) == 3 and back[0].image.shape == (48, 64, 3)


def test_predict_batches_mix_images_and_frames_and_skip_bad_videos(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(bar_frames(1)[0]).save(folder / "a.png")
    write_video(folder / "b.mp4", bar_frames(5))
    (folder / "c.mp4").write_bytes(b"\x00not a video" * 50)
    (folder / "d.avi").write_bytes(b"")
    skipped = []
    items = [it for chunk in batches(list_files(folder), folder, 4, skipped) for it in chunk]
    assert [(it.rel, it.frame) for it in items] == [("a.png", None)] + [
        ("b.mp4", i) for i in range(5)]
    assert [bar_at(it.image) for it in items[1:]] == [0, 4, 8, 12, 16]
    assert [s.path for s in skipped] == ["c.mp4", "d.avi"]
    assert all(s.reason.startswith("not a readable video: ") and s.kind ==
               "not a readable video" and "/" not in s.reason for s in skipped), skipped


def test_without_pyav_a_video_is_skipped_with_what_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "b.mp4", bar_frames(2))
    Image.fromarray(bar_frames(1)[0]).save(folder / "a.png")
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    skipped = []
    items = [it for chunk in batches(list_files(folder), folder, 4, skipped) for it in chunk]
    assert [it.rel for it in items] == ["a.png"]
    assert [(s.path, s.reason) for s in skipped] == [
        ("b.mp4", "a video; reading it needs PyAV: pip install av")]


def test_a_video_is_written_under_a_temporary_name_and_dropped_on_failure(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"the earlier file")
    writer = video.Writer(target, Fraction(10))
    for frame in bar_frames(3):
        writer.write(frame)
    assert target.read_bytes() == b"the earlier file"  # nothing renamed before close
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".out.tmp.mp4"]
    writer.close(keep=False)
    assert target.read_bytes() == b"the earlier file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    write_video(target, bar_frames(3))
    assert len(list(video.frames(target))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
