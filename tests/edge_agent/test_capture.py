"""The take's hot path, segments, asynchronous pose and catch-up, on tiny frames."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest
from capture_fakes import (
    HEIGHT,
    WIDTH,
    crashed_recording,
    disk_filling_camera,
    make_jpegs,
    slow_pose_factory,
    square_centre,
    statvfs_with,
)
from tmpfs import mounted_tmpfs

from edge_agent.capture.buffers import BoundedBuffer, LatestSlot
from edge_agent.capture.clock import BoothClock
from edge_agent.capture.pose_worker import CATCH_UP, LIVE
from edge_agent.capture.segments import (
    read_recorded_frames,
    read_segment_frames,
    read_segment_packets,
)
from edge_agent.capture.sources import ReplayCamera
from edge_agent.capture.take import Take
from edge_agent.config import CaptureConfig
from edge_agent.frames import CapturedFrame, Granted

FPS = 240.0
N = 240  # one second at FPS

needs_ffprobe = pytest.mark.skipif(
    shutil.which("ffprobe") is None,
    reason="ffprobe not installed (Debian's ffmpeg package; `make setup` installs it as root)",
)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return make_jpegs(N)


def make_take(
    tmp_path: Path,
    jpegs: list[bytes],
    *,
    delay_s: float = 0.0,
    pose: bool = True,
    segment_s: float = 0.25,
    min_free_disk_mb: int = 0,
    realtime: bool = True,
    statvfs=os.statvfs,
    source=None,
    duration_s: float | None = None,
    session: str = "s1",
    device_buffers: int | None = None,
) -> Take:
    clock = BoothClock()
    source = source or ReplayCamera(
        jpegs,
        width=WIDTH,
        height=HEIGHT,
        fps=FPS,
        clock=clock,
        realtime=realtime,
        device_buffers=device_buffers,
    )
    return Take(
        session_id=session,
        camera_id="cam0",
        source=source,
        capture=CaptureConfig(
            out_dir=tmp_path, segment_s=segment_s, min_free_disk_mb=min_free_disk_mb
        ),
        clock=clock,
        pose_factory=slow_pose_factory(delay_s) if pose else None,
        duration_s=duration_s,
        statvfs=statvfs,
    )


def run_take(take: Take, timeout: float = 60.0):
    take.start()
    summary = take.wait(timeout)
    assert summary is not None, "the take did not finish"
    return summary


def segment_bytes(summary) -> list[bytes]:
    out = []
    for seg in summary.segments:
        out += [jpeg for _pts, jpeg in read_segment_packets(Path(summary.directory) / seg["file"])]
    return out


def ffprobe(path: Path) -> dict:
    done = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames:format_tags",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"ffprobe failed on {path.name}: {done.stderr}"
    return json.loads(done.stdout)


# ---- the hand-offs -----------------------------------------------------------------


def test_bounded_buffer_drops_and_counts_the_newest_when_full_and_never_blocks():
    buf: BoundedBuffer[int] = BoundedBuffer(3, "t")
    assert [buf.offer(i) for i in range(5)] == [True, True, True, False, False]
    assert (buf.dropped, buf.depth) == (2, 3)
    buf.close()
    assert buf.offer(9) is False
    assert list(buf) == [0, 1, 2]
    assert buf.get() is None and buf.depth == 0


def test_latest_slot_hands_over_the_newest_item_and_counts_the_replaced_ones():
    slot: LatestSlot[int] = LatestSlot()
    for i in range(4):
        slot.put(i)
    assert slot.take(timeout=1) == 3
    assert slot.replaced == 3
    assert slot.take(timeout=0.01) is None  # nothing new
    slot.put(7)
    slot.close()
    assert slot.take() == 7  # what was pending is still delivered
    assert slot.take() is None


# ---- the hot path -------------------------------------------------------------------


def test_slow_pose_backend_never_costs_a_captured_frame(tmp_path, jpegs):
    # 20 ms per pose at 240 fps: the model sees about one frame in five. The camera
    # holds 64 frames (267 ms) for a late loop, then loses frames as a device would:
    # a loop that waited for the model would fall seconds behind and lose most.
    n = 120
    take = make_take(tmp_path, jpegs[:n], delay_s=0.02, device_buffers=64)
    summary = run_take(take)
    assert take.source.lost_frames == 0
    c = summary.counters
    assert summary.frames == n
    assert summary.frames_written == n
    assert c["capture_dropped"] == 0 and c["segment_dropped"] == 0 and c["not_recorded"] == 0
    assert c["pose_dropped"] > n // 2, "the slow model should have skipped most frames"
    assert summary.pose["live"] + c["pose_dropped"] == n
    assert summary.pose["coverage"] == 1.0
    assert summary.ok


def test_a_camera_that_stops_delivering_mid_take_fails_the_take_and_keeps_its_frames(
    tmp_path, jpegs
):
    """A 1 s take whose stream ends after 40 frames: it passed for a whole take before."""
    summary = run_take(make_take(tmp_path, jpegs[:40], duration_s=N / FPS))
    assert summary.frames == summary.frames_written == 40
    assert not summary.ok
    assert summary.errors == [
        f"camera replay ended after 40 of {N} frames, before the take did (the stream stopped)"
    ]


def test_a_video_file_shorter_than_the_take_is_a_warning_not_a_failed_camera(tmp_path, jpegs):
    class ShortFile(ReplayCamera):
        ends_by_itself = True

    source = ShortFile(jpegs[:40], width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock())
    summary = run_take(make_take(tmp_path, jpegs, duration_s=N / FPS, source=source))
    assert summary.ok and summary.frames == 40
    assert summary.warnings == [
        f"camera replay ended after 40 of {N} frames: the file is shorter than the take"
    ]


@needs_ffprobe
def test_segments_play_in_ffprobe_and_hold_exactly_the_offered_jpegs(tmp_path, jpegs):
    summary = run_take(make_take(tmp_path, jpegs, pose=False))
    assert len(summary.segments) >= 3
    total = 0
    for seg in summary.segments:
        probe = ffprobe(Path(summary.directory) / seg["file"])
        (stream,) = probe["streams"]
        assert (stream["codec_name"], stream["width"], stream["height"]) == ("mjpeg", WIDTH, HEIGHT)
        assert int(stream["nb_read_frames"]) == seg["frames"]
        assert probe["format"]["tags"]["first_seq"] == str(seg["first_seq"])
        total += seg["frames"]
    assert total == N
    assert segment_bytes(summary) == jpegs  # byte-identical, in order, none missing


def test_segment_timestamps_are_relative_to_the_take_start_stored_as_metadata(tmp_path, jpegs):
    summary = run_take(make_take(tmp_path, jpegs[:60], pose=False))
    path = Path(summary.directory) / summary.segments[0]["file"]
    with av.open(str(path)) as c:
        start_ns = int(c.metadata["capture_start_ns"])
    assert start_ns == summary.first_ts_ns
    rows = (Path(summary.directory) / "frames.csv").read_text().splitlines()[1:]
    ts = [int(r.split(",")[1]) for r in rows]
    pts = [p for p, _ in read_segment_packets(path)]
    assert pts[0] == 0
    assert np.all(np.diff(pts) > 0)
    # Microsecond pts reproduce the capture timestamps (to the microsecond).
    assert [start_ns + p * 1000 for p in pts] == [t - (t - start_ns) % 1000 for t in ts[: len(pts)]]


def test_segments_roll_while_capturing_and_are_finalized_atomically(tmp_path, jpegs):
    release = threading.Event()

    class Gated(ReplayCamera):
        """Pauses after 150 frames until the test has looked at the directory."""

        def frames(self) -> Iterator[CapturedFrame]:
            for frame in super().frames():
                if frame.seq == 150:
                    release.wait(30)
                yield frame

    clock = BoothClock()
    source = Gated(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)
    take = make_take(tmp_path, jpegs, pose=False, source=source)
    take.start()
    try:
        deadline = time.monotonic() + 30
        while len(take.recorder.finished_segments()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        finished = take.recorder.finished_segments()
        assert len(finished) >= 2, "segments should be finalized while the take still runs"
        # The finished ones are complete files; the one being written is still a .part.
        for info in finished:
            assert info.path.exists()
            assert [s for s, _ in read_segment_frames(info)] == info.seqs
        assert any(p.name.endswith(".mp4.part") for p in take.directory.iterdir())
    finally:
        release.set()
    summary = take.wait(60)
    assert not [p for p in take.directory.iterdir() if p.name.endswith(".part")]
    assert sorted(p.name for p in take.directory.glob("*.mp4")) == [
        s["file"] for s in summary.segments
    ]
    assert segment_bytes(summary) == jpegs


def test_stream_subscription_gets_every_frame_in_order_and_a_full_one_only_drops(tmp_path, jpegs):
    take = make_take(tmp_path, jpegs, pose=False)
    reader = take.subscribe_stream()
    stalled = take.subscribe_stream(maxlen=16)  # nobody reads this one
    got: list[CapturedFrame] = []
    t = threading.Thread(target=lambda: got.extend(reader))
    t.start()
    summary = run_take(take)
    t.join(30)
    assert [f.seq for f in got] == list(range(N))
    assert [f.jpeg for f in got] == jpegs
    assert stalled.dropped == N - 16 and summary.counters["stream_dropped"] == [0, N - 16]
    assert summary.frames_written == N and summary.counters["capture_dropped"] == 0


def test_take_stops_after_its_duration(tmp_path, jpegs):
    summary = run_take(make_take(tmp_path, jpegs, pose=False, duration_s=0.5))
    assert summary.frames == int(0.5 * FPS)
    assert summary.frames_written == summary.frames


def test_stop_ends_the_take_at_the_next_frame_and_keeps_what_was_captured(tmp_path, jpegs):
    stopped = threading.Event()

    class WaitsForStop(ReplayCamera):
        def frames(self) -> Iterator[CapturedFrame]:
            for frame in super().frames():
                if frame.seq == 100:
                    stopped.wait(30)
                yield frame

    source = WaitsForStop(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock())
    take = make_take(tmp_path, jpegs, pose=False, source=source)
    buf = take.subscribe_stream()
    take.start()
    for _ in range(30):
        assert buf.get(timeout=10) is not None
    take.stop()
    stopped.set()
    summary = take.wait(30)
    assert 30 <= summary.frames <= 100  # frame 100 cannot arrive before stop()
    assert summary.frames_written == summary.frames
    assert segment_bytes(summary) == jpegs[: summary.frames]


def test_a_camera_that_goes_silent_is_reported_stalled_and_recovers(tmp_path, jpegs):
    """A loose cable leaves the device open and silent: status says so, on a fake clock."""
    silent, resume = threading.Event(), threading.Event()
    now = [0]

    class GoesSilent(ReplayCamera):
        def frames(self) -> Iterator[CapturedFrame]:
            for frame in super().frames():
                if frame.seq == 50:
                    silent.set()
                    resume.wait(30)
                yield frame

    source = GoesSilent(jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock())
    take = make_take(tmp_path, jpegs, pose=False, source=source)
    take._monotonic_ns = lambda: now[0]
    take.start()
    assert silent.wait(30)
    assert take.stalled() is None and not take.status()["errors"]  # no time has passed
    now[0] += int(0.5e9)
    assert take.stalled() is None  # half a second: a hiccup, not a stall
    now[0] += int(2.5e9)
    (error,) = take.status()["errors"]
    assert "stalled" in error and "no frame for 3.0 s after 50 frames" in error
    resume.set()
    summary = take.wait(30)
    assert summary.frames == N and take.stalled() is None  # ended: no longer "stalled"


# ---- pose ---------------------------------------------------------------------------


def test_catch_up_gives_every_frame_its_own_pose(tmp_path, jpegs):
    summary = run_take(make_take(tmp_path, jpegs, delay_s=0.01))
    assert summary.pose["coverage"] == 1.0
    assert summary.pose["live"] > 0 and summary.pose["catch_up"] > 0
    poses = np.load(Path(summary.directory) / "poses.npz")
    assert list(poses["seq"]) == list(range(N))
    assert set(np.unique(poses["source"])) == {LIVE, CATCH_UP}
    expected = np.array([square_centre(k) for k in range(N)])
    # Every joint sits on the square of *its own* frame, whichever pass posed it.
    assert np.abs(poses["raw"][:, 0, :2] - expected).max() < 1.0
    assert poses["skeleton"].shape == (N, 23, 3)
    assert poses["imputed"].shape == (N, 23) and poses["glitch"].shape == (N,)
    manifest = json.loads((Path(summary.directory) / "take.json").read_text())
    assert manifest["pose"]["coverage"] == 1.0 and manifest["poses"] == "poses.npz"
    assert manifest["frames"] == N and manifest["timestamps"] == "frames.csv"


def test_a_pose_backend_that_fails_to_load_leaves_capture_untouched(tmp_path, jpegs):
    def broken():
        raise FileNotFoundError("models/pose_landmark_full.tflite: no such file")

    take = make_take(tmp_path, jpegs[:60], pose=False)
    take._pose_factory = broken
    summary = run_take(take)
    assert summary.frames_written == 60
    assert summary.pose["coverage"] == 0.0
    assert any("pose backend unavailable" in w for w in summary.warnings)


# ---- bad input ------------------------------------------------------------------------


def test_corrupt_jpegs_are_counted_stored_untouched_and_crash_nothing(tmp_path, jpegs):
    frames = list(jpegs[:60])
    frames[10] = frames[10][: len(frames[10]) // 2]  # truncated USB transfer
    frames[20] = b"\x00garbage, not a JPEG at all"
    frames[30] = b""  # an empty buffer
    summary = run_take(make_take(tmp_path, frames, delay_s=0.005))
    assert summary.frames == 60
    assert summary.counters["corrupt_frames"] == 3
    assert summary.counters["capture_dropped"] == 0
    # Stored exactly as delivered; only the empty one cannot be put in an MP4.
    assert segment_bytes(summary) == [f for f in frames if f]
    assert summary.frames_written == 59
    assert summary.pose["corrupt"] >= 1
    assert summary.pose["coverage"] >= 57 / 60
    assert summary.state == "done"
    # Said in status, where staff look, not only counted.
    assert any(
        "3 corrupt JPEGs from the camera (first at frame 10)" in w for w in summary.warnings
    ), summary.warnings


def test_a_jpeg_damaged_inside_its_markers_is_said_in_status_once(tmp_path, jpegs):
    """Start and end markers in place, noise between: the recorder cannot tell, and only
    the pose worker's log knew (counted twice, by the live pass and the catch-up)."""
    frames = list(jpegs[:60])
    for i in (10, 20, 30):
        frames[i] = b"\xff\xd8" + bytes(range(256)) * 12 + b"\xff\xd9"
    summary = run_take(make_take(tmp_path, frames, delay_s=0.005))
    assert summary.counters["corrupt_frames"] == 0  # the recorder saw whole JPEGs
    assert summary.pose["corrupt"] == 3  # frames, each once
    assert (
        "3 JPEGs from the camera would not decode (first at frame 10); they have no pose "
        "(check the cable and the USB port)"
    ) in summary.warnings
    assert summary.ok and summary.frames_written == 60


