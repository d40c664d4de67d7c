"""Stream: the agent's uplink. Every frame goes to an on-disk spool first, then up the wire.

Data flow for one take (one camera, one session)::

    capture stream buffer --> SpoolTake.add_frame --> segment files --> Uplink --> Ingest
                                                        ^ deleted once acked

**The spool** (``uplink.spool_dir``) holds one directory per take: append-only
segment files (``seg-000000.log``...) of records, ``take.json`` (the take's
metadata: ids, size, frame count once ended, the "behind" state) and ``captured``
(how many frames the capture offered, for a take that is behind). A record is a
25-byte header ``kind u8 | crc32 u32 | seq u64 | capture_ts_ns i64 | length u32``
(the CRC covers the other header fields and the payload)
and its payload (JPEG bytes or a pose). A take has ended once ``take.json``
holds its ``frame_count`` (the hello and the EndOfTake come from there). Records are
written with one ``write()`` each, so a crashed agent process loses nothing it
spooled; ``fsync`` runs in batches (every ``FSYNC_INTERVAL_S`` or
``FSYNC_BYTES``) against power loss. On start, a torn last record (power loss
mid-write) is cut off by its length/CRC, and a take that has no end record
(the agent died mid-capture) is sealed with the frames it has; once the uplink
starts, also with those its recording holds past them (``extend_to_recorded``:
frames that were still in the stream buffer, or over the budget), and with those
the server holds (``reconcile_with_server``).

**The budget** (``uplink.spool_budget_mb``). When spooling a frame would pass
it, the take goes *behind*: from that seq on, no frame of the take is spooled
(the MP4 segments still record them), ``upload_behind`` is reported, and each
refused frame is counted in ``stream_dropped``. A gap in the capture's stream
buffer (it drops the newest frame when the uplink is slow) has the same effect.
Nothing is discarded silently: once the take has ended, the missing frames are
re-read from the take's recording through ``TakeArchive`` (the capture's
``segments.read_segment_frames``) as the spool drains. A frame the recording does
not have either (never recorded: a full disk, a dropped or failed segment) can
never be had: it is spooled as an empty record and uploaded as lost
(``Frame.lost``, as a frame corrupt at capture is), so the take completes; the
log and the status (``frames_lost``, ``lost_why``) say how many. Without an archive
the take stays incomplete, the server never marks it uploaded, and the status says
how many frames are missing and that they are in the local recording. Poses
ignore the budget, but a full disk can refuse them too: from the first refused
one on, they are read back from the recording's ``poses.npz`` the same way, and
the take's end waits for them.

**The uplink** streams each take that has data over one Ingest stream (asyncio,
``grpc.aio``): hello, resume after the server's acked seq, send records in seq
order straight from the segment files, and delete a segment once every record
in it is acked. It reconnects with exponential backoff and full jitter. Errors
that retrying cannot fix (bad token, unknown session...) are reported in the
status and retried at the slowest rate, never dropped.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import os
import random
import re
import shutil
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from edge_agent.errors import (
    SESSION_DELETED,
    SESSION_STATE_KEY,
    TAKE_NOT_WANTED,
    BadInput,
    BoothError,
    make_dirs,
)
from edge_agent.frames import CapturedFrame, jpeg_looks_complete
from edge_agent.retention import discard_recording
from protos import booth_pb2, booth_pb2_grpc

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<BIQqI")  # kind, crc32, seq, capture_ts_ns, length
_CHECKED = struct.Struct("<BQqI")  # the header fields the CRC covers


def _crc(kind: int, seq: int, ts: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_CHECKED.pack(kind, seq, ts, len(payload))))


KIND_FRAME, KIND_POSE = 1, 2
_POSE_FLAGS = struct.Struct("<B")
_COUNT = struct.Struct("<Q")
CAPTURED_FILE = "captured"  # _COUNT: frames the capture offered (see SpoolTake._note_captured)
_SEGMENT_RE = re.compile(r"^seg-(\d{6})\.log$")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Batched fsync: a power cut loses at most this much of the spool (a crash of the
# agent process loses nothing: every record is already in the kernel's hands).
FSYNC_INTERVAL_S = 0.5
FSYNC_BYTES = 8 * 1024 * 1024
SEGMENT_BYTES = 16 * 1024 * 1024
READ_BATCH_BYTES = 4 * 1024 * 1024
# Records just spooled stay in memory up to this much (all takes of a spool together), so
# the uplink sends them without reading them back; past it, it reads the segment files.
# About 5 s of one camera at 120 fps: an uplink that keeps up never touches the files.
TAIL_BYTES = 32 * 1024 * 1024
LATENCY_SAMPLES = 20_000
MESSAGE_OVERHEAD_BYTES = 1024  # a Frame's fields besides the JPEG, with room to spare

# Status codes after which retrying soon is pointless; the take waits at the slowest
# backoff (the config or the session may get fixed) and the status says why.
PERMANENT_CODES = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}


class TakeArchive(Protocol):
    """Where a take's frames can be read again after they were not spooled (its MP4 segments)."""

    def frames_from(self, session_id: str, camera_id: str, seq: int) -> Iterator[CapturedFrame]:
        """Frames of the take with ``seq >= seq``, in seq order.

        A frame it skips, or past the last it yields, is not in the recording: the
        spool uploads it as lost.
        """

    def poses_from(
        self, session_id: str, camera_id: str, seq: int
    ) -> Iterator[tuple[int, Any, bool, bool]]:
        """``(seq, keypoints, imputed, glitch)`` of the take's poses with ``seq >= seq``."""

    def recorded_count(self, session_id: str, camera_id: str) -> int:
        """How many frames the capture took, as far as the recording knows (0: none)."""

    def uploaded(self, session_id: str, camera_id: str) -> None:
        """Ingest confirmed the take complete (retention may remove the recording)."""

    def deleted(self, session_id: str, camera_id: str) -> None:
        """The take's session was deleted in the cloud: remove the recording."""


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    seq: int
    capture_ts_ns: int
    payload: bytes


@dataclass
class _Segment:
    number: int
    path: Path
    start: int = 0  # take-wide position of its first byte (see SpoolTake.tail_from)
    size: int = 0  # bytes of complete records
    last_frame: int = -1
    last_pose: int = -1


@dataclass
class TakeMeta:
    session_id: str
    camera_id: str
    booth_id: str
    width: int = 0
    height: int = 0
    fps: float = 0.0
    frame_count: int | None = None  # set by end()
    behind_from_seq: int | None = None  # first frame not spooled (see module doc)
    not_spooled: int = 0
    created_at: float = field(default_factory=time.time)
    # Ended by spool recovery (the agent died mid-capture), not by the capture.
    sealed_on_recovery: bool = False
    # A take sealed on recovery was counted against its recording (``extend_to_recorded``).
    recording_checked: bool = False
    # First pose a full disk refused; it and the later ones come from the recording.
    poses_behind_from_seq: int | None = None


def _entry_start(entry: tuple[int, int, Record]) -> int:
    return entry[0]


def _pose_payload(keypoints: Any, imputed: bool, glitch: bool) -> bytes:
    import numpy as np

    kp = np.array(keypoints, dtype="<f4").reshape(-1, 3)
    # Ingest refuses a non-finite keypoint or a score outside 0..1 (the take would never
    # upload); a backend's NaN means "missing", which the skeleton says with zeros.
    kp[~np.isfinite(kp).all(axis=1)] = 0.0
    np.clip(kp[:, 2], 0.0, 1.0, out=kp[:, 2])
    return _POSE_FLAGS.pack(int(imputed) | (int(glitch) << 1)) + kp.tobytes()


def decode_pose(payload: bytes) -> tuple[Any, bool, bool]:
    """(float32 (N, 3) keypoints, imputed, glitch) from a spooled pose record."""
    import numpy as np

    (flags,) = _POSE_FLAGS.unpack_from(payload)
    kp = np.frombuffer(payload, dtype="<f4", offset=_POSE_FLAGS.size).reshape(-1, 3)
    return kp, bool(flags & 1), bool(flags & 2)


