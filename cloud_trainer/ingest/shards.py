"""Frames chunked into shard objects, and the index that finds each frame again.

A shard is one blob holding many frames of one ``(session, camera)``, so GCS sees
a few large puts instead of one object per frame. Layout (little-endian)::

    b"DBSHARD1"
    repeated: seq u64 | capture_ts_ns i64 | length u32 | jpeg bytes

The header of each record makes a shard readable without the database (for
repair); the ``frames`` table points at the JPEG bytes themselves (``offset``,
``length``) so a reader fetches one frame with a ranged get.

The key is ``sessions/<sid>/frames/<camera>/shard-<first_seq:08d>-<digest>.bin``.
The digest (of the frames' hashes) makes the key depend on the content: a shard
rewritten after a crash with other frame boundaries gets another key, so it can
never overwrite bytes that committed index rows still point at.

A shard is durable once its put returned AND its index rows committed; only then
does ``ShardWriter`` report the new durable seq (and the stream acks it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cloud_trainer.storage.base import BlobStore
from edge_agent.errors import BadInput
from edge_agent.stream import wait_event

log = logging.getLogger(__name__)

SHARD_MAGIC = b"DBSHARD1"
_RECORD = struct.Struct("<QqI")  # seq, capture_ts_ns, length


@dataclass(frozen=True, slots=True)
class FrameIn:
    seq: int
    capture_ts_ns: int
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class PoseIn:
    seq: int
    keypoints: bytes  # float32 (23, 3) little-endian
    imputed: bool
    glitch: bool


def shard_key(session_id: str, camera_id: str, first_seq: int, digest: str) -> str:
    return f"sessions/{session_id}/frames/{camera_id}/shard-{first_seq:08d}-{digest}.bin"


def encode_shard(
    session_id: str, camera_id: str, frames: list[FrameIn]
) -> tuple[str, bytes, list[dict[str, Any]]]:
    """(key, shard bytes, index rows) for frames in seq order."""
    parts: list[bytes] = [SHARD_MAGIC]
    rows: list[dict[str, Any]] = []
    names = hashlib.sha256()
    offset = len(SHARD_MAGIC)
    for f in frames:
        digest = hashlib.sha256(f.jpeg).hexdigest()
        names.update(digest.encode("ascii"))
        header = _RECORD.pack(f.seq, f.capture_ts_ns, len(f.jpeg))
        parts += (header, f.jpeg)
        offset += len(header)
        rows.append(
            {
                "seq": f.seq,
                "capture_ts_ns": f.capture_ts_ns,
                "offset": offset,
                "length": len(f.jpeg),
                "sha256": digest,
            }
        )
        offset += len(f.jpeg)
    key = shard_key(session_id, camera_id, frames[0].seq, names.hexdigest()[:16])
    for r in rows:
        r["shard_key"] = key
    return key, b"".join(parts), rows


def decode_shard(data: bytes) -> Iterator[FrameIn]:
    """The frames of a shard, in order; BadInput if it is not one or is cut short."""
    if not data.startswith(SHARD_MAGIC):
        raise BadInput("not a frame shard (bad magic)")
    pos = len(SHARD_MAGIC)
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise BadInput(f"frame shard truncated at byte {pos}")
        seq, ts, length = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if pos + length > len(data):
            raise BadInput(f"frame shard truncated in frame {seq}")
        yield FrameIn(seq, ts, data[pos : pos + length])
        pos += length


def read_frame(store: BlobStore, row: dict[str, Any], *, verify: bool = True) -> bytes:
    """One frame's JPEG bytes from its index row (a ranged get); b"" for a lost frame."""
    if row["length"] == 0:
        data = b""  # lost at capture: an empty record, nothing to fetch
    else:
        data = store.get_range(row["shard_key"], row["offset"], row["offset"] + row["length"] - 1)
    if verify and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise BadInput(f"frame {row['seq']} in {row['shard_key']} does not match its hash")
    return data