@needs_ffprobe
def test_full_disk_stops_recording_cleanly_and_keeps_finished_segments(tmp_path, jpegs):
    free = {"mb": 10_000.0}  # below the 100 MB threshold from frame 130 on
    clock = BoothClock()
    source = disk_filling_camera(jpegs, free, width=WIDTH, height=HEIGHT, fps=FPS, clock=clock)
    take = make_take(
        tmp_path,
        jpegs,
        source=source,
        min_free_disk_mb=100,
        statvfs=statvfs_with(free),
        delay_s=0.005,
    )
    summary = run_take(take)
    assert take.recorder.state == "disk_full"
    assert any("min_free_disk_mb=100" in e and "recording stopped" in e for e in summary.errors)
    assert summary.frames == N, "capture itself goes on (stream and pose still get frames)"
    assert 0 < summary.frames_written < N
    assert summary.frames_written + summary.counters["not_recorded"] == N
    assert not list(take.directory.glob("*.part"))
    written = 0
    for seg in summary.segments:
        info_path = Path(summary.directory) / seg["file"]
        assert int(ffprobe(info_path)["streams"][0]["nb_read_frames"]) == seg["frames"]
        stored = [j for _p, j in read_segment_packets(info_path)]
        assert stored == jpegs[seg["first_seq"] : seg["last_seq"] + 1]
        written += seg["frames"]
    assert written == summary.frames_written
    # Coverage is over the frames captured, the unrecorded ones included (they were posed).
    poses = np.load(Path(summary.directory) / "poses.npz")
    assert summary.pose["coverage"] == round(int(np.count_nonzero(poses["source"])) / N, 6)