class SpoolTake:
    """One take's spool directory. Appends come from capture threads; reads from the uplink."""

    def __init__(self, spool: Spool, directory: Path, meta: TakeMeta):
        self.spool, self.dir, self.meta = spool, directory, meta
        self.segments: list[_Segment] = []
        self.next_seq = 0  # the next frame seq to spool
        self.last_pose = -1
        self.acked_seq = -1
        self.pose_acked_seq = -1
        self.complete = False
        self.error = ""
        self.lost_seqs: set[int] = set()  # frames sent as lost (corrupt, or not recorded)
        self.unrecoverable = 0  # frames spooled as lost: the recording lacks them too
        self.lost_why = ""  # what status says about them
        self._meta_stale = False  # the last save_meta failed (said once, not per frame)
        self.captured = 0  # frames the capture offered, as far as CAPTURED_FILE says
        self._captured_stale = False
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._next_segment = 0  # never reused: readers track their place by number
        self._dirty_bytes = 0
        self._sync_due = False
        self._last_fsync = time.monotonic()
        # Positions are take-wide byte offsets: every record appended moves ``_end`` on by its
        # size, and segment N holds [start, start + size). The tail keeps the newest records
        # (already written to their segment) in memory, so the uplink sends them without
        # reading them back; its own lock, because appends hold ``_lock`` across the write.
        self._end = 0
        self._tail: deque[tuple[int, int, Record]] = deque()  # (position, end, record)
        self._tail_bytes = 0
        self._tail_lock = threading.Lock()

    # ---- identity --------------------------------------------------------------------

    @property
    def key(self) -> tuple[str, str]:
        return self.meta.session_id, self.meta.camera_id

    @property
    def ended(self) -> bool:
        return self.meta.frame_count is not None

    @property
    def behind(self) -> bool:
        return self.meta.behind_from_seq is not None

    @property
    def poses_behind(self) -> bool:
        return self.meta.poses_behind_from_seq is not None

    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    # ---- writing (any thread) -----------------------------------------------------------

    def add_frame(self, frame: CapturedFrame) -> bool:
        """Spool one captured frame; False if it was not spooled (budget, or take behind)."""
        with self._lock:
            if self.ended:
                raise BadInput(f"take {self.key} has ended; frame {frame.seq} cannot join it")
            if frame.seq < self.next_seq:
                return True  # already spooled (a replay): idempotent
            if self.behind or frame.seq > self.next_seq:
                return self._refuse(frame.seq, "a gap in the capture stream")
            if why := self._append(KIND_FRAME, frame.seq, frame.capture_ts_ns, frame.jpeg):
                return self._refuse(frame.seq, why)
            self.next_seq = frame.seq + 1
        self.spool.notify()
        self._sync_if_due()
        return True

    def add_frames(self, frames: Iterable[CapturedFrame | None]) -> int:
        """Spool frames until the iterable ends (or yields None); returns how many were spooled."""
        n = 0
        for frame in frames:
            if frame is None:
                break
            n += self.add_frame(frame)
        return n

    def poses_from_recording(self) -> None:
        """The poses not spooled yet are to be read from the take's recording (posed there
        if need be) once the take has ended: the capture could not hand them over."""
        with self._lock:
            if self.meta.poses_behind_from_seq is None:
                self.meta.poses_behind_from_seq = self.last_pose + 1
                self.save_meta()
        self.spool.notify()

    def add_pose(
        self, seq: int, keypoints: Any, *, imputed: bool = False, glitch: bool = False
    ) -> None:
        """Spool one pose (float32 (23, 3) x, y, score). Poses are small: they ignore the budget."""
        with self._lock:
            # Once one pose was refused, the later ones come from the recording too (in order).
            if seq <= self.last_pose or self.poses_behind:
                return
            payload = _pose_payload(keypoints, imputed, glitch)
            if why := self._append(KIND_POSE, seq, 0, payload, force=True):
                # A full disk: read the poses back from the recording later.
                self.meta.poses_behind_from_seq = seq
                log.warning(
                    "take %s/%s: poses from %d not spooled (%s); they are in the recording",
                    *self.key,
                    seq,
                    why,
                )
                self.save_meta()
                return
            self.last_pose = seq
        self.spool.notify()
        self._sync_if_due()

    def end(self, frame_count: int | None = None) -> None:
        """The take's capture ended after ``frame_count`` frames (default: what was offered)."""
        with self._lock:
            if self.ended:
                return
            if frame_count is None:
                frame_count = self.next_seq if not self.behind else self._captured_hint()
            if frame_count < self.next_seq:
                raise BadInput(
                    f"take {self.key} ended at {frame_count} frames but has {self.next_seq}"
                )
            if frame_count > self.next_seq and not self.behind:
                # Frames at the end never reached the spool: fetch them from the recording.
                self.meta.behind_from_seq = self.next_seq
            self.meta.frame_count = frame_count
            self._sync()
            self.save_meta()
        if self.behind:
            log.warning(
                "take %s/%s ended with frames %d..%d not spooled; they are in the recording",
                *self.key,
                self.meta.behind_from_seq,
                frame_count - 1,
            )
        self.spool.notify()

    def reconcile_with_server(self, server_seq: int) -> None:
        """A take sealed on recovery also counts the frames the server already holds.

        Acked segments are deleted, so an agent killed mid-take may have fewer frames
        in its spool than it once sent (none at all, if everything was acked): sealed
        at that count, the take's end would contradict the server forever.
        """
        with self._lock:
            count = self.meta.frame_count
            if not self.meta.sealed_on_recovery or count is None:
                return
            behind_from = self.meta.behind_from_seq
            if behind_from is not None and behind_from <= server_seq < count:
                # Frames the spool lacks but the server holds need no reading back.
                self.meta.behind_from_seq = server_seq + 1
                self.next_seq = max(self.next_seq, server_seq + 1)
                self.save_meta()
            if server_seq < count:
                return
            log.warning(
                "take %s/%s: the server holds frames up to %d; sealed at %d, not %d",
                *self.key,
                server_seq,
                server_seq + 1,
                count,
            )
            self.meta.frame_count = server_seq + 1
            self.next_seq = max(self.next_seq, server_seq + 1)
            self.save_meta()

    def extend_to_recorded(self, recorded: int) -> None:
        """A take sealed on recovery also counts the frames its recording holds past the spool.

        Sealed at what was spooled, it would leave out frames the agent captured and
        recorded but had not spooled when it died (its budget was reached, or they
        were still in the stream buffer). Those are read back from the recording
        like any frames the spool refused, and so are the take's poses, which a take
        spools only when it finishes. Checked once per take.
        """
        with self._lock:
            count = self.meta.frame_count
            if not self.meta.sealed_on_recovery or self.meta.recording_checked or count is None:
                return
            self.meta.recording_checked = True
            if recorded > count:
                log.warning(
                    "take %s/%s: its recording holds frames up to %d; sealed at %d frames now, was %d",
                    *self.key,
                    recorded - 1,
                    recorded,
                    count,
                )
                if self.meta.behind_from_seq is None:
                    self.meta.behind_from_seq = count
                self.meta.frame_count = recorded
            if recorded > self.last_pose + 1 and self.meta.poses_behind_from_seq is None:
                # A take spools its poses when it finishes, which this one never did:
                # they come from the recording (posed there, if need be).
                self.meta.poses_behind_from_seq = self.last_pose + 1
            self.save_meta()
        self.spool.notify()

    def _captured_hint(self) -> int:
        return max((self.meta.behind_from_seq or 0) + self.meta.not_spooled, self.captured)

    def _note_captured(self, count: int) -> None:
        """Keep on disk how many frames the capture offered: a take sealed on recovery ends there.

        take.json holds ``not_spooled`` only now and then (rewriting it per frame costs an
        fsync per frame on the disk the recording needs, and a full disk refuses it), and
        frames the stream buffer dropped never reach ``_refuse``. So every refused frame
        rewrites the same 8 bytes of ``CAPTURED_FILE`` in place: one pwrite, no fsync
        (exact when the agent is killed; the kernel has it), no new disk blocks (a full
        disk takes it). ``Spool.open_take`` writes it first, while there is room.
        """
        if count < self.captured:
            return
        self.captured = count
        try:
            fd = os.open(self.dir / CAPTURED_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, _COUNT.pack(count), 0)
            finally:
                os.close(fd)
        except OSError as e:
            if not self._captured_stale:
                log.warning(
                    "take %s/%s: %s not updated (%s); a crash would lose count of the "
                    "frames not spooled",
                    *self.key,
                    CAPTURED_FILE,
                    e.strerror,
                )
            self._captured_stale = True
        else:
            self._captured_stale = False

    def _refuse(self, seq: int, why: str) -> bool:
        if not self.behind:
            self.meta.behind_from_seq = self.next_seq
            log.warning(
                "take %s/%s is behind from frame %d (%s); frames go to the recording only",
                *self.key,
                self.next_seq,
                why,
            )
            self.save_meta()
        self.meta.not_spooled += 1
        self._note_captured(seq + 1)  # exact, for a crash (take.json's count is the status's)
        if self.meta.not_spooled % 64 == 0:
            self.save_meta()
        return False

    def backfill(self, archive: TakeArchive) -> int:
        """Spool missing frames, then poses, from the recording while there is room; how many."""
        n = self._backfill_frames(archive)
        if not self.behind:
            n += self._backfill_poses(archive)
        return n

    def _backfill_poses(self, archive: TakeArchive) -> int:
        with self._lock:
            start = self.meta.poses_behind_from_seq
            if start is None or not self.ended:
                return 0
        n = 0
        for seq, keypoints, imputed, glitch in archive.poses_from(*self.key, start):
            payload = _pose_payload(keypoints, imputed, glitch)
            with self._lock:
                if self._append(KIND_POSE, seq, 0, payload, force=True):
                    break  # the disk is still full: try again later
                self.last_pose = seq
                self.meta.poses_behind_from_seq = seq + 1
                n += 1
        else:
            with self._lock:
                self.meta.poses_behind_from_seq = None
            log.info("take %s/%s: poses caught up from the recording", *self.key)
        with self._lock:
            self._sync()
            self.save_meta()
        if n:
            self.spool.notify()
        return n

    def _backfill_frames(self, archive: TakeArchive) -> int:
        n = 0
        with self._lock:
            start = self.meta.behind_from_seq
            if start is None or self.meta.frame_count is None:
                return 0
            end = self.meta.frame_count
            # Sealed on recovery with nothing missing: no need for the recording (which,
            # after a crash, may have no index to read it by).
            frames = archive.frames_from(*self.key, start) if start < end else ()
        # None: the recording has nothing more, so what is left up to the end is lost.
        for frame in itertools.chain(frames, [None]):
            upto = end if frame is None else min(frame.seq, end)
            with self._lock:
                n += self._spool_lost(upto)
                if self.meta.behind_from_seq < upto:
                    break  # no room yet (the disk): try again later
                if frame is None or frame.seq >= end:
                    break
                if frame.seq < self.meta.behind_from_seq:
                    continue
                if self._append(KIND_FRAME, frame.seq, frame.capture_ts_ns, frame.jpeg):
                    break  # no room yet (budget or disk): try again later
                self.meta.behind_from_seq = frame.seq + 1
                self.meta.not_spooled = max(0, self.meta.not_spooled - 1)
                n += 1
            self._sync_if_due()
        with self._lock:
            if self.meta.behind_from_seq is not None and self.meta.behind_from_seq >= end:
                self.meta.behind_from_seq = None
                self.meta.not_spooled = 0
                log.info("take %s/%s caught up from its recording", *self.key)
            self._sync()
            self.save_meta()
        if n:
            self.spool.notify()
        return n

    def _spool_lost(self, upto: int) -> int:
        """Spool the missing frames before ``upto`` as lost; how many (fewer: no room).

        The recording does not have them either (never recorded: a full disk, a dropped
        or failed segment; or its index is gone), so nothing on the board ever will. A
        lost frame is an empty record, sent with ``lost=True`` like a frame corrupt at
        capture: the take stays contiguous and can complete. Tiny, so past the budget.
        """
        first = self.meta.behind_from_seq
        assert first is not None
        for seq in range(first, upto):
            if self._append(KIND_FRAME, seq, 0, b"", force=True):
                break
            self.meta.behind_from_seq = seq + 1
            self.meta.not_spooled = max(0, self.meta.not_spooled - 1)
        n = self.meta.behind_from_seq - first
        if n:
            self.unrecoverable += n
            self.lost_why = (
                f"{self.unrecoverable} frames are in neither the spool nor the local recording "
                "(not recorded, or the recording is incomplete); they are uploaded as lost"
            )
            log.warning(
                "take %s/%s: frames %d..%d are in neither the spool nor the recording; "
                "uploading them as lost",
                *self.key,
                first,
                first + n - 1,
            )
        return n

    def _append(
        self, kind: int, seq: int, ts: int, payload: bytes, *, force: bool = False
    ) -> str | None:
        """Reserve room and write one record; None if spooled, else why not (nothing written).

        ``force`` takes room past the budget (poses are small); a disk that refuses the
        write is treated like a reached budget.
        """
        size = _HEADER.size + len(payload)
        if not self.spool.reserve(size, force=force):
            return "the spool budget is reached"
        try:
            self._write(kind, seq, ts, payload)
        except OSError as e:  # the disk is full (or failing)
            self.spool.release(size)
            return f"the spool disk refused a write: {e.strerror}"
        return None

    def _write(self, kind: int, seq: int, ts: int, payload: bytes) -> None:
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.size >= self.spool.segment_bytes or self._fd is None:
            seg = self._new_segment()
        header = _HEADER.pack(kind, _crc(kind, seq, ts, payload), seq, ts, len(payload))
        size = len(header) + len(payload)
        # One writev: the record reaches the kernel whole, without joining it in memory.
        try:
            written = os.writev(self._fd, [header, payload])
            if written < size:  # rare (a signal, a full disk): finish the record
                rest = memoryview(header + payload)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest) :]
        except OSError:
            # Cut a partial record off, so the next one starts where readers expect it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            raise
        seg.size += size
        if kind == KIND_FRAME:
            seg.last_frame = max(seg.last_frame, seq)
        else:
            seg.last_pose = max(seg.last_pose, seq)
        self._dirty_bytes += size
        self._remember(Record(kind, seq, ts, payload), size)
        if (
            self._dirty_bytes >= FSYNC_BYTES
            or time.monotonic() - self._last_fsync >= FSYNC_INTERVAL_S
        ):
            self._sync_due = True  # done by _sync_if_due, outside the lock

    def _new_segment(self) -> _Segment:
        """Close the segment being appended to and start the next one.

        If opening the next one fails (a full disk, too many open files), no segment is
        open: ``_fd`` must not keep the closed number, which the process may already have
        given to another file. The next append tries to open one again.
        """
        if self._fd is not None:
            try:
                self._sync()
            finally:
                os.close(self._fd)
                self._fd = None
        number = self._next_segment
        self._next_segment += 1
        path = self.dir / f"seg-{number:06d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        seg = _Segment(number, path, start=self._end)
        self.segments.append(seg)  # before anything else can fail: its records go to _fd
        _fsync_dir(self.dir)
        return seg

    # ---- the in-memory tail (appends under _lock; the uplink reads) -------------------------

    def _remember(self, rec: Record, size: int) -> None:
        """Keep a record just written in memory; over the spool's tail budget, drop our oldest."""
        start = self._end
        self._end += size
        with self._tail_lock:
            self._tail.append((start, self._end, rec))
            self._tail_bytes += size
            freed = 0
            over = self.spool.hold_tail(size)
            while over > freed and len(self._tail) > 1:
                old_start, old_end, _ = self._tail.popleft()
                freed += old_end - old_start
            self._tail_bytes -= freed
        if freed:
            self.spool.hold_tail(-freed)

    def tail_start(self) -> int | None:
        """Position of the oldest record held in memory (None if none is)."""
        with self._tail_lock:
            return self._tail[0][0] if self._tail else None

    def tail_from(self, position: int, max_bytes: int) -> list[tuple[Record | None, int]]:
        """``(record, end)`` of the records in memory from ``position`` on ([] if not there).

        The same bytes as in the segment files, never a copy.
        """
        out: list[tuple[Record | None, int]] = []
        with self._tail_lock:
            if not self._tail or not self._tail[0][0] <= position < self._tail[-1][1]:
                return out
            first = bisect.bisect_left(self._tail, position, key=_entry_start)
            if self._tail[first][0] != position:
                return out  # not a record boundary (cannot happen): let the files say
            taken = 0
            for start, end, rec in itertools.islice(self._tail, first, None):
                out.append((rec, end))
                taken += end - start
                if taken >= max_bytes:
                    break
        return out

    def _forget_acked_tail(self) -> None:
        """Acked records leave memory (the server has them); the rest stays for a resend."""
        freed = 0
        with self._tail_lock:
            while self._tail:
                start, end, rec = self._tail[0]
                acked = self.acked_seq if rec.kind == KIND_FRAME else self.pose_acked_seq
                if rec.seq > acked:
                    break
                self._tail.popleft()
                self._tail_bytes -= end - start
                freed += end - start
        self.spool.hold_tail(-freed)

    def first_position(self) -> int:
        """Position of the oldest byte still spooled (the end, if nothing is)."""
        with self._lock:
            return self.segments[0].start if self.segments else self._end

    def _sync_if_due(self) -> None:
        """The batched fsync, outside the lock: an ack on the uplink's loop never waits for it."""
        if not self._sync_due:  # read without the lock: a miss is caught by the next record
            return
        with self._lock:
            if not self._sync_due or self._fd is None:
                return
            fd = os.dup(self._fd)  # the segment may be closed meanwhile; this stays valid
            self._sync_due = False
            self._dirty_bytes = 0
            self._last_fsync = time.monotonic()
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync(self) -> None:
        if self._fd is not None and self._dirty_bytes:
            os.fsync(self._fd)
        self._dirty_bytes = 0
        self._last_fsync = time.monotonic()

    def save_meta(self) -> None:
        try:
            _atomic_write_json(self.dir / "take.json", self.meta.__dict__)
        except OSError as e:
            # A full disk: the uplink works from the meta in memory; take.json catches up
            # at the next save (a crash before that recovers from the older one).
            if not self._meta_stale:
                log.warning("take %s/%s: take.json not updated: %s", *self.key, e.strerror)
            self._meta_stale = True
        else:
            self._meta_stale = False

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                self._sync()
                os.close(self._fd)
                self._fd = None

    # ---- acks (uplink's thread) -------------------------------------------------------------

    def ack(self, durable_seq: int, pose_durable_seq: int) -> int:
        """Forget what the server holds; returns how many frames this ack newly covers."""
        with self._lock:
            newly = max(0, durable_seq - self.acked_seq)
            self.acked_seq = max(self.acked_seq, durable_seq)
            self.pose_acked_seq = max(self.pose_acked_seq, pose_durable_seq)
            # Only whole segments go; if the one being appended to goes, the next record
            # starts a new one.
            while self.segments:
                seg = self.segments[0]
                if seg.last_frame > self.acked_seq or seg.last_pose > self.pose_acked_seq:
                    break
                if len(self.segments) == 1 and self._fd is not None:
                    # No fsync: everything in it is on the server already.
                    os.close(self._fd)
                    self._fd = None
                    self._dirty_bytes, self._sync_due = 0, False
                self.segments.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    seg.path.unlink()
                self.spool.release(seg.size)
        self._forget_acked_tail()
        return newly

    def finish(self) -> None:
        """The server confirmed the whole take: delete its directory."""
        with self._lock:
            self.complete = True
            self.close()
            freed = self.bytes
            self.segments = []
            shutil.rmtree(self.dir, ignore_errors=True)
        with self._tail_lock:
            self._tail.clear()
            in_memory, self._tail_bytes = self._tail_bytes, 0
        self.spool.hold_tail(-in_memory)
        self.spool.release(freed)
        self.spool.forget(self)

    # ---- reading (uplink) ---------------------------------------------------------------------

    def snapshot(self) -> list[tuple[Path, int, int, int]]:
        """(path, segment number, start position, complete bytes) of each segment, for a reader."""
        with self._lock:
            return [(s.path, s.number, s.start, s.size) for s in self.segments]

    def first_frame_seq(self) -> int | None:
        """The lowest frame seq still in the spool (None if no frame is)."""
        for path, _n, _start, size in self.snapshot():
            for rec in _scan(path, size):
                if rec.kind == KIND_FRAME:
                    return rec.seq
        return None

    def status(self) -> dict[str, Any]:
        missing = 0
        if self.meta.behind_from_seq is not None:
            end = self.meta.frame_count
            missing = (
                (end - self.meta.behind_from_seq) if end is not None else self.meta.not_spooled
            )
        return {
            "session": self.meta.session_id,
            "camera": self.meta.camera_id,
            "spooled_next_seq": self.next_seq,
            "acked_seq": self.acked_seq,
            "frame_count": self.meta.frame_count,
            "behind_from_seq": self.meta.behind_from_seq,
            "not_spooled": self.meta.not_spooled,
            "poses_behind_from_seq": self.meta.poses_behind_from_seq,
            "missing": missing,
            "bytes": self.bytes,
            "complete": self.complete,
            "lost_frames": len(self.lost_seqs),
            "lost_why": self.lost_why,
            "error": self.error,
        }


