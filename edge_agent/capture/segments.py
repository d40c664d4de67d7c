"""MJPEG-in-MP4 segments: the camera's JPEG bytes, muxed unchanged, rolled every N seconds.

The recipe (measured in DESIGN.md, PyAV 18): an ``mjpeg`` stream with explicit
size and ``pix_fmt='yuvj420p'`` (``yuv420p`` makes the muxer open an encoder
and fail), a constant microsecond ``Fraction`` time base set on every packet
(the stream's own time base changes after the first mux), each frame wrapped
in ``av.Packet(jpeg)``, and duplicate timestamps bumped (a repeated dts raises).
Timestamps are relative to the take's first frame; the absolute booth-clock
start is stored as metadata, because raw monotonic timestamps turn into an
edit list with millisecond rounding.

Segments are fragmented MP4 (``empty_moov+default_base_moof``, 250 ms
fragments, packets flushed): a crash loses at most the last fragment, where a
plain MP4 killed mid-write has no moov atom and is unreadable.

Two threads per take: the *writer* muxes frames as they arrive; the
*finalizer* closes, fsyncs and renames each finished ``.part`` file. Closing
inline delayed the next segment's first frames by ~200 ms.

Each segment has a frame index beside it, ``seg_NNNNN.seqs``: 16 bytes per muxed
frame (seq u64, capture_ts_ns i64), appended as the frame is muxed and fsynced
before the segment's rename. ``frames.csv`` says the same for the whole take, but
it is written when the take finishes; an agent killed mid-take leaves only the
segments and their indexes, and those are enough to read every frame back (the
spool's fallback, ``read_recorded_frames``): the finished segments whole, and the
one in progress up to its last complete fragment.

A full disk stops recording, never corrupts what is finished: free space is
checked against ``min_free_disk_mb`` at every segment start and about once a
second, and ENOSPC (or any other write error) aborts only the segment being
written. Frames after the stop are still indexed (segment -1), so the take's
manifest says exactly which frames were not recorded.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from edge_agent.capture.buffers import BoundedBuffer
from edge_agent.frames import CapturedFrame, jpeg_looks_complete

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 1_000_000)  # microseconds: exact for any camera rate we meet
MP4_OPTIONS = {
    "movflags": "empty_moov+default_base_moof+use_metadata_tags",
    "frag_duration": "250000",  # µs: a crash loses at most a quarter second
    "flush_packets": "1",
}
# Free space below which a failed write is reported as a full disk.
NEARLY_FULL_BYTES = 8 * 2**20
SEGMENT_PREFIX = "seg_"
PART_SUFFIX = ".part"
INDEX_SUFFIX = ".seqs"
_INDEX_ENTRY = struct.Struct("<Qq")  # seq, capture_ts_ns


def segment_name(index: int) -> str:
    return f"{SEGMENT_PREFIX}{index:05d}.mp4"


def index_name(index: int) -> str:
    return f"{SEGMENT_PREFIX}{index:05d}{INDEX_SUFFIX}"


_INDEX_RE = re.compile(rf"{SEGMENT_PREFIX}(\d+){re.escape(INDEX_SUFFIX)}$")


@dataclass
class SegmentInfo:
    """One finished segment: where it is and which frames it holds, in order."""

    index: int
    path: Path
    seqs: list[int] = field(default_factory=list)
    first_ts_ns: int = 0
    last_ts_ns: int = 0
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "first_seq": self.seqs[0] if self.seqs else None,
            "last_seq": self.seqs[-1] if self.seqs else None,
            "frames": len(self.seqs),
            "first_ts_ns": self.first_ts_ns,
            "last_ts_ns": self.last_ts_ns,
            "bytes": self.size_bytes,
        }


@dataclass(slots=True)
class FrameRecord:
    """Where one captured frame ended up. ``segment == -1``: not recorded."""

    seq: int
    capture_ts_ns: int
    segment: int
    size_bytes: int
    corrupt: bool


class _OpenSegment:
    """A segment being written: the container, its stream, and what went in."""

    def __init__(
        self,
        info: SegmentInfo,
        part: Path,
        width: int,
        height: int,
        fps: float,
        metadata: dict[str, str],
    ) -> None:
        self.info = info
        self.part = part
        self.index_path = info.path.with_name(index_name(info.index))
        self._index_fd: int | None = None
        self.container = av.open(str(part), "w", format="mp4", options=MP4_OPTIONS)
        for key, value in metadata.items():
            self.container.metadata[key] = value
        self.stream = self.container.add_stream("mjpeg", rate=Fraction(fps).limit_denominator(1001))
        self.stream.width = width
        self.stream.height = height
        self.stream.pix_fmt = "yuvj420p"
        self.stream.time_base = TIME_BASE
        self.payload_bytes = 0
        try:
            self._index_fd = os.open(
                self.index_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
            )
        except OSError:
            self.container.close()
            raise

    def mux(self, jpeg: bytes, pts_us: int) -> None:
        packet = av.Packet(jpeg)
        packet.pts = pts_us
        packet.dts = pts_us
        packet.time_base = TIME_BASE
        packet.stream = self.stream
        self.container.mux(packet)
        self.payload_bytes += len(jpeg)

    def note(self, seq: int, capture_ts_ns: int) -> None:
        """Index a muxed frame (one small write; the kernel keeps it if the agent dies)."""
        assert self._index_fd is not None
        os.write(self._index_fd, _INDEX_ENTRY.pack(seq, capture_ts_ns))

    def sync_index(self) -> None:
        """Make the index durable and close it: before the segment is renamed final."""
        if self._index_fd is None:
            return
        fd, self._index_fd = self._index_fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """A failed segment: close what is open and remove its files."""
        if self._index_fd is not None:
            os.close(self._index_fd)
            self._index_fd = None
        try:
            self.container.close()
        except (OSError, av.FFmpegError) as e:
            log.debug("closing the failed segment %s: %s", self.part, e)
        for path in (self.part, self.index_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove the failed segment's %s: %s", path, e.strerror)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IncompleteSegment(OSError):
    """A closed segment holds less than was muxed into it.

    FFmpeg's file output treats a short write (what a filling disk returns before
    ENOSPC) as success, so a segment can close without an error and still miss
    its last fragment. Reading it back is the only proof it is whole.
    """


def verify_segment(path: Path, frames: int, payload_bytes: int) -> None:
    """Raise IncompleteSegment unless ``path`` demuxes to ``frames`` packets of ``payload_bytes``."""
    n = size = 0
    try:
        with av.open(str(path)) as container:
            for packet in container.demux(container.streams.video[0]):
                if packet.size or packet.pts is not None:
                    n += 1
                    size += packet.size
    except (av.FFmpegError, IndexError) as e:
        raise IncompleteSegment(
            errno.EIO, f"{path.name} is unreadable after closing: {e}"
        ) from None
    if (n, size) != (frames, payload_bytes):
        raise IncompleteSegment(
            errno.EIO,
            f"{path.name} holds {n} of {frames} frames ({size} of {payload_bytes} bytes) "
            f"after closing (a short write)",
        )


def finalize_segment(
    container: Any, part: Path, final: Path, *, frames: int, payload_bytes: int
) -> int:
    """Close, fsync, verify, rename ``.part`` -> final, fsync the directory. Returns the size."""
    container.close()
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    verify_segment(part, frames, payload_bytes)
    os.replace(part, final)
    _fsync_dir(final.parent)
    return size


class SegmentRecorder:
    """Consumes :class:`CapturedFrame` from a bounded queue and writes rolling segments.

    The capture loop only calls ``queue.offer(frame)``. ``close()`` ends the
    stream; ``wait()`` returns when every segment is finalized.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        width: int,
        height: int,
        fps: float,
        segment_s: float,
        min_free_disk_mb: int,
        metadata: dict[str, str] | None = None,
        queue_frames: int | None = None,
        statvfs: Callable[[str], Any] = os.statvfs,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.width, self.height, self.fps = width, height, fps
        self.segment_ns = int(segment_s * 1e9)
        self.min_free_bytes = min_free_disk_mb * 2**20
        self.metadata = dict(metadata or {})
        self._statvfs = statvfs
        # Enough for a few seconds of stall (a slow disk, a long fsync) at the camera's
        # rate; the writer itself needs ~60 µs per frame.
        cap = queue_frames or max(64, int(fps * max(4.0, 2 * segment_s)))
        self.queue: BoundedBuffer[CapturedFrame] = BoundedBuffer(cap, "segments")
        self._check_every = max(1, int(fps))  # free-space check about once a second

        self.state = "idle"  # idle | recording | stopped | disk_full | error
        self.error: str | None = None
        self._stopped_at: int | None = None  # the first frame not recorded, once stopped
        # Each counter has one writing thread: the writer counts muxed frames, the
        # finalizer counts frames lost with a segment that failed to finalize.
        self._muxed = 0
        self._lost_in_failed = 0
        self._not_recorded = 0
        self.first_corrupt_seq: int | None = None
        self.corrupt_seqs: set[int] = set()
        self.start_ts_ns: int | None = None
        self.first_write_ns: int | None = None
        self.last_write_ns: int | None = None
        self.first_written_ts_ns: int | None = None
        self.last_written_ts_ns: int | None = None
        self.records: list[FrameRecord] = []
        self.segments: list[SegmentInfo] = []  # finished, in order
        self._seg_lock = threading.Lock()
        self._finalize_q: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="segment-writer", daemon=True)
        self._finalizer = threading.Thread(
            target=self._finalize_loop, name="segment-finalizer", daemon=True
        )

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.state = "recording"
        self._writer.start()
        self._finalizer.start()

    def close(self) -> None:
        """No more frames. The writer drains the queue, then finalizes the last segment."""
        self.queue.close()

    def wait(self, timeout: float | None = None) -> bool:
        self._writer.join(timeout)
        self._finalizer.join(timeout)
        return not (self._writer.is_alive() or self._finalizer.is_alive())

    @property
    def frames_written(self) -> int:
        """Frames muxed into a segment that was (or will be) finalized."""
        return self._muxed - self._lost_in_failed

    @property
    def frames_not_recorded(self) -> int:
        return self._not_recorded + self._lost_in_failed

    @property
    def recording(self) -> bool:
        return self.state == "recording"

    def finished_segments(self) -> list[SegmentInfo]:
        with self._seg_lock:
            return list(self.segments)

    @property
    def fps_written(self) -> float:
        """The sustained written rate: frames per second of wall time between first and last write.

        The span is at least the frames' own capture span, so a first frame that was
        written late (and the catching up after it) cannot raise the rate above the
        camera's; a last frame written late lowers it, as it should.
        """
        if self.first_write_ns is None or self._muxed < 2:
            return 0.0
        span_ns = max(
            self.last_write_ns - self.first_write_ns,
            (self.last_written_ts_ns or 0) - (self.first_written_ts_ns or 0),
        )
        return (self._muxed - 1) * 1e9 / span_ns if span_ns > 0 else 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "written": self.frames_written,
            "not_recorded": self.frames_not_recorded,
            "segments": len(self.segments),
            "queue": self.queue.stats(),
            "corrupt_frames": self.corrupt_frames,
            "error": self.error,
        }

    # ---- the writer thread -------------------------------------------------------

    def _write_loop(self) -> None:
        seg: _OpenSegment | None = None
        index = 0
        last_pts = -1
        since_check = 0
        for frame in self.queue:
            jpeg = frame.jpeg
            corrupt = not jpeg_looks_complete(jpeg)
            if corrupt:
                self._note_corrupt(frame.seq, len(jpeg))
            if self.start_ts_ns is None:
                self.start_ts_ns = frame.capture_ts_ns
                self.metadata["capture_start_ns"] = str(frame.capture_ts_ns)
            if not self.recording or not jpeg:
                # An empty packet cannot be stored in MP4 (the muxer treats it as a flush).
                self._not_recorded += 1
                self.records.append(
                    FrameRecord(frame.seq, frame.capture_ts_ns, -1, len(jpeg), corrupt)
                )
                continue
            ts = frame.capture_ts_ns
            if seg is not None and ts - seg.info.first_ts_ns >= self.segment_ns:
                self._hand_to_finalizer(seg)
                seg, index = None, index + 1
            if seg is None or since_check >= self._check_every:
                since_check = 0
                if not self._disk_has_room(frame.seq):
                    if seg is not None:
                        self._hand_to_finalizer(seg)
                        seg = None
                    self._not_recorded += 1
                    self.records.append(FrameRecord(frame.seq, ts, -1, len(jpeg), corrupt))
                    continue
            since_check += 1
            pts = (ts - self.start_ts_ns) // 1000
            if pts <= last_pts:  # the muxer refuses a repeated or backward dts
                pts = last_pts + 1
            last_pts = pts
            try:
                if seg is None:
                    seg = self._open_segment(index, frame)
                seg.mux(jpeg, pts)
                seg.note(frame.seq, ts)
            except (OSError, av.FFmpegError) as e:
                self._abort(seg, frame.seq, e)
                seg = None
                self._not_recorded += 1
                self.records.append(FrameRecord(frame.seq, ts, -1, len(jpeg), corrupt))
                continue
            seg.info.seqs.append(frame.seq)
            seg.info.last_ts_ns = ts
            # Wall-clock times of the first and latest write: the sustained written rate.
            self.last_write_ns = time.monotonic_ns()
            self.last_written_ts_ns = ts
            if self.first_write_ns is None:
                self.first_write_ns = self.last_write_ns
                self.first_written_ts_ns = ts
            self._muxed += 1
            self.records.append(FrameRecord(frame.seq, ts, index, len(jpeg), corrupt))
        if seg is not None:
            self._hand_to_finalizer(seg)
        if self.state == "recording":
            self.state = "stopped"
        self._finalize_q.put(None)

    def _open_segment(self, index: int, frame: CapturedFrame) -> _OpenSegment:
        final = self.out_dir / segment_name(index)
        info = SegmentInfo(index=index, path=final, first_ts_ns=frame.capture_ts_ns)
        meta = {**self.metadata, "segment_index": str(index), "first_seq": str(frame.seq)}
        part = final.with_name(final.name + PART_SUFFIX)
        try:
            return _OpenSegment(info, part, self.width, self.height, self.fps, meta)
        except (OSError, av.FFmpegError):
            part.unlink(missing_ok=True)  # never leave an empty .part behind
            final.with_name(index_name(index)).unlink(missing_ok=True)
            raise

    def _disk_has_room(self, seq: int) -> bool:
        try:
            st = self._statvfs(str(self.out_dir))
        except OSError as e:
            self._stop("error", f"cannot check free space in {self.out_dir}: {e.strerror}", seq)
            return False
        free = st.f_bavail * st.f_frsize
        if free >= self.min_free_bytes:
            return True
        self._stop(
            "disk_full",
            f"disk almost full: {free / 2**20:.0f} MB free in {self.out_dir}, below "
            f"capture.min_free_disk_mb={self.min_free_bytes // 2**20}; recording stopped at "
            f"frame {seq}; finished segments are intact",
            seq,
        )
        return False

    def _abort(self, seg: _OpenSegment | None, seq: int, err: Exception) -> None:
        """A write failed: drop the segment in progress, keep every finished one."""
        full = getattr(err, "errno", None) == errno.ENOSPC or self._nearly_full()
        detail = getattr(err, "strerror", None) or str(err)
        what = f"disk full ({detail})" if full else f"write error ({detail})"
        # The segment in progress goes too: the recording ends before its first frame.
        first_lost = min([seq, *seg.info.seqs]) if seg is not None else seq
        self._stop(
            "disk_full" if full else "error",
            f"{what} in {self.out_dir}; recording stopped at frame {first_lost}; "
            f"finished segments are intact",
            first_lost,
        )
        if seg is None:
            return
        seg.discard()
        # Its frames were never finalized, so they are not recorded after all.
        lost = set(seg.info.seqs)
        for rec in self.records:
            if rec.seq in lost:
                rec.segment = -1
        if threading.current_thread() is self._finalizer:
            self._lost_in_failed += len(lost)
        else:
            self._not_recorded += len(lost)
            self._muxed -= len(lost)

    def _nearly_full(self) -> bool:
        """After a short write: is the disk (about) full? Then that is the reason to give."""
        try:
            st = self._statvfs(str(self.out_dir))
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < max(self.min_free_bytes, NEARLY_FULL_BYTES)

    def _stop(self, state: str, message: str, seq: int) -> None:
        # "stopped": the writer is done, but the finalizer may still fail the last
        # segment (a short write shows only when the file is closed); say so.
        if self.state not in ("recording", "stopped"):
            # Already stopped. A segment the finalizer drops afterwards may hold earlier
            # frames than the write that stopped us: the recording ends before them.
            stopped_at = self._stopped_at
            if self.error and stopped_at is not None and 0 <= seq < stopped_at:
                self.error = self.error.replace(
                    f"recording stopped at frame {stopped_at};",
                    f"recording stopped at frame {seq};",
                )
                self._stopped_at = seq
                log.error("recording lost frames from %d on as well", seq)
            return
        self.state = state
        self.error = message
        self._stopped_at = seq
        log.error("%s (frame %d)", message, seq)

    @property
    def corrupt_frames(self) -> int:
        return len(self.corrupt_seqs)

    def _note_corrupt(self, seq: int, size: int) -> None:
        self.corrupt_seqs.add(seq)
        if self.first_corrupt_seq is None:
            self.first_corrupt_seq = seq
            # Once per take; the count is in status and the manifest.
            log.warning(
                "corrupt JPEG from the camera at frame %d (%d bytes, no SOI/EOI marker); "
                "stored as delivered, further ones are only counted",
                seq,
                size,
            )

    # ---- the finalizer thread -------------------------------------------------------

    def _hand_to_finalizer(self, seg: _OpenSegment) -> None:
        self._finalize_q.put(seg)

    def _finalize_loop(self) -> None:
        while (seg := self._finalize_q.get()) is not None:
            try:
                seg.sync_index()
                seg.info.size_bytes = finalize_segment(
                    seg.container,
                    seg.part,
                    seg.info.path,
                    frames=len(seg.info.seqs),
                    payload_bytes=seg.payload_bytes,
                )
            except (OSError, av.FFmpegError) as e:
                self._abort(seg, seg.info.seqs[-1] if seg.info.seqs else -1, e)
                continue
            with self._seg_lock:
                self.segments.append(seg.info)
            log.debug("segment finalized: %s (%d frames)", seg.info.path.name, len(seg.info.seqs))