def test_a_last_segment_that_fails_to_finalize_is_an_error_not_a_clean_take(
    tmp_path, jpegs, monkeypatch
):
    """A short write often shows only when the last segment is closed, after the writer
    stopped: its frames must count as not recorded, with the reason in errors."""
    import edge_agent.capture.segments as segments

    def short_write(path, frames, payload):
        raise segments.IncompleteSegment(errno.EIO, f"{path.name}: short write")

    monkeypatch.setattr(segments, "verify_segment", short_write)
    take = make_take(tmp_path, jpegs[:30], segment_s=60.0, realtime=False, pose=False)
    summary = run_take(take)
    assert summary.frames == 30
    assert summary.frames_written == 0 and summary.counters["not_recorded"] == 30
    assert not summary.ok
    assert any("short write" in e for e in summary.errors), summary.errors
    assert take.recorder.state == "error"
    assert not list(take.directory.glob("*.part"))
    assert not list(take.directory.glob("seg_*.mp4")), "an unverified segment was named final"


@pytest.fixture
def tiny_tmpfs(tmp_path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tiny", 1024):
        yield tmp_path / "tiny"


@needs_ffprobe
def test_enospc_on_a_really_full_disk_keeps_finished_segments_valid(tiny_tmpfs):
    # Noise frames of ~15 KB: a 1 MB filesystem fills after about 60 of them.
    rng = np.random.default_rng(1)
    frames = [
        cv2.imencode(".jpg", rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8))[1].tobytes()
        for _ in range(120)
    ]
    summary = run_take(make_take(tiny_tmpfs, frames, pose=False, segment_s=0.05))
    take_dir = Path(summary.directory)
    assert 0 < summary.frames_written < 120
    # It names the first frame not recorded: the dropped segment's first, not the frame
    # whose write failed (up to a segment later, or later still when the finalizer's
    # failure comes after the writer's).
    recorded = {q for g in summary.segments for q in range(g["first_seq"], g["last_seq"] + 1)}
    first_lost = min(set(range(120)) - recorded)
    [error] = [e for e in summary.errors if "disk full" in e]
    assert f"recording stopped at frame {first_lost};" in error
    assert summary.frames_written + summary.counters["not_recorded"] == 120
    assert not list(take_dir.glob("*.part")), "the broken segment must not be left behind"
    for seg in summary.segments:
        path = take_dir / seg["file"]
        assert int(ffprobe(path)["streams"][0]["nb_read_frames"]) == seg["frames"]
        stored = [j for _p, j in read_segment_packets(path)]
        assert stored == frames[seg["first_seq"] : seg["last_seq"] + 1]


