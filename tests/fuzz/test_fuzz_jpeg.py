"""Fuzzing the JPEG path: camera bytes through capture, pose decode and ingest.

A USB transfer can truncate a frame; a broken camera can send anything. Properties:
- the structural checks (``jpeg_looks_complete`` on the edge, ``check_jpeg`` at
  ingest) are total functions that say exactly what they document;
- the segment recorder stores any bytes it is given exactly as given (an empty
  frame is counted as not recorded), never raising;
- ``decode_jpeg`` on any bytes, above all a valid header with a garbage body,
  returns an RGB frame or raises BadInput, and the pose worker never raises;
- the ingest server stores such a frame or refuses it with INVALID_ARGUMENT,
  and keeps serving.

A bug this found (a header claiming a huge frame) is a regression test at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import transport_helpers as th
from fuzz_settings import fuzz_marks, fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from cloud_trainer.ingest.server import check_jpeg
from edge_agent.capture.pose_worker import PoseCounters, _estimate
from edge_agent.capture.segments import SegmentRecorder, read_segment_frames
from edge_agent.errors import BadInput
from edge_agent.frames import CapturedFrame, jpeg_looks_complete
from edge_agent.pose.base import (
    MAX_JPEG_PIXELS,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    PoseResult,
    decode_jpeg,
)

pytestmark = fuzz_marks()

ROOT = Path(__file__).resolve().parents[2]
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
JPEG = th.make_jpeg(7, size=(64, 48))
# Header = everything up to and including the start-of-scan segment; after it, entropy data.
_SOS = JPEG.find(b"\xff\xda")
HEADER = JPEG[: _SOS + 2 + int.from_bytes(JPEG[_SOS + 2 : _SOS + 4], "big")]
_SOF_RE = re.compile(rb"\xff[\xc0-\xc3\xc5-\xc7\xc9-\xcb\xcd-\xcf]..\x08?(.{2})(.{2})", re.DOTALL)
# Frames whose header claims more than this (and no more than decode_jpeg accepts) are kept
# out of the decode properties, for time only: a garbage 4096x4096 frame takes a second.
MAX_DECLARED_PX = 2048 * 2048


def declared_pixels(data: bytes) -> int:
    """The most pixels any start-of-frame marker in ``data`` claims (0 if none)."""
    most = 0
    for m in _SOF_RE.finditer(data):
        most = max(most, int.from_bytes(m.group(1), "big") * int.from_bytes(m.group(2), "big"))
    return most


@st.composite
def damaged_jpegs(draw: st.DrawFn) -> bytes:
    """A real camera JPEG, damaged the ways USB and broken cameras damage them."""
    kind = draw(
        st.sampled_from(["garbage body", "truncated", "flipped", "spliced", "padded", "raw"])
    )
    data = bytearray(JPEG)
    if kind == "garbage body":
        body = draw(st.binary(min_size=0, max_size=4000))
        data = bytearray(HEADER + body + draw(st.sampled_from([EOI, b"", EOI + b"\0\0"])))
    elif kind == "truncated":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "flipped":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "spliced":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    elif kind == "padded":
        data += draw(st.binary(max_size=80))
    else:
        data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


ANY_FRAME = damaged_jpegs() | st.binary(max_size=64) | st.just(JPEG)


# ---- structural checks --------------------------------------------------------------------------


@fuzz_settings(share=3.0)
@given(data=ANY_FRAME)
def test_jpeg_looks_complete_says_exactly_soi_first_and_eoi_near_the_end(data: bytes) -> None:
    expected = data.startswith(SOI) and EOI in data[-64:]
    assert jpeg_looks_complete(data) is expected


@fuzz_settings(share=3.0)
@given(data=ANY_FRAME, seq=st.integers(0, 2**31 - 1))
def test_check_jpeg_refuses_exactly_frames_without_soi_or_eoi(data: bytes, seq: int) -> None:
    expected = len(data) >= 4 and data.startswith(SOI) and EOI in data[-64:]
    try:
        check_jpeg(seq, data)
    except BadInput as e:
        assert not expected and f"frame {seq} " in str(e)
    else:
        assert expected


# ---- the edge: record, decode, pose ----------------------------------------------------------------


@fuzz_settings(share=0.3)
@given(payloads=st.lists(ANY_FRAME | st.just(b""), min_size=1, max_size=12))
def test_the_segment_recorder_stores_any_bytes_exactly(payloads: list[bytes], tmp_path) -> None:
    out = tmp_path / f"take-{len(list(tmp_path.iterdir()))}"
    rec = SegmentRecorder(out, width=64, height=48, fps=120, segment_s=0.05, min_free_disk_mb=0)
    rec.start()
    for seq, data in enumerate(payloads):
        assert rec.queue.offer(CapturedFrame(seq, 1_000_000_000 + seq * 8_333_333, data))
    rec.close()
    assert rec.wait(30), "the recorder threads did not finish"
    assert rec.state == "stopped" and rec.error is None
    stored = {}
    for info in rec.finished_segments():
        for seq, data in read_segment_frames(info):
            assert seq not in stored
            stored[seq] = data
    expected = {seq: data for seq, data in enumerate(payloads) if data}
    assert stored == expected
    assert rec.frames_written == len(expected)
    assert rec.frames_not_recorded == len(payloads) - len(expected)
    assert rec.corrupt_frames == sum(not jpeg_looks_complete(p) for p in payloads)


@fuzz_settings(share=1.0)
@given(data=ANY_FRAME)
def test_decode_jpeg_gives_an_rgb_frame_or_bad_input(data: bytes) -> None:
    assume(not MAX_DECLARED_PX < declared_pixels(data) <= MAX_JPEG_PIXELS)
    try:
        rgb = decode_jpeg(data)
    except BadInput as e:
        assert "JPEG" in str(e) or "pose input" in str(e)
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert min(rgb.shape[:2]) >= MIN_SIDE_PX and max(rgb.shape[:2]) <= MAX_SIDE_PX


class _RecordingBackend:
    """A pose backend that checks what the worker hands it."""

    name = "recording"

    def __init__(self) -> None:
        self.frames = 0

    def estimate(self, rgb: np.ndarray) -> PoseResult:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3
        self.frames += 1
        return PoseResult(detected=False, frame_size=(rgb.shape[1], rgb.shape[0]))

    def reset(self) -> None: ...

    def close(self) -> None: ...


@fuzz_settings(share=1.0)
@given(frames=st.lists(damaged_jpegs(), min_size=1, max_size=6))
def test_the_pose_worker_counts_corrupt_frames_and_never_raises(frames: list[bytes]) -> None:
    assume(all(not MAX_DECLARED_PX < declared_pixels(f) <= MAX_JPEG_PIXELS for f in frames))
    backend, counters = _RecordingBackend(), PoseCounters()
    results = [_estimate(backend, f, seq, counters, "fuzz") for seq, f in enumerate(frames)]
    assert counters.corrupt + backend.frames == len(frames)
    assert sum(r is None for r in results) == counters.corrupt + counters.errors


@pytest.mark.skipif(
    not (ROOT / "models" / "pose_landmark_full.tflite").exists(), reason="no models"
)
def test_the_cpu_backend_poses_garbage_body_frames_without_raising() -> None:
    from edge_agent.config import CpuPose
    from edge_agent.pose.base import create_pose_backend

    rng = np.random.default_rng(3)
    # A real 256x192 header; bodies of random bytes decode to noise (libjpeg fills the rest).
    img = cv2.resize(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), (256, 192))
    header_and_body = cv2.imencode(".jpg", img)[1].tobytes()
    sos = header_and_body.find(b"\xff\xda")
    header = header_and_body[: sos + 2 + int.from_bytes(header_and_body[sos + 2 : sos + 4], "big")]
    backend = create_pose_backend(CpuPose(models_dir=ROOT / "models", threads=1))
    try:
        counters = PoseCounters()
        for seq in range(6):
            body = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
            out = _estimate(backend, header + body + EOI, seq, counters, "fuzz")
            if out is not None:
                skeleton, _detected = out
                assert skeleton.shape == (23, 3) and np.isfinite(skeleton).all()
        assert counters.errors == 0
    finally:
        backend.close()


# ---- ingest: a valid header with a garbage body ---------------------------------------------------


@pytest.fixture
async def ingest(tmp_path):
    from cloud_trainer.repository import Repository
    from cloud_trainer.storage import create_blob_store

    cfg = th.booth_config(tmp_path, cameras=("cam0",))
    repo = Repository.from_config(cfg.database)
    store = create_blob_store(cfg.storage)
    async with th.running_server(cfg, repo=repo, store=store) as srv:
        yield srv, repo, store


@fuzz_settings(share=0.3)
@given(body=st.binary(max_size=3000), end=st.sampled_from([EOI, b"", b"\0" * 70]))
async def test_ingest_stores_a_garbage_body_jpeg_as_sent_or_refuses_it(ingest, body, end) -> None:
    srv, repo, store = ingest
    frame = HEADER + body + end
    sid = th.new_session(repo)
    token = th.token_for("cam0")
    result = await th.raw_ingest(
        srv.port, token, [th.hello(sid), th.frame_req(0, frame), th.end_req(1)]
    )
    if EOI in frame[-64:]:
        assert result.code == grpc.StatusCode.OK, result.details
        assert th.stored_frames(repo, store, sid, "cam0") == {0: frame}
    else:
        assert result.code == grpc.StatusCode.INVALID_ARGUMENT, result.details
        assert "not a complete JPEG" in result.details
        assert th.stored_frames(repo, store, sid, "cam0") == {}
    good = th.new_session(repo)
    ok = await th.raw_ingest(srv.port, token, [th.hello(good), th.frame_req(0), th.end_req(1)])
    assert ok.code == grpc.StatusCode.OK and th.acks(ok)[-1].take_complete


# ---- a fixed bug, kept as a regression test -------------------------------------------------------------------------------------

_DECODE_IN_LIMITED_MEMORY = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20))  # a 2 GB edge board
from edge_agent.errors import BadInput
from edge_agent.pose.base import decode_jpeg
try:
    decode_jpeg(bytes.fromhex(sys.argv[1]))
except BadInput as e:
    print("refused:", e)
"""


def test_a_header_claiming_a_huge_frame_is_refused_before_decoding() -> None:
    data = bytearray(JPEG)
    m = _SOF_RE.search(bytes(data))
    assert m is not None
    data[m.start(1) : m.end(2)] = (30000).to_bytes(2, "big") * 2
    r = subprocess.run(
        [sys.executable, "-c", _DECODE_IN_LIMITED_MEMORY, bytes(data).hex()],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0 and "refused" in r.stdout, r.stderr[-600:]