def read_segment_packets(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(pts_us, jpeg)`` for every frame of a segment, in order, bytes exactly as stored."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.size == 0 and packet.pts is None:  # the demuxer's end-of-stream flush
                continue
            yield int(packet.pts), bytes(packet)


def read_segment_frames(info: SegmentInfo) -> Iterator[tuple[int, bytes]]:
    """``(seq, jpeg)`` for every frame of a finished segment (for catch-up pose, or re-sending)."""
    seqs = info.seqs
    n = 0
    for n, (_pts, jpeg) in enumerate(read_segment_packets(info.path), start=1):
        if n > len(seqs):
            raise ValueError(f"{info.path.name}: more frames than its index says ({len(seqs)})")
        yield seqs[n - 1], jpeg
    if n != len(seqs):
        raise ValueError(f"{info.path.name}: {n} frames, its index says {len(seqs)}")


def _index_entries(path: Path) -> list[tuple[int, int]]:
    """``(seq, capture_ts_ns)`` of a segment index; a torn last entry is left out."""
    data = path.read_bytes()
    usable = len(data) - len(data) % _INDEX_ENTRY.size
    return list(_INDEX_ENTRY.iter_unpack(data[:usable]))


def _readable_packets(path: Path) -> Iterator[tuple[int, bytes]]:
    """A segment's packets up to where it stops being readable (a ``.part`` cut by a crash)."""
    try:
        yield from read_segment_packets(path)
    except (OSError, av.FFmpegError) as e:
        log.info("%s is readable up to here: %s", path.name, e)


def read_recorded_frames(directory: str | Path, seq: int = 0) -> Iterator[CapturedFrame]:
    """Frames from ``seq`` on of a recording that has no ``frames.csv``, by its segment indexes.

    That is a take whose agent died mid-capture: each finished segment gives back
    all of its frames, the one in progress (``.part``) those in its complete
    fragments. In seq order, each frame once.
    """
    directory = Path(directory)
    numbered = sorted(
        (int(m.group(1)), p)
        for p in directory.glob(f"*{INDEX_SUFFIX}")
        if (m := _INDEX_RE.match(p.name))
    )
    after = seq - 1
    for index, index_path in numbered:
        entries = _index_entries(index_path)
        if not entries or entries[-1][0] <= after:
            continue
        final = directory / segment_name(index)
        path = final if final.exists() else final.with_name(final.name + PART_SUFFIX)
        if not path.exists():
            log.warning("%s is missing; its %d frames cannot be read back", final, len(entries))
            continue
        for (s, ts), (_pts, jpeg) in zip(entries, _readable_packets(path), strict=False):
            if s > after:
                after = s
                yield CapturedFrame(s, ts, jpeg)