class ShardWriter:
    """Buffers one ``(session, camera)`` stream and writes it out as durable shards.

    The stream's reader calls ``add_frame``/``add_pose`` (cheap, no I/O) and awaits
    ``room()`` so that at most one shard is being written while the next one fills
    (memory stays near two shards per camera). One background task writes: when a
    shard is full, when ``flush_interval_s`` passed since the oldest buffered item,
    or when ``flush()`` asks. Shards of one stream are written in order, one at a
    time, so the durable position only ever moves forward and stays contiguous.
    """

    def __init__(
        self,
        *,
        write: Callable[[list[FrameIn], list[PoseIn]], tuple[int, int]],
        shard_bytes: int,
        flush_interval_s: float,
        on_durable: Callable[[int, int], Awaitable[None]],
        on_error: Callable[[BaseException], None],
    ):
        # write(frames, poses) runs in a worker thread and returns the new
        # (durable_seq, pose_durable_seq); see IngestStream._write_batch.
        self._write = write
        self._shard_bytes = shard_bytes
        self._interval_s = flush_interval_s
        self._on_durable = on_durable
        self._on_error = on_error
        self._frames: list[FrameIn] = []
        self._poses: list[PoseIn] = []
        self._bytes = 0
        self._oldest_at: float | None = None
        self._busy = False  # a batch is being written
        self._force = False
        self._closing = False
        self.error: BaseException | None = None
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()  # the writer took a batch or went idle
        self._task = asyncio.create_task(self._run(), name="shard-writer")

    # ---- producer side (the stream's reader) --------------------------------------

    def add_frame(self, frame: FrameIn) -> None:
        self._note_added(len(frame.jpeg))
        self._frames.append(frame)
        if self._bytes >= self._shard_bytes:
            self._kick.set()

    def add_pose(self, pose: PoseIn) -> None:
        self._note_added(len(pose.keypoints))
        self._poses.append(pose)

    def _note_added(self, n: int) -> None:
        if self._oldest_at is None:
            self._oldest_at = asyncio.get_running_loop().time()
            self._kick.set()  # start the interval timer
        self._bytes += n

    @property
    def full(self) -> bool:
        """A full shard is buffered (``room()`` may wait), or the writer failed."""
        return self._bytes >= self._shard_bytes or self.error is not None

    async def room(self) -> None:
        """Wait while a full shard is buffered behind one still being written (backpressure)."""
        while self._bytes >= self._shard_bytes and self._busy and self.error is None:
            self._changed.clear()
            await self._changed.wait()
        self._raise_if_failed()

    async def flush(self) -> None:
        """Write everything buffered now and return once it is durable (and acked)."""
        self._force = True
        self._kick.set()
        while (self._frames or self._poses or self._busy) and self.error is None:
            self._changed.clear()
            await self._changed.wait()
        self._raise_if_failed()

    async def close(self) -> None:
        """Stop without writing what is buffered (the agent resends it); let a write finish.

        A closer that is cancelled meanwhile leaves the write to finish all the same
        (shielded): cancelled, its thread would still commit, after the stream that
        took over read the take's position.
        """
        self._closing = True
        self._frames, self._poses, self._bytes = [], [], 0
        self._kick.set()
        await asyncio.shield(asyncio.gather(self._task, return_exceptions=True))

    def when_done(self, fn: Callable[[asyncio.Task], None]) -> None:
        """Call ``fn`` once the writer has stopped (closed, or failed) and wrote its last."""
        self._task.add_done_callback(fn)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    # ---- the writer task -------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._closing:
                if not (self._frames or self._poses):
                    self._force = False
                    self._kick.clear()
                    await self._kick.wait()
                    continue
                due = (self._oldest_at or 0.0) + self._interval_s
                if not (self._force or self._bytes >= self._shard_bytes or loop.time() >= due):
                    self._kick.clear()
                    await wait_event(self._kick, due - loop.time())
                    continue
                frames, poses = self._frames, self._poses
                self._frames, self._poses, self._bytes, self._oldest_at = [], [], 0, None
                self._busy = True
                self._changed.set()
                try:
                    # Shielded: a cancelled stream still lets a started write finish, so a
                    # shard is never half indexed by this process.
                    durable, pose_durable = await asyncio.shield(
                        asyncio.to_thread(self._write, frames, poses)
                    )
                    await self._on_durable(durable, pose_durable)
                finally:
                    self._busy = False
                    self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # reported to the stream, which ends the RPC with a status
            self.error = e
            self._changed.set()
            self._on_error(e)