class Spool:
    """All takes waiting to be uploaded, under one disk budget."""

    def __init__(self, directory: str | os.PathLike[str], budget_bytes: int, booth_id: str):
        self.dir = make_dirs(directory, "uplink.spool_dir")  # a one-line error, not a traceback
        self.budget_bytes = budget_bytes
        self.booth_id = booth_id
        self.segment_bytes = max(4096, min(SEGMENT_BYTES, budget_bytes // 8))
        self.tail_bytes = TAIL_BYTES
        self._lock = threading.Lock()
        self._used = 0
        self._tail_used = 0
        self.takes: dict[tuple[str, str], SpoolTake] = {}
        self._listeners: list[Callable[[], None]] = []
        self._recover()

    # ---- budget -----------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    def reserve(self, n: int, *, force: bool = False) -> bool:
        with self._lock:
            if not force and self._used + n > self.budget_bytes:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used = max(0, self._used - n)
        self.notify()

    def hold_tail(self, n: int) -> int:
        """Count ``n`` more bytes (fewer if negative) of records kept in memory; how many over."""
        with self._lock:
            self._tail_used += n
            return max(0, self._tail_used - self.tail_bytes)

    # ---- takes ----------------------------------------------------------------------------

    def open_take(
        self, session_id: str, camera_id: str, *, width: int = 0, height: int = 0, fps: float = 0.0
    ) -> SpoolTake:
        for kind, value in (("session", session_id), ("camera", camera_id)):
            if not _SAFE_ID.match(value or ""):
                raise BadInput(f"{kind} id {value!r} cannot name a spool directory")
        with self._lock:
            take = self.takes.get((session_id, camera_id))
            if take is not None:
                return take
            directory = self.dir / f"{session_id}__{camera_id}"
            directory.mkdir(parents=True, exist_ok=True)
            meta = TakeMeta(session_id, camera_id, self.booth_id, width, height, fps)
            take = SpoolTake(self, directory, meta)
            take.save_meta()
            take._note_captured(0)  # its blocks exist before the disk can fill up
            _fsync_dir(self.dir)
            self.takes[take.key] = take
        self.notify()
        return take

    def forget(self, take: SpoolTake) -> None:
        with self._lock:
            if self.takes.get(take.key) is take:
                del self.takes[take.key]

    def pending(self) -> list[SpoolTake]:
        with self._lock:
            return sorted(
                (t for t in self.takes.values() if not t.complete), key=lambda t: t.meta.created_at
            )

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def notify(self) -> None:
        for fn in self._listeners:
            fn()

    def close(self) -> None:
        for take in list(self.takes.values()):
            take.close()

    # ---- recovery ---------------------------------------------------------------------------

    def _recover(self) -> None:
        for directory in sorted(p for p in self.dir.iterdir() if p.is_dir()):
            try:
                take = self._recover_take(directory)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise BoothError(f"spool {directory} is unreadable ({e}); move it aside") from None
            if take is None:
                continue
            self.takes[take.key] = take
            self._used += take.bytes
            log.info(
                "spool: resuming take %s/%s (%d frames, %d bytes)",
                *take.key,
                take.next_seq,
                take.bytes,
            )

    def _recover_take(self, directory: Path) -> SpoolTake | None:
        meta_path = directory / "take.json"
        if not meta_path.exists():
            shutil.rmtree(directory, ignore_errors=True)  # died before the take was set up
            return None
        meta = TakeMeta(**json.loads(meta_path.read_text()))
        take = SpoolTake(self, directory, meta)
        numbers = sorted(
            int(m.group(1)) for p in directory.iterdir() if (m := _SEGMENT_RE.match(p.name))
        )
        for number in numbers:
            path = directory / f"seg-{number:06d}.log"
            seg = _Segment(number, path)
            good = 0
            for rec, end_at in _scan_with_offsets(path):
                good = end_at
                if rec.kind == KIND_FRAME:
                    seg.last_frame = max(seg.last_frame, rec.seq)
                    take.next_seq = max(take.next_seq, rec.seq + 1)
                else:
                    seg.last_pose = max(seg.last_pose, rec.seq)
                    take.last_pose = max(take.last_pose, rec.seq)
            if good < path.stat().st_size:
                log.warning("spool: %s ends in a torn record; cutting it at byte %d", path, good)
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            seg.size = good
            seg.start = take._end
            take._end += good
            take.segments.append(seg)
        take._next_segment = numbers[-1] + 1 if numbers else 0
        if meta.behind_from_seq is not None:
            take.next_seq = max(take.next_seq, meta.behind_from_seq)
        with contextlib.suppress(FileNotFoundError, struct.error):  # torn by a power cut
            (take.captured,) = _COUNT.unpack((directory / CAPTURED_FILE).read_bytes())
        if segs := take.segments:
            take._fd = os.open(segs[-1].path, os.O_WRONLY | os.O_APPEND)
        if not take.ended:
            # The agent died mid-capture: what is spooled is the take (a "behind" take
            # fetches the rest from the recording), plus what the server already holds
            # (``reconcile_with_server``).
            meta.sealed_on_recovery = True
            take.end()
            log.warning(
                "spool: take %s/%s was not ended; sealed at %d frames", *take.key, meta.frame_count
            )
        return take


def _scan_with_offsets(path: Path, limit: int | None = None) -> Iterator[tuple[Record, int]]:
    """Complete, CRC-checked records of a segment file with the offset just after each."""
    with open(path, "rb", buffering=1 << 20) as f:
        pos = 0
        while limit is None or pos < limit:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            kind, crc, seq, ts, length = _HEADER.unpack(header)
            if kind not in (KIND_FRAME, KIND_POSE):
                return
            payload = f.read(length)
            if len(payload) < length or _crc(kind, seq, ts, payload) != crc:
                return
            pos += _HEADER.size + length
            yield Record(kind, seq, ts, payload), pos


def _scan(path: Path, limit: int) -> Iterator[Record]:
    for rec, _ in _scan_with_offsets(path, limit):
        yield rec


class _SendCursor:
    """Reads a take's records in order, skipping what the server already holds.

    Its place is a take-wide position (see ``SpoolTake``). Records still in the take's
    in-memory tail come from there; older ones (after a reconnect or a restart, or when
    the uplink fell behind the tail) are read from the segment files. A file is held
    open only while there is more to read in it: a deleted (acked) segment's blocks stay
    taken as long as anyone has it open, and on a full disk the backfill needs them.
    """

    def __init__(self, take: SpoolTake, resume_after: int, pose_resume_after: int):
        self.take = take
        self.frames_after = resume_after
        self.poses_after = pose_resume_after
        self.position = take.first_position()
        self._file: Any = None
        self._segment = -1  # number of the segment self._file reads
        self._offset = 0  # where self._file stands in it
        self.files_opened = 0  # an uplink that keeps up opens none

    def read(self, max_bytes: int = READ_BATCH_BYTES) -> list[Record]:
        """The next records (possibly none, if the uplink has caught up with the spool)."""
        out: list[Record] = []
        budget = max_bytes
        while budget > 0:
            batch = self.take.tail_from(self.position, budget)
            if batch:
                self.close()  # past the files (see the class doc)
            else:
                batch = self._read_files(budget)
                if not batch:
                    self.close()  # nothing more in the files for now
                    break
            for rec, end in batch:
                budget -= end - self.position
                self.position = end
                if rec is not None and self._wanted(rec):
                    out.append(rec)
        return out

    def _wanted(self, rec: Record) -> bool:
        if rec.kind == KIND_FRAME:
            if rec.seq <= self.frames_after:
                return False
            self.frames_after = rec.seq
        else:
            if rec.seq <= self.poses_after:
                return False
            self.poses_after = rec.seq
        return True

    def _read_files(self, max_bytes: int) -> list[tuple[Record | None, int]]:
        """Records from the segment file holding ``position``, up to where the tail starts."""
        segments = self.take.snapshot()
        if segments and self.position < segments[0][2]:
            self.position = segments[0][2]  # acked and deleted meanwhile: nothing to resend
        tail = self.take.tail_start()
        for path, number, start, size in segments:
            if not start <= self.position < start + size:
                continue
            if not self._open(path, number):
                self.position = start + size  # acked and deleted meanwhile: the next one
                continue
            stop = size if tail is None or tail <= self.position else min(size, tail - start)
            return self._read_segment(start, stop, max_bytes)
        return []

    def _open(self, path: Path, number: int) -> bool:
        if number == self._segment:
            return True
        self.close()
        try:
            self._file = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - see close()
        except FileNotFoundError:
            return False
        self._segment, self._offset = number, 0
        self.files_opened += 1
        return True

    def _read_segment(
        self, start: int, stop: int, max_bytes: int
    ) -> list[tuple[Record | None, int]]:
        """``(record, end)`` read from the open segment; None for one the server holds."""
        offset = self.position - start
        if offset != self._offset:
            self._file.seek(offset)
        out: list[tuple[Record | None, int]] = []
        taken = 0
        while offset < stop and taken < max_bytes:
            kind, _crc, seq, ts, length = _HEADER.unpack(self._file.read(_HEADER.size))
            offset += _HEADER.size + length
            after = self.frames_after if kind == KIND_FRAME else self.poses_after
            if seq <= after:  # acked before: not worth reading
                self._file.seek(length, os.SEEK_CUR)
                out.append((None, start + offset))
                continue
            out.append((Record(kind, seq, ts, self._file.read(length)), start + offset))
            taken += _HEADER.size + length
        self._offset = offset
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._segment = -1


class TakeNotAccepted(BoothError):
    """The server refused the take for a reason retrying soon will not fix."""


def backoff_s(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, initial_s * (2.0 ** min(attempt, 30))))


def make_channel(uplink: Any) -> grpc.aio.Channel:
    """A channel to ``uplink.address``, TLS when ``uplink.tls`` is set (UplinkConfig)."""
    max_bytes = uplink.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # Notice a dead Wi-Fi link within seconds instead of TCP's minutes.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # The uplink resumes from the server's ack itself. gRPC's own retries would replay
        # buffered messages on a new connection behind its back (and copy every message
        # into a retry buffer), so they are off.
        ("grpc.enable_retries", 0),
        # Our own backoff decides when to retry; keep gRPC's reconnect quick.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]
    if uplink.tls is None:
        return grpc.aio.insecure_channel(uplink.address, options=options)
    ca = None
    if uplink.tls.ca_cert is not None:
        try:
            ca = Path(uplink.tls.ca_cert).read_bytes()
        except OSError as e:
            raise BadInput(f"uplink.tls.ca_cert: cannot read {e.filename}: {e.strerror}") from None
    if uplink.tls.server_name:
        options.append(("grpc.ssl_target_name_override", uplink.tls.server_name))
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.aio.secure_channel(uplink.address, creds, options=options)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Streamer:
    """The spool plus the uplink that empties it. Build it, ``await start()``, feed takes.

    ``open_take(...)`` returns the ``SpoolTake`` to feed from the capture threads
    (``add_frames(take.subscribe_stream())``, ``add_pose``, ``end``); the uplink
    picks it up by itself. ``status()`` has the AgentStatus fields it owns.
    """

    def __init__(
        self,
        uplink: Any,  # edge_agent.config.UplinkConfig
        *,
        booth_id: str,
        camera_id: str,
        software_version: str = "",
        archive: TakeArchive | None = None,
        seed: int | None = None,
    ):
        self.cfg = uplink
        self.booth_id, self.camera_id = booth_id, camera_id
        self.software_version = software_version
        self.archive = archive
        self.spool = Spool(uplink.spool_dir, uplink.spool_budget_mb * 1024 * 1024, booth_id)
        self.frames_acked = 0
        self.frames_lost = 0  # sent as lost: corrupt at capture, or missing everywhere
        self.lost_why = ""  # about the last uploaded take that lost frames not recorded
        self.ack_latencies_s: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.reconnects = 0
        self.takes_dropped = 0  # takes whose session was deleted before they were uploaded
        # The last take that could not even be put in the spool (its disk refused it):
        # the tablet must hear that this camera's upload is not coming.
        self.spool_error = ""
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._supervisor: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._closed = False

    # ---- feeding ----------------------------------------------------------------------

    def open_take(
        self, session_id: str, *, width: int = 0, height: int = 0, fps: float = 0.0
    ) -> SpoolTake:
        return self.spool.open_take(session_id, self.camera_id, width=width, height=height, fps=fps)

    # ---- running ----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.spool.add_listener(self._notify)
        if self.archive is not None:
            await asyncio.to_thread(self._count_recovered_takes, self.archive)
        self._channel = make_channel(self.cfg)
        self._supervisor = asyncio.create_task(self._supervise(), name="uplink")

    def _count_recovered_takes(self, archive: TakeArchive) -> None:
        for take in self.spool.pending():
            if not take.meta.sealed_on_recovery or take.meta.recording_checked:
                continue
            try:
                recorded = archive.recorded_count(*take.key)
            except (OSError, ValueError) as e:
                log.warning("take %s/%s: its recording could not be counted: %s", *take.key, e)
                continue
            take.extend_to_recorded(recorded)

    async def stop(self) -> None:
        """Stop uploading (what is spooled stays for the next start)."""
        self._closed = True
        tasks = [t for t in (self._supervisor, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        self.spool.close()

    async def wait_uploaded(self, session_id: str, timeout_s: float | None = None) -> None:
        """Until the server confirmed this camera's take of ``session_id`` complete."""
        await self._wait_until(
            lambda: (session_id, self.camera_id) not in self.spool.takes, timeout_s
        )

    async def wait_idle(self, timeout_s: float | None = None) -> None:
        """Until every spooled take is uploaded."""
        await self._wait_until(lambda: not self.spool.pending(), timeout_s)

    async def _wait_until(self, done: Callable[[], bool], timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            mark = self._mark()
            if done():
                return
            left = 1.0 if deadline is None else min(1.0, deadline - loop.time())
            if left <= 0:
                raise TimeoutError(f"the upload did not finish within {timeout_s:g} s")
            await self._wait_change(left, mark)

    # Waking the uplink: capture threads append frames and call _notify. Waking the
    # loop costs a syscall and a loop turn, so it happens only when someone waits:
    # a waiter takes a mark (both counters) BEFORE looking for work, registers in
    # _waiting, and sleeps only if the mark is unchanged; a notifier bumps the counter
    # BEFORE looking at _waiting. One of the two always sees the other.
    _changes = 0  # changes seen on the loop (acks, completions)
    _appended = 0  # records appended, from any thread
    _waiting = 0
    _bump_scheduled = False

    def _mark(self) -> tuple[int, int]:
        return self._changes, self._appended

    def _notify(self) -> None:
        self._appended += 1
        loop = self._loop
        if not self._waiting or self._bump_scheduled or loop is None or loop.is_closed():
            return
        self._bump_scheduled = True
        # The loop may be shutting down; then nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._bump)

    def _bump(self) -> None:
        self._bump_scheduled = False
        self._changes += 1
        if self._wake is not None:
            self._wake.set()

    async def _wait_change(self, timeout_s: float, mark: tuple[int, int] | None = None) -> None:
        """Until something changed since ``mark`` (taken before the caller looked), or timeout."""
        mark = mark or self._mark()
        assert self._wake is not None
        self._waiting += 1
        try:
            while self._mark() == mark:
                self._wake.clear()
                if not await wait_event(self._wake, timeout_s):
                    return
        finally:
            self._waiting -= 1

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        crashes: dict[tuple[str, str], tuple[int, float]] = {}  # key: (count, retry at)
        while not self._closed:
            mark = self._mark()
            # First the uploads that ended: a crash is logged, said in the take's status
            # and retried with backoff (not restarted every second, unseen).
            for key, task in list(self._tasks.items()):
                if not task.done():
                    continue
                del self._tasks[key]
                exc = None if task.cancelled() else task.exception()
                if exc is None:
                    crashes.pop(key, None)
                    continue
                count = crashes.get(key, (0, 0.0))[0] + 1
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (count - 1))
                crashes[key] = (count, loop.time() + delay)
                log.error(
                    "uplink of %s/%s failed on an unexpected error (%d time(s)); retrying in %.0f s",
                    *key,
                    count,
                    delay,
                    exc_info=exc,
                )
                if (take := self.spool.takes.get(key)) is not None:
                    take.error = (
                        f"upload stopped on an unexpected error ({type(exc).__name__}: {exc}); "
                        "retrying, see the agent's log"
                    )
            for take in self.spool.pending():
                if take.key in self._tasks:
                    continue
                crash = crashes.get(take.key)
                if crash is not None and loop.time() < crash[1]:
                    continue
                self._tasks[take.key] = asyncio.create_task(
                    self._upload(take), name=f"uplink-{take.meta.session_id}"
                )
            await self._wait_change(1.0, mark)

    # ---- one take -----------------------------------------------------------------------

    async def _upload(self, take: SpoolTake) -> None:
        attempt = 0
        while not take.complete and not self._closed:
            try:
                progressed = await self._stream_take(take)
            except TakeNotAccepted as e:
                take.error = str(e)
                log.warning("take %s/%s not accepted: %s", *take.key, e)
                delay = self.cfg.backoff_max_s
            except grpc.aio.AioRpcError as e:
                take.error = f"{e.code().name}: {e.details()}"
                if _session_deleted(e):
                    if take.ended:
                        await self._drop_deleted(take)
                        return
                    # Still capturing (deleted mid-take): drop it once it has ended.
                    take.error = "its session was deleted; the take is dropped once it ends"
                    delay = self.cfg.backoff_initial_s
                elif _take_not_wanted(e) and take.ended:
                    await self._drop_unwanted(take, e.details())
                    return
                elif e.code() in PERMANENT_CODES:
                    log.warning("take %s/%s refused: %s", *take.key, take.error)
                    delay = self.cfg.backoff_max_s
                else:
                    log.info("take %s/%s: stream broke (%s); reconnecting", *take.key, take.error)
                    delay = backoff_s(
                        attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
                    )
                    attempt += 1
                self.reconnects += 1
            else:
                if take.complete:
                    return
                attempt = 0 if progressed else attempt + 1
                delay = (
                    0.0
                    if progressed
                    else backoff_s(
                        attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
                    )
                )
            if delay:
                await asyncio.sleep(delay)

    async def _stream_take(self, take: SpoolTake) -> bool:
        """One Ingest stream for ``take``; True if it made progress. Raises on stream errors."""
        assert self._channel is not None
        stub = booth_pb2_grpc.IngestStub(self._channel)
        meta = take.meta
        call = stub.Stream(metadata=auth_metadata(self.cfg.token))
        reader: asyncio.Task | None = None
        cursor: _SendCursor | None = None
        try:
            await call.write(
                booth_pb2.IngestRequest(
                    hello=booth_pb2.Hello(
                        session_id=meta.session_id,
                        camera_id=meta.camera_id,
                        booth_id=meta.booth_id,
                        software_version=self.software_version,
                        width=meta.width,
                        height=meta.height,
                        fps=meta.fps,
                    )
                )
            )
            first = await call.read()
            if first is grpc.aio.EOF:
                await _raise_status(call)
            if first.WhichOneof("body") != "hello_ack":
                raise TakeNotAccepted("the server did not answer the hello with a hello_ack")
            resume = first.hello_ack.resume_after_seq
            pose_resume = first.hello_ack.pose_resume_after_seq
            take.reconcile_with_server(resume)
            self._on_ack(take, resume, pose_resume, deque())
            oldest = take.first_frame_seq()
            if oldest is not None and oldest > resume + 1:
                raise TakeNotAccepted(
                    f"the server holds frames up to {resume} but this spool starts at {oldest}; "
                    f"frames {resume + 1}..{oldest - 1} were acked before and are gone from it"
                )
            sent_at: deque[tuple[int, float]] = deque()  # (frame seq, when sent), in seq order
            reader = asyncio.create_task(self._read_acks(call, take, sent_at))
            cursor = _SendCursor(take, resume, pose_resume)
            progressed = await self._send(call, take, cursor, sent_at, reader)
            await call.done_writing()
            await reader
            return progressed or take.complete
        except asyncio.InvalidStateError:
            # A write after the call ended: the call's status says why.
            await _raise_status(call)
            raise
        finally:
            if cursor is not None:
                cursor.close()
            if reader is not None:
                reader.cancel()  # no-op if it ended; its error (if any) is the stream's error
                await asyncio.gather(reader, return_exceptions=True)
            call.cancel()

    async def _send(
        self,
        call: Any,
        take: SpoolTake,
        cursor: _SendCursor,
        sent_at: deque[tuple[int, float]],
        reader: asyncio.Task,
    ) -> bool:
        progressed = False
        ids = {"session_id": take.meta.session_id, "camera_id": take.meta.camera_id}
        max_jpeg = self.cfg.max_message_mb * 2**20 - MESSAGE_OVERHEAD_BYTES
        while not self._closed:
            if reader.done():
                reader.result()  # the stream failed: raise its error
                return progressed
            mark = self._mark()
            batch = cursor.read()
            for rec in batch:
                if rec.kind == KIND_FRAME:
                    if not jpeg_looks_complete(rec.payload):
                        req = self._lost_frame(take, rec, ids)  # or missing everywhere
                    elif len(rec.payload) > max_jpeg:
                        # Let the server keep (and ack) what came before, then say why we stop.
                        await call.done_writing()
                        await reader
                        raise TakeNotAccepted(
                            f"frame {rec.seq} is {len(rec.payload) / 2**20:.1f} MiB, more than "
                            f"uplink.max_message_mb ({self.cfg.max_message_mb}) allows; the take "
                            "cannot complete until that limit (and ingest.max_message_mb) is raised"
                        )
                    else:
                        req = booth_pb2.IngestRequest(
                            frame=booth_pb2.Frame(
                                seq=rec.seq,
                                capture_ts_ns=rec.capture_ts_ns,
                                jpeg=rec.payload,
                                **ids,
                            )
                        )
                    await call.write(req)
                    sent_at.append((rec.seq, time.monotonic()))
                else:
                    await call.write(booth_pb2.IngestRequest(pose=_pose_message(rec, ids)))
                progressed = True
            if batch:
                continue
            count = take.meta.frame_count
            waiting = take.behind or take.poses_behind
            # Poses too: the agent spools them just before it ends the take, and both may
            # land between the empty read above and this check. The server completes the
            # take on its end, and the board then drops the spool with them in it.
            poses_sent = cursor.poses_after >= take.last_pose
            if (
                count is not None
                and not waiting
                and poses_sent
                and cursor.frames_after >= count - 1
            ):
                # Everything is sent (the end goes last, after any backfilled frames).
                end = booth_pb2.EndOfTake(frame_count=count, **ids)
                await call.write(booth_pb2.IngestRequest(end=end))
                return True
            if waiting and take.ended and self.archive is not None:
                try:
                    n = await asyncio.to_thread(take.backfill, self.archive)
                except (OSError, BoothError, ValueError) as e:
                    raise TakeNotAccepted(
                        f"cannot read frames or poses back from the recording: {e}"
                    ) from None
                if n:
                    continue
            if take.behind:
                take.error = (
                    f"{take.status()['missing']} frames from seq {take.meta.behind_from_seq} "
                    "are not uploaded (spool full or stream buffer overflow); they are in "
                    "the local recording"
                )
            await self._wait_change(1.0, mark)

    def _lost_frame(
        self, take: SpoolTake, rec: Any, ids: dict[str, str]
    ) -> booth_pb2.IngestRequest:
        """A frame with no usable image: sent as lost, so the take can complete.

        Either the camera delivered it corrupt (ingest would refuse its bytes, and every
        later frame with them; the recording on the board keeps the bytes as the camera
        gave them), or it is an empty record: neither the spool nor the recording has
        it (``SpoolTake._spool_lost`` said so when it spooled it).
        """
        if rec.seq not in take.lost_seqs:
            take.lost_seqs.add(rec.seq)
            self.frames_lost += 1
            if rec.payload:
                log.warning(
                    "session %s camera %s: frame %d is not a whole JPEG (corrupt at capture); "
                    "uploading it as a lost frame",
                    take.meta.session_id,
                    take.meta.camera_id,
                    rec.seq,
                )
        frame = booth_pb2.Frame(seq=rec.seq, capture_ts_ns=rec.capture_ts_ns, lost=True, **ids)
        return booth_pb2.IngestRequest(frame=frame)

    async def _read_acks(
        self, call: Any, take: SpoolTake, sent_at: deque[tuple[int, float]]
    ) -> None:
        while (resp := await call.read()) is not grpc.aio.EOF:
            if resp.WhichOneof("body") != "ack":
                continue
            ack = resp.ack
            self._on_ack(take, ack.durable_seq, ack.pose_durable_seq, sent_at)
            if ack.take_complete:
                take.finish()
                log.info("take %s/%s uploaded (%d frames as lost)", *take.key, len(take.lost_seqs))
                if take.lost_why:  # the take leaves the status: its loss stays in it
                    self.lost_why = f"session {take.meta.session_id}: {take.lost_why}"
                self._bump()
                if self.archive is not None:
                    await asyncio.to_thread(self.archive.uploaded, *take.key)
                return
        await _raise_status(call)

    def _on_ack(
        self, take: SpoolTake, durable: int, pose_durable: int, sent_at: deque[tuple[int, float]]
    ) -> None:
        if sent_at:
            now = time.monotonic()
            while sent_at and sent_at[0][0] <= durable:
                self.ack_latencies_s.append(now - sent_at.popleft()[1])
        newly = take.ack(durable, pose_durable)
        if newly:
            take.error = ""  # progress: whatever went wrong before is over
        self.frames_acked += newly

    async def _drop_deleted(self, take: SpoolTake) -> None:
        """The attendee deleted the session while this board held the take: let it go."""
        log.warning(
            "take %s/%s: its session was deleted in the cloud; dropping the spooled copy "
            "and the local recording",
            *take.key,
        )
        # The recording first: a board killed in between finds the take still spooled,
        # is told "deleted" again, and finishes the job.
        await self._let_go(take, self.archive.deleted if self.archive is not None else None)

    async def _drop_unwanted(self, take: SpoolTake, why: str) -> None:
        """The session went on without this camera (staff chose to): stop offering the
        take. Its recording stays, as an uploaded one's does, until retention removes it."""
        log.warning("take %s/%s is not wanted (%s); dropping the spooled copy", *take.key, why)
        await self._let_go(take, self.archive.uploaded if self.archive is not None else None)

    async def _let_go(self, take: SpoolTake, recording: Callable[[str, str], None] | None) -> None:
        """Settle the take's recording (``recording(session, camera)``), then its spool."""
        if recording is not None:
            await asyncio.to_thread(recording, *take.key)
        self.takes_dropped += 1
        await asyncio.to_thread(take.finish)
        self._bump()

    # ---- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        takes = [t.status() for t in self.spool.pending()]
        return {
            "frames_acked": self.frames_acked,
            "takes_dropped": self.takes_dropped,
            "spool_bytes": self.spool.used_bytes,
            "upload_behind": any(
                t["behind_from_seq"] is not None or t["poses_behind_from_seq"] is not None
                for t in takes
            ),
            "stream_dropped": sum(t["not_spooled"] for t in takes),
            "frames_lost": self.frames_lost,
            "lost_why": next((t["lost_why"] for t in takes if t["lost_why"]), self.lost_why),
            "error": next((t["error"] for t in takes if t["error"]), self.spool_error),
            "takes": takes,
        }


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait for ``event`` at most ``timeout_s``; True if it is set.

    Not ``asyncio.wait_for``: before Python 3.12 it can swallow a cancellation that
    arrives as the event fires, and a stopped uplink would then never stop.
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


def _pose_message(rec: Record, ids: dict[str, str]) -> booth_pb2.Pose:
    kp, imputed, glitch = decode_pose(rec.payload)
    return booth_pb2.Pose(
        seq=rec.seq,
        skeleton=booth_pb2.Skeleton(
            keypoints=[booth_pb2.Keypoint(x=float(x), y=float(y), score=float(s)) for x, y, s in kp]
        ),
        imputed=imputed,
        glitch=glitch,
        **ids,
    )


async def _raise_status(call: Any) -> None:
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), await call.trailing_metadata(), await call.details()
        )


def _session_deleted(err: grpc.aio.AioRpcError) -> bool:
    """Whether ingest refused the take because its session was deleted (not merely unknown)."""
    return _refused_as(err, grpc.StatusCode.NOT_FOUND, SESSION_DELETED)


def _take_not_wanted(err: grpc.aio.AioRpcError) -> bool:
    """Whether ingest refused the take because its session went on without this camera."""
    return _refused_as(err, grpc.StatusCode.PERMISSION_DENIED, TAKE_NOT_WANTED)


def _refused_as(err: grpc.aio.AioRpcError, code: grpc.StatusCode, state: str) -> bool:
    """``err`` has ``code`` and ingest's trailer saying the session is in ``state``."""
    if err.code() != code:
        return False
    trailers = err.trailing_metadata() or ()
    return any(k == SESSION_STATE_KEY and v == state for k, v in trailers)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- wiring to the capture (edge_agent.agent / edge_agent.capture) -----------------------


class RecordingArchive:
    """A take's frames read back from its MJPEG-in-MP4 segments: the spool's fallback.

    Uses the capture's outputs in ``capture.out_dir/<session>/<camera>/``: ``frames.csv``
    (seq, capture_ts_ns, segment index; -1 = not recorded) and the ``seg_NNNNN.mp4``
    files, whose packets are the camera's JPEG bytes unchanged.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        keep_uploaded: bool = False,
        pose_factory: Callable[[], Any] | None = None,
        smoothing: Any = None,  # edge_agent.config.SmoothingConfig
    ):
        self.out_dir = Path(out_dir)
        self.keep_uploaded = keep_uploaded
        # For a take whose agent died before it wrote poses.npz: pose the recording.
        self.pose_factory = pose_factory
        self.smoothing = smoothing
        # Warnings already given: the spool reads a take back again and again while the
        # disk stays full, and the log must not repeat the same line on every ack.
        self._said: set[tuple[str, ...]] = set()

    def _warn_once(self, key: tuple[str, ...], msg: str, *args: Any) -> None:
        if key in self._said:
            log.debug(msg, *args)
            return
        if len(self._said) > 10_000:  # a long-lived agent: forget the oldest takes' lines
            self._said.clear()
        self._said.add(key)
        log.warning(msg, *args)

    def uploaded(self, session_id: str, camera_id: str) -> None:
        """Ingest holds the whole take: the recording goes, unless configured to stay."""
        if not self.keep_uploaded:
            discard_recording(self.out_dir, session_id, camera_id, why="uploaded")

    def deleted(self, session_id: str, camera_id: str) -> None:
        """The take's session was deleted: the recording goes, whatever the setting."""
        discard_recording(self.out_dir, session_id, camera_id, why="its session was deleted")

    def frames_from(self, session_id: str, camera_id: str, seq: int) -> Iterator[CapturedFrame]:
        import csv

        from edge_agent.capture.segments import (
            read_recorded_frames,
            read_segment_packets,
            segment_name,
        )

        directory = self.out_dir / session_id / camera_id
        # Each segment's packets are its frames in seq order.
        segments: dict[int, list[tuple[int, int]]] = {}
        try:
            with open(directory / "frames.csv", newline="") as f:
                for row in csv.DictReader(f):
                    segments.setdefault(int(row["segment"]), []).append(
                        (int(row["seq"]), int(row["capture_ts_ns"]))
                    )
        except FileNotFoundError:
            # Written when the take finishes: it never did (the agent died mid-take). Each
            # segment's own index says which packet is which frame.
            self._warn_once(
                ("no frames.csv", session_id, camera_id),
                "take %s/%s: %s has no frames.csv (its capture never finished); reading "
                "frames from seq %d by the segments' own indexes",
                session_id,
                camera_id,
                directory,
                seq,
            )
            yield from read_recorded_frames(directory, seq)
            return
        unrecorded = [s for s, _ in segments.pop(-1, []) if s >= seq]
        if unrecorded:
            # The spool uploads them as lost when it reaches them; say here why.
            self._warn_once(
                ("unrecorded", session_id, camera_id, str(unrecorded[0])),
                "take %s/%s: %d frames from seq %d were never recorded (disk full?)",
                session_id,
                camera_id,
                len(unrecorded),
                unrecorded[0],
            )
        for index in sorted(segments):
            frames = segments[index]
            if frames[-1][0] < seq:
                continue
            path = directory / segment_name(index)
            if not path.exists():  # removed by hand, or by a clean-up: it is not coming back
                log.warning(
                    "take %s/%s: %s is missing; its %d frames cannot be read back",
                    session_id,
                    camera_id,
                    path,
                    len(frames),
                )
                continue
            packets = read_segment_packets(path)
            for (s, ts), (_pts, jpeg) in zip(frames, packets, strict=False):
                if s >= seq:
                    yield CapturedFrame(s, ts, jpeg)

    def recorded_count(self, session_id: str, camera_id: str) -> int:
        """Frames the capture took: ``frames.csv``'s rows, else the last frame the segments hold."""
        import csv

        from edge_agent.capture.segments import read_recorded_frames

        directory = self.out_dir / session_id / camera_id
        try:
            with open(directory / "frames.csv", newline="") as f:
                return max((int(row["seq"]) + 1 for row in csv.DictReader(f)), default=0)
        except FileNotFoundError:
            pass
        last = -1
        if directory.is_dir():
            for frame in read_recorded_frames(directory):
                last = frame.seq
        return last + 1

    def poses_from(
        self, session_id: str, camera_id: str, seq: int
    ) -> Iterator[tuple[int, Any, bool, bool]]:
        from edge_agent.capture.take import POSES, recover_poses
        from edge_agent.config import SmoothingConfig

        directory = self.out_dir / session_id / camera_id
        path = directory / POSES
        rows = _poses_on_disk(path, session_id, camera_id)
        if rows is None and self.pose_factory is not None and directory.is_dir():
            recover_poses(
                directory,
                self.frames_from(session_id, camera_id, 0),
                self.pose_factory,
                self.smoothing or SmoothingConfig(),
            )
            rows = _read_poses(path) if path.exists() else None
        if rows is None:
            log.warning(
                "take %s/%s: %s has no poses; the take uploads without them",
                session_id,
                camera_id,
                directory,
            )
            return
        yield from (pose for pose in rows if pose[0] >= seq)


def _poses_on_disk(
    path: Path, session_id: str, camera_id: str
) -> Iterator[tuple[int, Any, bool, bool]] | None:
    """The rows of a take's ``poses.npz``; None if there is none, or it is damaged (a
    power cut before it reached the disk: then it is set aside, to be posed again)."""
    if not path.exists():
        return None
    try:
        return _read_poses(path)
    except UnreadablePoses as e:
        aside = path.with_name(path.name + ".unreadable")
        log.warning("take %s/%s: %s; moved to %s", session_id, camera_id, e, aside.name)
        os.replace(path, aside)
        return None


def stream_agent_takes(agent: Any, streamer: Streamer) -> None:
    """Spool (and so upload) every take ``agent`` captures. Call once, before the first take.

    For each take: a thread moves frames from the take's stream buffer into the spool
    as they are captured; when the take is done, its smoothed poses are spooled and the
    take is ended with the number of frames the camera delivered (frames the buffer
    dropped are read back from the recording, see ``RecordingArchive``).
    """

    def on_take(take: Any) -> None:
        # What the camera granted (a V4L2 camera may grant 60 fps when asked for 120; a
        # video file has its own rate): the cloud splits and renders the take by it.
        granted = take.granted
        if granted is not None:
            width, height, fps = granted.width, granted.height, float(granted.fps)
        else:
            source = agent.cfg.source
            width, height = getattr(source, "size", (0, 0))
            fps = float(getattr(source, "fps", 0.0))
        try:
            spooled = streamer.open_take(take.session_id, width=width, height=height, fps=fps)
        except OSError as e:
            streamer.spool_error = (
                f"take {take.session_id} cannot be uploaded: the spool in "
                f"{streamer.spool.dir} refused it ({e.strerror or e}); it is recorded on the "
                "board only"
            )
            log.error("%s", streamer.spool_error)
            return
        streamer.spool_error = ""
        buffer = take.subscribe_stream()
        feeder = threading.Thread(
            target=spooled.add_frames, args=(buffer,), name=f"spool-{take.session_id}", daemon=True
        )
        feeder.start()

        def done(summary: Any) -> None:
            feeder.join()
            if take.pose_arrays is not None:  # in memory, whatever the disk refused
                for seq, keypoints, imputed, glitch in _pose_rows(take.pose_arrays):
                    spooled.add_pose(seq, keypoints, imputed=imputed, glitch=glitch)
            elif summary.poses:
                _spool_poses(spooled, Path(summary.directory) / summary.poses)
            elif take.worker is not None:
                # The take posed its frames but kept no poses (it failed before): they
                # come from the recording, posed again there if need be.
                spooled.poses_from_recording()
            spooled.end(summary.frames)

        take.add_done_callback(done)

    agent.add_take_listener(on_take)


class UnreadablePoses(BadInput):
    """A ``poses.npz`` that cannot be read (cut short by a power cut, damaged)."""


def _read_poses(path: Path) -> Iterator[tuple[int, Any, bool, bool]]:
    """``(seq, keypoints, imputed, glitch)`` from a take's ``poses.npz``; UnreadablePoses
    if the file is damaged."""
    import zipfile

    import numpy as np

    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in ("seq", "skeleton", "imputed", "glitch")}
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UnreadablePoses(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    return _pose_rows(arrays)


def _pose_rows(arrays: dict[str, Any]) -> Iterator[tuple[int, Any, bool, bool]]:
    """``(seq, keypoints, imputed, glitch)`` per frame of a take's pose arrays."""
    import numpy as np

    seqs, skeletons = arrays["seq"], arrays["skeleton"]
    imputed, glitch = arrays["imputed"], arrays["glitch"]
    for i, seq in enumerate(seqs):
        yield (
            int(seq),
            skeletons[i],
            bool(np.any(imputed[i])) if len(imputed) else False,
            bool(glitch[i]) if len(glitch) else False,
        )


def _spool_poses(spooled: SpoolTake, path: Path) -> None:
    try:
        poses = list(_read_poses(path))
    except UnreadablePoses as e:
        log.warning("take %s/%s: %s; its poses come from the recording", *spooled.key, e)
        spooled.poses_from_recording()
        return
    for seq, keypoints, imputed, glitch in poses:
        spooled.add_pose(seq, keypoints, imputed=imputed, glitch=glitch)