# ---- sources ------------------------------------------------------------------------------


def _write_mjpeg_mp4(path: Path, jpegs: list[bytes], realtime: bool = False) -> None:
    take = make_take(path.parent / "src", jpegs, pose=False, realtime=realtime, segment_s=60)
    summary = run_take(take)
    shutil.copy(Path(summary.directory) / summary.segments[0]["file"], path)


def test_file_source_passes_mjpeg_bytes_through_unchanged(tmp_path, jpegs):
    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource

    src = tmp_path / "in.mp4"
    _write_mjpeg_mp4(src, jpegs[:50])
    cam = VideoFileCamera(FileSource(path=src, rate="max"), BoothClock())
    granted = cam.open()
    assert (granted.width, granted.height, granted.pixel_format) == (WIDTH, HEIGHT, "mjpeg")
    frames = list(cam.frames())
    assert [f.jpeg for f in frames] == jpegs[:50]
    assert [f.seq for f in frames] == list(range(50))


def test_file_source_transcodes_other_codecs_to_jpeg_and_can_loop(tmp_path):
    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource

    path = tmp_path / "in.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for k in range(12):
            img = np.full((HEIGHT, WIDTH, 3), 20 * k, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cam = VideoFileCamera(FileSource(path=path, rate="max", loop=True), BoothClock())
    assert cam.open().fps == 30
    frames = []
    for frame in cam.frames():
        frames.append(frame)
        if len(frames) == 30:
            break
    assert [f.seq for f in frames] == list(range(30))
    decoded = [cv2.imdecode(np.frombuffer(f.jpeg, np.uint8), cv2.IMREAD_COLOR) for f in frames]
    assert all(d is not None and d.shape == (HEIGHT, WIDTH, 3) for d in decoded)
    assert abs(int(decoded[12].mean()) - int(decoded[0].mean())) < 5, "the loop restarts"
    assert np.all(np.diff([f.capture_ts_ns for f in frames]) > 0)


def test_file_source_replays_at_its_native_rate(tmp_path, jpegs):
    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource

    src = tmp_path / "in.mp4"
    _write_mjpeg_mp4(src, jpegs[:48], realtime=True)  # 0.2 s at 240 fps
    cam = VideoFileCamera(FileSource(path=src, rate="native"), BoothClock())
    cam.open()
    t0 = time.monotonic()
    frames = list(cam.frames())
    assert time.monotonic() - t0 >= 47 / FPS  # paced, not as fast as possible
    ts = np.array([f.capture_ts_ns for f in frames])
    assert np.allclose(np.diff(ts), 1e9 / FPS, atol=2e3)  # stamped on the file's own schedule


def test_missing_video_file_is_a_device_error_naming_it(tmp_path):
    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource
    from edge_agent.errors import DeviceError

    with pytest.raises(DeviceError, match="nope.mp4: no such file"):
        VideoFileCamera(FileSource(path=tmp_path / "nope.mp4"), BoothClock()).probe()


def test_missing_v4l2_device_is_a_clear_device_error():
    from edge_agent.capture.sources import V4L2Camera
    from edge_agent.config import V4L2Source
    from edge_agent.errors import DeviceError

    cam = V4L2Camera(V4L2Source(device="/dev/video-missing-42"), BoothClock())
    with pytest.raises(DeviceError, match=r"/dev/video-missing-42: no such device"):
        cam.open()
    with pytest.raises(DeviceError, match="no such device"):
        cam.probe()


def test_v4l2_granted_rate_below_the_asked_one_is_reported():
    from edge_agent.capture.sources import V4L2Camera
    from edge_agent.config import V4L2Source

    cam = V4L2Camera(V4L2Source(device="/dev/video0", fps=120, size="640x480"), BoothClock())
    cam._check(Granted(640, 480, 60.0))
    assert cam.warnings == ["camera /dev/video0 granted 60 fps, below the 120 fps asked"]
    cam._check(Granted(640, 480, 119.88))  # NTSC-style rounding is not a shortfall
    assert cam.warnings == []
    cam._check(Granted(320, 240, 120.0))
    assert cam.warnings == ["camera /dev/video0 granted 320x240, not the 640x480 asked"]


def test_a_v4l2_device_that_reports_no_frame_rate_is_taken_at_the_asked_one_with_a_warning():
    """Granted 0 fps, a take ended after duration x 30 frames: a quarter of it at 120 fps."""
    from types import SimpleNamespace

    from edge_agent.capture.sources import V4L2Camera
    from edge_agent.config import V4L2Source

    cam = V4L2Camera(V4L2Source(device="/dev/video0", fps=120, size="640x480"), BoothClock())
    codec = SimpleNamespace(width=640, height=480, name="mjpeg")
    stream = SimpleNamespace(
        codec_context=codec, average_rate=None, base_rate=None, guessed_rate=None
    )
    granted = cam._granted(SimpleNamespace(streams=SimpleNamespace(video=[stream])))
    assert granted.fps == 120.0
    cam._check(granted)
    assert cam.warnings == [
        "camera /dev/video0 did not report its frame rate; assuming the 120 fps asked"
    ]


def test_v4l2_device_timestamps_go_on_the_booth_clock_and_gaps_count_as_lost_frames():
    from fractions import Fraction

    from edge_agent.capture.sources import DeviceTimestamps

    clock = BoothClock(offset_ns=5_000)
    now = 1_000_000_000_000
    stamps = DeviceTimestamps(clock, Fraction(1, 1_000_000), 100.0, monotonic_ns=lambda: now)
    base_us = now // 1000
    got = [stamps.stamp(base_us + k * 10_000) for k in (0, 1, 2, 5, 6)]  # frames 3, 4 missing
    assert got == [(base_us + k * 10_000) * 1000 + 5_000 for k in (0, 1, 2, 5, 6)]
    assert stamps.lost == 2


def test_a_camera_that_slows_down_is_not_counted_as_dropping_every_other_frame():
    """Auto-exposure in a dim booth halves a UVC camera's rate: 600 frames at 60 fps
    from a camera granted 120 are a slower camera, not 600 lost frames."""
    from fractions import Fraction

    from edge_agent.capture.sources import DeviceTimestamps

    now = 1_000_000_000_000
    stamps = DeviceTimestamps(BoothClock(), Fraction(1, 1_000_000), 120.0, monotonic_ns=lambda: now)
    base_us = now // 1000
    for k in range(600):
        stamps.stamp(base_us + k * 16_667)
    assert stamps.lost < 10  # the few frames before the delivered rate is measured
    before = stamps.lost
    stamps.stamp(base_us + 599 * 16_667 + 4 * 16_667)  # then three frames really missing
    assert stamps.lost - before == 3


def test_v4l2_timestamps_not_on_the_monotonic_clock_are_replaced_by_arrival_time():
    from fractions import Fraction

    from edge_agent.capture.sources import DeviceTimestamps

    clock = BoothClock()
    stamps = DeviceTimestamps(clock, Fraction(1, 1_000_000), 100.0, monotonic_ns=lambda: 10**18)
    before = clock.now_ns()
    ts = stamps.stamp(42)  # a wall-clock or zero-based device timestamp
    assert before <= ts <= clock.now_ns()


def test_repeated_and_backward_timestamps_are_bumped_so_every_frame_is_stored(tmp_path, jpegs):
    class StuckClock(ReplayCamera):
        def frames(self) -> Iterator[CapturedFrame]:
            for frame in super().frames():
                # Three frames per timestamp, and one that goes back in time.
                ts = 10**12 + (frame.seq // 3) * 1_000_000 - (5_000_000 if frame.seq == 7 else 0)
                yield CapturedFrame(frame.seq, ts, frame.jpeg)

    source = StuckClock(jpegs[:30], width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock())
    summary = run_take(make_take(tmp_path, jpegs, pose=False, source=source))
    assert summary.frames_written == 30
    pts = [
        p
        for s in summary.segments
        for p, _ in read_segment_packets(Path(summary.directory) / s["file"])
    ]
    assert len(pts) == 30 and all(b > a for a, b in zip(pts, pts[1:], strict=False))
    assert segment_bytes(summary) == jpegs[:30]


class _DropsAJoint:
    """Sees every joint at (40, 30) but loses the left wrist on frame 5."""

    name = "drops-a-joint"

    def estimate(self, rgb: np.ndarray):
        from edge_agent import skeleton as sk
        from edge_agent.pose.base import PoseResult

        skel = sk.empty()
        skel[:, 0], skel[:, 1], skel[:, 2] = 40.0, 30.0, 0.9
        if rgb[0, 0, 0] > 128:  # frame 5 is marked by a bright corner
            skel[sk.INDEX["left_wrist"]] = 0.0
        return PoseResult(skeleton=skel, detected=True)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_live_poses_go_through_the_causal_smoother_which_fills_a_short_gap(jpegs):
    from edge_agent import skeleton as sk
    from edge_agent.capture.pose_worker import PoseStore, PoseWorker
    from edge_agent.smoothing import CausalSmoother

    frames = []
    for k in range(6):
        img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        img[:8, :8] = 255 if k == 5 else 0
        frames.append(CapturedFrame(k, k * 1_000_000_000 // 120, cv2.imencode(".jpg", img)[1]))
    slot: LatestSlot[CapturedFrame] = LatestSlot()
    store = PoseStore()
    worker = PoseWorker(slot, _DropsAJoint, store, smoother=CausalSmoother(fps=120.0))
    worker.start()
    for f in frames:  # one at a time, so that the worker sees every frame
        slot.put(CapturedFrame(f.seq, f.capture_ts_ns, f.jpeg.tobytes()))
        deadline = time.monotonic() + 30
        while worker.counters.posed <= f.seq and time.monotonic() < deadline:
            time.sleep(0.005)
    slot.close()
    assert worker.join(30)
    wrist = sk.INDEX["left_wrist"]
    raw = store.arrays(6)["raw"]
    assert raw[5, wrist, 2] == 0.0  # the take keeps what the model saw
    seq, live = worker.live
    assert seq == 5 and live[wrist, 2] > 0  # the live view imputes the one-frame gap
    assert abs(live[wrist, 0] - 40.0) < 1.0 and abs(live[wrist, 1] - 30.0) < 1.0


def test_a_take_reports_its_newest_live_pose_as_fractions_of_the_frame(tmp_path, jpegs):
    take = make_take(tmp_path, [jpegs[0]] * 60)  # the dancer holds still
    run_take(take)
    live = take.status()["pose"]["live"]
    assert live is not None and len(live["keypoints"]) == 23
    x, y, score = live["keypoints"][0]
    raw = take.store.arrays(60)["raw"][live["seq"], 0]
    assert score > 0
    assert x == pytest.approx(raw[0] / WIDTH, abs=2e-3)
    assert y == pytest.approx(raw[1] / HEIGHT, abs=2e-3)


class _PoolOfThree:
    """A backend that poses frames independently on three devices, like an EdgeTPU pool.

    Its first three calls wait for each other: a catch-up pass that keeps one frame in
    flight breaks the barrier (and fails the test) instead of hanging.
    """

    name = "pool-of-three"
    parallelism = 3

    def __init__(self) -> None:
        from capture_fakes import SlowPose

        self.finder = SlowPose(0.0)
        self.first_three = threading.Barrier(3, timeout=20)
        self.calls = 0
        self.lock = threading.Lock()

    def estimate(self, rgb: np.ndarray):
        with self.lock:
            self.calls += 1
            early = self.calls <= 3
        if early:
            self.first_three.wait()  # raises BrokenBarrierError unless 3 are in flight
        return self.finder.estimate(rgb)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_catch_up_keeps_every_device_of_a_pool_busy_and_stores_poses_in_frame_order(
    tmp_path, jpegs
):
    from edge_agent.capture.pose_worker import PoseStore, catch_up

    take = make_take(tmp_path, jpegs, pose=False)
    run_take(take)
    store = PoseStore()
    result = catch_up(take.recorder.finished_segments(), store, _PoolOfThree())
    assert result.errors == 0 and result.posed == N == len(store)
    raw = store.arrays(N)["raw"]
    expected = np.array([square_centre(k) for k in range(N)])
    assert np.abs(raw[:, 0, :2] - expected).max() < 1.0  # each pose on its own frame


def test_a_recording_cut_off_mid_take_gives_back_its_frames_by_the_segment_indexes(tmp_path, jpegs):
    frames = [CapturedFrame(i, 10**9 + i * 8_333_333, jpegs[i % len(jpegs)]) for i in range(192)]
    crashed = tmp_path / "take"
    crashed_recording(crashed, frames, segment_s=1.0)  # killed 1.6 s into the take
    assert not (crashed / "frames.csv").exists()
    finished = [f.name for f in crashed.glob("seg_*.mp4")]
    assert finished == ["seg_00000.mp4"] and (crashed / "seg_00001.mp4.part").exists()

    got = list(read_recorded_frames(crashed))
    # The finished segment (1 s: 121 frames) and the .part's complete 250 ms fragments;
    # its last, unfinished fragment never reached the disk.
    assert 121 + 30 <= len(got) < len(frames)
    assert [f.seq for f in got] == list(range(len(got)))
    assert all(f == frames[f.seq] for f in got)  # same bytes, same timestamps
    assert [f.seq for f in read_recorded_frames(crashed, 150)] == list(range(150, len(got)))


def test_catch_up_starts_tracking_afresh_after_each_run_of_frames_posed_live(jpegs):
    """The frames between two runs were posed live: tracking on from the last run's region
    of interest follows where the dancer was, not where they are."""
    from capture_fakes import SlowPose

    from edge_agent.capture.pose_worker import PoseStore, pose_frames

    class Tracking(SlowPose):
        def __init__(self) -> None:
            super().__init__(0.0)
            self.calls: list[str] = []

        def estimate(self, rgb: np.ndarray):
            self.calls.append("pose")
            return super().estimate(rgb)

        def reset(self) -> None:
            self.calls.append("reset")

    store = PoseStore()
    for seq in (2, 3, 7):  # posed live
        store.put(seq, np.zeros((23, 3), np.float32), False, 0)
    backend = Tracking()
    pose_frames([(seq, jpegs[seq % len(jpegs)]) for seq in range(9)], store, backend)
    # 0 1 | (2 3 posed) 4 5 6 | (7 posed) 8: afresh at the start and after each skip.
    assert backend.calls == [
        "reset", "pose", "pose", "reset", "pose", "pose", "pose", "reset", "pose"
    ]  # fmt: skip


def test_a_phone_video_with_a_display_rotation_replays_upright(tmp_path):
    """A phone stores a landscape buffer and a rotation that players apply: replayed as
    stored, the dancer lies on their side, and pose finds nobody."""
    import shutil
    import subprocess

    import cv2

    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg (apt) is missing; `make setup` installs it")
    sensor, phone = tmp_path / "sensor.mp4", tmp_path / "phone.mp4"
    ffmpeg = ["ffmpeg", "-loglevel", "error", "-y"]
    subprocess.run(
        [*ffmpeg, "-f", "lavfi", "-i", "testsrc=size=320x240:rate=30", "-t", "0.3"]
        + ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(sensor)],
        check=True,
    )
    subprocess.run(
        [*ffmpeg, "-i", str(sensor), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(phone)],
        check=True,
    )

    def first_frame(path):
        cam = VideoFileCamera(FileSource(path=path, rate="max"), BoothClock())
        granted = cam.open()
        frame = next(iter(cam.frames()))
        cam.close()
        return granted, cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)

    granted, upright = first_frame(phone)
    assert (granted.width, granted.height) == (240, 320)
    assert upright.shape[:2] == (320, 240)
    # The picture as ffmpeg shows it (it applies the rotation, as players do).
    shown = tmp_path / "shown.png"
    subprocess.run([*ffmpeg, "-i", str(phone), "-frames:v", "1", str(shown)], check=True)
    player = cv2.imread(str(shown))
    assert player.shape == upright.shape
    assert np.abs(upright.astype(int) - player.astype(int)).mean() < 6
    _, stored = first_frame(sensor)  # the buffer as stored: not what the player shows
    assert stored.shape[:2] == (240, 320)


# ---- guards a mutation audit found missing ------------------------------------------------


def test_a_stuck_segment_writer_costs_segment_drops_never_a_capture_wait(
    tmp_path, jpegs, monkeypatch
):
    """The writer is held on its first frame until the camera has delivered every frame:
    a capture loop that waited for room in the segment queue never gets there."""
    import edge_agent.capture.segments as segments

    captured = threading.Event()
    released_by_capture: list[bool] = []
    real_mux = segments._OpenSegment.mux

    def held_mux(self, jpeg, pts_us):
        if not released_by_capture:
            released_by_capture.append(captured.wait(15))
        real_mux(self, jpeg, pts_us)

    monkeypatch.setattr(segments._OpenSegment, "mux", held_mux)

    class Signals(ReplayCamera):
        def frames(self) -> Iterator[CapturedFrame]:
            yield from super().frames()
            captured.set()

    frames = jpegs * 5  # 1200 frames: more than the segment queue holds (960 at 240 fps)
    source = Signals(
        frames, width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock(), realtime=False
    )
    summary = run_take(make_take(tmp_path, frames, pose=False, source=source))
    assert released_by_capture == [True], "capture waited for the segment writer"
    c = summary.counters
    assert summary.frames == len(frames)
    assert c["segment_dropped"] > 0
    assert summary.frames_written + c["segment_dropped"] == len(frames)
    # Drops are the segment consumer's; the capture counter only counts the device's.
    assert summary.capture_dropped == 0 and c["capture_dropped"] == 0


def test_status_counts_a_stalled_streams_drops_there_not_as_capture_drops(tmp_path, jpegs):
    take = make_take(tmp_path, jpegs, pose=False)
    take.subscribe_stream(maxlen=16)  # nobody reads it
    run_take(take)
    st = take.status()
    assert st["stream"][0]["dropped"] == N - 16
    assert st["capture_dropped"] == 0


def test_segments_roll_exactly_every_segment_s(tmp_path, jpegs):
    t0 = 10**12

    class ExactClock(ReplayCamera):
        def frames(self) -> Iterator[CapturedFrame]:
            for f in super().frames():
                yield CapturedFrame(f.seq, t0 + round(f.seq * 1e9 / FPS), f.jpeg)

    source = ExactClock(
        jpegs, width=WIDTH, height=HEIGHT, fps=FPS, clock=BoothClock(), realtime=False
    )
    summary = run_take(make_take(tmp_path, jpegs, pose=False, source=source, segment_s=0.25))
    per_segment = int(0.25 * FPS)  # 60
    assert [s["frames"] for s in summary.segments] == [per_segment] * (N // per_segment)
    assert [s["first_seq"] for s in summary.segments] == list(range(0, N, per_segment))
    assert segment_bytes(summary) == jpegs


def test_a_file_replayed_at_its_native_rate_is_stamped_with_the_booth_offset(tmp_path, jpegs):
    import time

    from edge_agent.capture.sources import VideoFileCamera
    from edge_agent.config import FileSource

    src = tmp_path / "in.mp4"
    _write_mjpeg_mp4(src, jpegs[:24], realtime=True)
    offset = 3_600 * 10**9
    cam = VideoFileCamera(FileSource(path=src, rate="native"), BoothClock(offset_ns=offset))
    cam.open()
    before = time.monotonic_ns() + offset
    ts = [f.capture_ts_ns for f in cam.frames()]
    after = time.monotonic_ns() + offset
    assert len(ts) == 24 and before <= min(ts) and max(ts) <= after


def test_each_segment_index_is_fsynced_before_its_segment(tmp_path, jpegs, fsynced):
    summary = run_take(make_take(tmp_path, jpegs[:120], pose=False, segment_s=0.25))
    assert len(summary.segments) >= 2
    names = [Path(p).name for p in fsynced]
    for seg in summary.segments:
        stem = seg["file"].removesuffix(".mp4")
        assert f"{stem}.seqs" in names, f"{stem}.seqs never fsynced"
        assert names.index(f"{stem}.seqs") < names.index(f"{seg['file']}.part")


def test_a_full_disk_found_mid_segment_finalizes_the_segment_in_progress(tmp_path, jpegs):
    """The once-a-second check (not a segment start) finds the disk full: the segment being
    written is good and is kept, the recording just stops there."""
    calls = []

    def statvfs(path):  # room at the first check (segment start), full from the next one on
        calls.append(path)
        mb = 10_000 if len(calls) == 1 else 5
        return SimpleNamespace(f_bavail=mb * 256, f_frsize=4096)

    frames = jpegs * 2  # 480 frames; the check comes every 240 (once a second at 240 fps)
    take = make_take(
        tmp_path,
        frames,
        pose=False,
        realtime=False,
        segment_s=60.0,
        min_free_disk_mb=100,
        statvfs=statvfs,
    )
    summary = run_take(take)
    assert take.recorder.state == "disk_full"
    assert [(s["first_seq"], s["last_seq"]) for s in summary.segments] == [(0, 239)]
    assert summary.frames_written == 240 and summary.counters["not_recorded"] == 240
    assert segment_bytes(summary) == frames[:240]
