"""The ingest and control server: ``serve(settings)`` builds it, ``booth ingest`` runs it.

One bidirectional Ingest stream per camera per session. The first message is a
``Hello``; the answer says where to resume (the highest contiguous durable seq).
Frames must then arrive contiguously: a frame that leaves a gap is refused with
``OUT_OF_RANGE`` (the agent reconnects and resumes from the hello) rather than
buffered, because the agent's spool already holds everything and a server-side
reorder buffer would only hide agent bugs. A frame at or below what the stream
already holds is a resend: it is skipped (never stored twice), unless its bytes
differ from the stored ones, which is refused with ``ALREADY_EXISTS``.

Durability: frames go to ``ShardWriter``, which writes shards and index rows;
each durable advance is acked. When ``EndOfTake`` arrived and frames
``0..frame_count-1`` are durable, the take is marked uploaded; when every camera
of the session is uploaded, the session moves to ``uploaded`` and
``on_session_uploaded(session_id)`` runs (the job queue hooks in there).

Not handled: two ingest *processes* receiving the same ``(session, camera)`` at
once. Within one process a new hello supersedes the older stream of that camera.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from cloud_trainer.config import refuse_placeholders
from cloud_trainer.ingest.auth import (
    BearerTokenInterceptor,
    TokenBook,
    check_caller,
    server_credentials,
)
from cloud_trainer.ingest.control import AgentRegistry, ControlService
from cloud_trainer.ingest.errors import (
    Conflict,
    ErrorStatusInterceptor,
    NotAccepting,
    OutOfOrder,
    PermissionDenied,
    SessionDeleted,
    StorageUnavailable,
    Superseded,
    TakeNotWanted,
)
from cloud_trainer.ingest.shards import FrameIn, PoseIn, ShardWriter, encode_shard
from cloud_trainer.repository.sessions import SessionNotFound
from cloud_trainer.session import InvalidTransition, State
from edge_agent.errors import BadInput, BoothError
from edge_agent.frames import JPEG_SOI, jpeg_looks_complete
from edge_agent.skeleton import JOINTS
from protos import booth_pb2, booth_pb2_grpc

log = logging.getLogger(__name__)


def _store_refusals() -> tuple[type[BaseException], ...]:
    """What a blob store raises when it refuses a write (not a bug, not a local disk)."""
    try:
        from google.api_core.exceptions import GoogleAPIError
    except ModuleNotFoundError:  # the local store only
        return (BoothError,)
    return (BoothError, GoogleAPIError)


_STORE_REFUSALS = _store_refusals()

MAX_FPS = 1000.0
MAX_SEQ = 2**31 - 1  # the index stores seq in a 32-bit column: ~200 days at 120 fps
MAX_POSE_LEAD = 1 << 16  # how far a pose's seq may run ahead of the frames (9 min at 120 fps)
ACK_WRITE_TIMEOUT_S = 10.0
SessionHook = Callable[[str], Awaitable[None] | None]
_ACCEPTING = {State.CREATED.value, State.CAPTURING.value}


def check_jpeg(seq: int, data: bytes) -> None:
    """A JPEG starts with SOI (FFD8) and ends with EOI (FFD9): the agent's rule, with reasons."""
    if len(data) < 4 or not data.startswith(JPEG_SOI):
        head = data[:4].hex() or "empty"
        raise BadInput(f"frame {seq} is not a JPEG: no SOI marker (starts with {head})")
    if not jpeg_looks_complete(data):
        raise BadInput(f"frame {seq} is not a complete JPEG: no EOI marker at the end")


class IngestStream:
    """One Ingest RPC after its hello: validation, the shard writer, acks, completion."""

    def __init__(
        self,
        service: IngestService,
        context: grpc.aio.ServicerContext,
        session_id: str,
        camera_id: str,
        durable_seq: int,
        pose_durable_seq: int,
        frame_count: int | None,
    ):
        self.service, self.context = service, context
        self.session_id, self.camera_id = session_id, camera_id
        self.durable_seq = durable_seq
        self.pose_durable_seq = pose_durable_seq
        self.next_seq = durable_seq + 1
        self.last_pose_seq = pose_durable_seq
        self.frame_count = frame_count
        self.complete = False
        self._pending: dict[int, bytes] = {}  # received, not yet durable: for resend checks
        self._stored_digests: dict[int, str] = {}
        self._lost_logged = False
        self.superseded = False  # a newer stream of this camera took over
        self.finishing = False  # the RPC is ending: nothing may cancel it any more
        self._write_lock = asyncio.Lock()
        self._complete_lock = asyncio.Lock()
        self._task = asyncio.current_task()
        cfg = service.settings.ingest
        self.writer = ShardWriter(
            write=self._write_batch,
            shard_bytes=max(1, int(cfg.shard_mb * 1024 * 1024)),
            flush_interval_s=cfg.flush_interval_s,
            on_durable=self._on_durable,
            on_error=self._on_writer_error,
        )

    # ---- requests -----------------------------------------------------------------------

    async def handle(self, req: booth_pb2.IngestRequest) -> None:
        kind = req.WhichOneof("body")
        if kind == "frame":
            await self._frame(req.frame)
        elif kind == "pose":
            await self._pose(req.pose)
        elif kind == "end":
            await self._end(req.end)
        elif kind == "hello":
            raise BadInput("a stream carries one hello, as its first message")
        else:
            raise BadInput("empty IngestRequest (no frame, pose or end)")

    def _check_ids(self, what: str, seq: int, session_id: str, camera_id: str) -> None:
        # Empty ids mean "the stream's own"; anything else must match the hello.
        if (session_id and session_id != self.session_id) or (
            camera_id and camera_id != self.camera_id
        ):
            raise BadInput(
                f"{what} {seq} is for {session_id or '-'}/{camera_id or '-'} but this stream is "
                f"{self.session_id}/{self.camera_id}"
            )

    async def _frame(self, f: booth_pb2.Frame) -> None:
        seq = f.seq
        self._check_ids("frame", seq, f.session_id, f.camera_id)
        if seq > MAX_SEQ:
            raise BadInput(f"frame seq {seq} is out of range (max {MAX_SEQ})")
        if self.frame_count is not None and seq >= self.frame_count:
            raise BadInput(f"frame {seq} is past the end of the take ({self.frame_count} frames)")
        jpeg = f.jpeg  # each access copies the bytes out of the message
        if seq < self.next_seq:
            await self._resent(seq, jpeg)
            return
        if seq > self.next_seq:
            raise OutOfOrder(
                f"frame {seq} arrived but {self.next_seq} was expected next; frames must be "
                f"contiguous: reconnect and resume after seq {self.durable_seq}"
            )
        if f.lost:
            # The camera delivered no usable image for this seq; the seq is kept (as an
            # empty record) so the take stays contiguous and can complete.
            if jpeg:
                raise BadInput(f"frame {seq} is marked lost but carries {len(jpeg)} bytes")
            self.service.lost_frames += 1
            log.log(
                logging.WARNING if not self._lost_logged else logging.DEBUG,
                "camera %s, session %s: frame %d arrived marked lost (corrupt at capture)",
                self.camera_id,
                self.session_id,
                seq,
            )
            self._lost_logged = True
        else:
            check_jpeg(seq, jpeg)
        if self.writer.full:
            await self.writer.room()
        self.writer.add_frame(FrameIn(seq, f.capture_ts_ns, jpeg))
        self._pending[seq] = jpeg
        self.next_seq = seq + 1

    async def _resent(self, seq: int, data: bytes) -> None:
        """A frame the stream already has: skip it if identical, refuse it if not."""
        if seq in self._pending:
            same = self._pending[seq] == data
        else:
            if seq not in self._stored_digests:
                # One query for the whole run of resends, not one per frame.
                self._stored_digests = await asyncio.to_thread(
                    self.service.repo.frame_digests,
                    self.session_id,
                    self.camera_id,
                    seq,
                    self.durable_seq + 1,
                )
            stored = self._stored_digests.get(seq)
            same = stored is None or stored == hashlib.sha256(data).hexdigest()
        if not same:
            raise Conflict(
                f"frame {seq} of {self.session_id}/{self.camera_id} is already stored with "
                "different content (was the take captured twice?)"
            )
        self.service.resent_frames += 1
        log.debug("skipped resent frame %s/%s/%d", self.session_id, self.camera_id, seq)

    async def _pose(self, p: booth_pb2.Pose) -> None:
        self._check_ids("pose", p.seq, p.session_id, p.camera_id)
        if p.seq > MAX_SEQ:
            raise BadInput(f"pose seq {p.seq} is out of range (max {MAX_SEQ})")
        # A pose belongs to a frame of the take: one past its end, or far ahead of the
        # frames, would only fill the database (and a huge seq would hide every real pose
        # after it as a resend).
        if self.frame_count is not None and p.seq >= self.frame_count:
            raise BadInput(f"pose {p.seq} is past the end of the take ({self.frame_count} frames)")
        if p.seq > self.next_seq + MAX_POSE_LEAD:
            raise BadInput(
                f"pose {p.seq} is for a frame far ahead of the frames sent (next is "
                f"{self.next_seq}); poses follow their frames"
            )
        n = len(p.skeleton.keypoints)
        if n != len(JOINTS):
            raise BadInput(f"pose {p.seq} has {n} keypoints; the skeleton has {len(JOINTS)}")
        if p.seq <= self.last_pose_seq:
            return  # a resend: poses arrive in seq order, so this one is stored or buffered
        kp = np.array([(k.x, k.y, k.score) for k in p.skeleton.keypoints], dtype="<f4")
        if not np.isfinite(kp).all() or not ((kp[:, 2] >= 0) & (kp[:, 2] <= 1)).all():
            raise BadInput(
                f"pose {p.seq} has a keypoint that is not finite or a score outside 0..1"
            )
        if self.writer.full:
            await self.writer.room()  # as frames do: memory stays near two shards
        self.writer.add_pose(PoseIn(p.seq, kp.tobytes(), p.imputed, p.glitch))
        self.last_pose_seq = p.seq

    async def _end(self, e: booth_pb2.EndOfTake) -> None:
        self._check_ids("end of take", e.frame_count, e.session_id, e.camera_id)
        if e.frame_count > MAX_SEQ:
            raise BadInput(f"frame_count {e.frame_count} is out of range")
        if e.frame_count < self.next_seq:
            raise BadInput(
                f"end of take says {e.frame_count} frames but frame {self.next_seq - 1} arrived"
            )
        if self.frame_count is not None and self.frame_count != e.frame_count:
            raise BadInput(
                f"end of take says {e.frame_count} frames; it said {self.frame_count} before"
            )
        # Everything the agent sent before the end (the last frames' poses trail them) is
        # durable before the end is recorded: a take whose frame count is known completes
        # as soon as its last frame is durable, on this stream or after a reconnect.
        await self.writer.flush()
        if self.frame_count is None:
            await asyncio.to_thread(
                self.service.repo.end_take, self.session_id, self.camera_id, e.frame_count
            )
            self.frame_count = e.frame_count
        await self._maybe_complete()
        await self._send_ack()  # take_complete says whether frames are still missing

    # ---- durability ---------------------------------------------------------------------

    def _write_batch(self, frames: list[FrameIn], poses: list[PoseIn]) -> tuple[int, int]:
        """Runs in a worker thread: put the shard, then index it (one transaction)."""
        durable = self.durable_seq
        frame_rows: list[dict[str, Any]] = []
        if frames:
            key, data, frame_rows = encode_shard(self.session_id, self.camera_id, frames)
            try:
                self.service.store.put(key, data, "application/octet-stream")
            except _STORE_REFUSALS as e:
                # A store's own refusal (GCS: access denied, quota, a 5xx): the agent keeps
                # the frames and retries, and its status says why in one line. A local
                # disk's OSError is mapped as it is (UNAVAILABLE, with its strerror).
                detail = " ".join(str(e).split())[:300] or type(e).__name__
                raise StorageUnavailable(
                    f"the blob store did not take shard {key}: {detail}"
                ) from e
            durable = frames[-1].seq
        pose_durable = poses[-1].seq if poses else self.pose_durable_seq
        pose_rows = [
            {"seq": p.seq, "keypoints": p.keypoints, "imputed": p.imputed, "glitch": p.glitch}
            for p in poses
        ]
        try:
            self.service.repo.commit_shard(
                self.session_id,
                self.camera_id,
                frame_rows,
                pose_rows,
                durable_seq=durable,
                pose_durable_seq=pose_durable,
            )
        except Exception:
            if not self.service.repo.session_deleted(self.session_id):
                raise  # the unindexed shard goes once the take completes
            # Deleted between the put and the index: the delete's own blob passes have
            # run, and no later clean-up looks at a session that is gone. This shard
            # is the attendee's data too.
            if frames:
                try:
                    self.service.store.delete(key)
                except (*_STORE_REFUSALS, OSError) as e:
                    log.error("shard %s of a deleted session could not be removed: %s", key, e)
            raise SessionDeleted.of(self.session_id) from None
        return durable, pose_durable

    async def _on_durable(self, durable_seq: int, pose_durable_seq: int) -> None:
        for seq in range(self.durable_seq + 1, durable_seq + 1):
            self._pending.pop(seq, None)
        self.durable_seq = max(self.durable_seq, durable_seq)
        self.pose_durable_seq = max(self.pose_durable_seq, pose_durable_seq)
        await self._maybe_complete()
        await self._send_ack()

    def _on_writer_error(self, exc: BaseException) -> None:
        # The reader may be parked in a read; wake it so the RPC ends with the writer's status.
        self._interrupt()

    def supersede(self) -> None:
        """A newer stream of this camera took over: end this RPC with ABORTED, saying so."""
        self.superseded = True
        self._interrupt()

    def _interrupt(self) -> None:
        # Only while the RPC still reads: once it is ending (a refusal on its way to the
        # agent, or the close), a cancel would swallow its status and its clean-up.
        if not self.finishing and self._task is not None and not self._task.done():
            self._task.cancel()

    def interrupted_by(self) -> BaseException | None:
        """Why this stream's RPC task was cancelled by the server itself (None: the agent left)."""
        if self.writer.error is not None:
            return self.writer.error
        if self.superseded:
            return Superseded(
                f"a newer stream of camera {self.camera_id} for session {self.session_id} took "
                "over; this one ends"
            )
        return None

    async def _send_ack(self) -> None:
        ack = booth_pb2.Ack(
            session_id=self.session_id,
            camera_id=self.camera_id,
            durable_seq=self.durable_seq,
            pose_durable_seq=self.pose_durable_seq,
            take_complete=self.complete,
        )
        async with self._write_lock:
            try:
                # Bounded: an agent that stopped reading must not stall the shard writer.
                write = asyncio.ensure_future(self.context.write(booth_pb2.IngestResponse(ack=ack)))
                done, _ = await asyncio.wait({write}, timeout=ACK_WRITE_TIMEOUT_S)
                if not done:
                    write.cancel()
                    raise TimeoutError("the agent does not read its acks")
                write.result()
            except (
                grpc.aio.AioRpcError,
                asyncio.InvalidStateError,
                RuntimeError,
                TimeoutError,
            ) as e:
                # The agent went away; it will hello again and learn the position then.
                log.debug("ack for %s/%s not delivered: %s", self.session_id, self.camera_id, e)

    async def _maybe_complete(self) -> None:
        async with self._complete_lock:
            if self.complete or self.frame_count is None:
                return
            if self.durable_seq < self.frame_count - 1:
                return
            await self.service.take_uploaded(self.session_id, self.camera_id)
            self.complete = True
        log.info(
            "take uploaded: session %s camera %s (%d frames)",
            self.session_id,
            self.camera_id,
            self.frame_count,
        )

    async def close(self) -> None:
        await self.writer.close()


class IngestService(booth_pb2_grpc.IngestServicer):
    def __init__(
        self,
        settings: Any,  # BoothConfig
        store: Any,
        repo: Any,
        tokens: TokenBook,
        on_session_uploaded: SessionHook | None = None,
    ):
        self.settings, self.store, self.repo, self.tokens = settings, store, repo, tokens
        self.on_session_uploaded = on_session_uploaded
        self.resent_frames = 0
        self.lost_frames = 0  # frames the cameras delivered corrupt, stored as empty records
        self._active: dict[tuple[str, str], IngestStream] = {}
        # Held while a camera's hello takes over; weak, so a lock goes with its last user.
        self._opening: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    async def Stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = None
        async for req in request_iterator:
            first = req
            break
        if first is None:
            return
        if first.WhichOneof("body") != "hello":
            raise BadInput("the first message on an ingest stream must be a hello")
        stream = await self._open(first.hello, context)
        try:
            async for req in request_iterator:
                await stream.handle(req)
            # The agent closed its side without ending the take: keep what arrived.
            await stream.writer.flush()
        except asyncio.CancelledError:
            # Cancelled by the server (a failed write, a newer stream): end with that
            # status. Else the agent went away (or the server is stopping).
            if (why := stream.interrupted_by()) is not None:
                raise why from None
            log.info(
                "camera %s, session %s: the stream ended without a goodbye (durable up to "
                "seq %d; the agent resends the rest)",
                stream.camera_id,
                stream.session_id,
                stream.durable_seq,
            )
            raise
        finally:
            stream.finishing = True
            await stream.close()

    async def _open(
        self, hello: booth_pb2.Hello, context: grpc.aio.ServicerContext
    ) -> IngestStream:
        sid, cam = hello.session_id, hello.camera_id
        if not sid or not cam:
            raise BadInput("hello needs a session_id and a camera_id")
        # 0 means "not said"; anything else must be a rate a camera can have (the
        # trainer's time split and the render both run on it).
        if hello.fps and not (math.isfinite(hello.fps) and 0 < hello.fps <= MAX_FPS):
            raise BadInput(f"hello fps {hello.fps!r} is not a frame rate (0 < fps <= {MAX_FPS})")
        check_caller(hello.booth_id, cam)
        found = await asyncio.to_thread(self.repo.session_booth_and_cameras, sid)
        if found is None:
            if await asyncio.to_thread(self.repo.session_deleted, sid):
                raise SessionDeleted.of(sid)
            raise SessionNotFound(f"unknown session {sid!r}; sessions are created by the booth API")
        booth_id, state, cameras = found
        if booth_id != hello.booth_id:
            raise PermissionDenied(
                f"session {sid} belongs to booth {booth_id!r}, not {hello.booth_id!r}"
            )
        if cameras and cam not in cameras:
            raise TakeNotWanted(
                f"camera {cam!r} is not part of session {sid} (cameras: {', '.join(cameras)})"
            )
        # One hello of a camera at a time, from the older stream's end to the newer one's
        # start: the position read below must include every write the older one made.
        lock = self._opening.get((sid, cam))
        if lock is None:
            lock = self._opening[(sid, cam)] = asyncio.Lock()
        async with lock:
            return await self._take_over(hello, context, state)

    async def _take_over(
        self, hello: booth_pb2.Hello, context: grpc.aio.ServicerContext, state: str
    ) -> IngestStream:
        sid, cam = hello.session_id, hello.camera_id
        old = self._active.get((sid, cam))
        if old is not None:
            # Also when it is already ending: its last shard may still be being written.
            log.info("camera %s reconnected to session %s; the older stream ends", cam, sid)
            old.supersede()
            await old.close()
        pos = await asyncio.to_thread(self.repo.take_position, sid, cam)
        if state not in _ACCEPTING and pos.state != "uploaded":
            # Before open_take: a refused camera must not leave a take row behind, which
            # the worker would then count as a camera that uploaded nothing.
            raise NotAccepting(f"session {sid} is {state}; it no longer accepts frames")
        await asyncio.to_thread(
            self.repo.open_take, sid, cam, width=hello.width, height=hello.height, fps=hello.fps
        )
        if state == State.CREATED.value:
            await self._start_capturing(sid)
        await context.write(
            booth_pb2.IngestResponse(
                hello_ack=booth_pb2.HelloAck(
                    resume_after_seq=pos.durable_seq, pose_resume_after_seq=pos.pose_durable_seq
                )
            )
        )
        # Only now (the agent is there to hear about it) does the stream get a shard writer.
        stream = IngestStream(
            self, context, sid, cam, pos.durable_seq, pos.pose_durable_seq, pos.frame_count
        )
        self._register(stream)
        log.info("camera %s streaming session %s, resuming after seq %d", cam, sid, pos.durable_seq)
        return stream

    def _register(self, stream: IngestStream) -> None:
        """Active until its shard writer is done (not merely until its RPC ends)."""
        key = (stream.session_id, stream.camera_id)
        self._active[key] = stream

        def forget(_task: asyncio.Task) -> None:
            if self._active.get(key) is stream:
                del self._active[key]

        stream.writer.when_done(forget)

    def _remove_orphan_shards(self, session_id: str, camera_id: str) -> None:
        """Delete the take's shards no index row points at, now that no more can come.

        A server killed between a shard's put and its index commit leaves that shard
        behind; the agent resends those frames and they land in a shard of their own.
        """
        prefix = f"sessions/{session_id}/frames/{camera_id}/"
        try:
            keep = self.repo.shard_keys(session_id, camera_id)
            orphans = [k for k in self.store.list(prefix) if k not in keep]
            for key in orphans:
                self.store.delete(key)
        except Exception as e:  # tidying only: the take itself is complete
            log.warning("could not tidy the shards of %s/%s: %s", session_id, camera_id, e)
            return
        if orphans:
            log.info(
                "removed %d shard(s) of %s/%s that a crash left unindexed",
                len(orphans),
                session_id,
                camera_id,
            )

    async def _start_capturing(self, session_id: str) -> None:
        # Another camera (or the API) may have moved it first.
        with contextlib.suppress(InvalidTransition):
            await asyncio.to_thread(self.repo.transition, session_id, State.CAPTURING)

    async def take_uploaded(self, session_id: str, camera_id: str) -> None:
        if await asyncio.to_thread(self.repo.mark_take_uploaded, session_id, camera_id):
            await asyncio.to_thread(self._remove_orphan_shards, session_id, camera_id)
        found = await asyncio.to_thread(self.repo.session_booth_and_cameras, session_id)
        if found is None:
            return  # deleted meanwhile
        _booth, state, cameras = found
        expected = set(cameras or self.tokens.cameras)
        uploaded = await asyncio.to_thread(self.repo.uploaded_cameras, session_id)
        if not expected <= uploaded or state != State.CAPTURING.value:
            return
        try:
            await asyncio.to_thread(self.repo.transition, session_id, State.UPLOADED)
        except InvalidTransition:
            return  # a racing camera won; it runs the hook
        log.info("session %s uploaded (cameras: %s)", session_id, ", ".join(sorted(expected)))
        if self.on_session_uploaded is not None:
            try:
                result = self.on_session_uploaded(session_id)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as e:
                # The take is in and stays acked: the agent has nothing to resend. The
                # pending-job sweep queues the session's job (see dispatch).
                log.warning(
                    "session %s is uploaded, but queueing its training failed (%s: %s); "
                    "the pending-job sweep queues it",
                    session_id,
                    type(e).__name__,
                    e,
                )


class IngestServer:
    """The running gRPC server with its Ingest and Control services."""

    def __init__(
        self, server: grpc.aio.Server, port: int, ingest: IngestService, registry: AgentRegistry
    ):
        self.server, self.port, self.ingest, self.registry = server, port, ingest, registry

    async def start(self) -> None:
        await self.server.start()
        self.registry.bind_loop(asyncio.get_running_loop())

    async def stop(self, grace_s: float | None = 1.0) -> None:
        await self.server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def serve(
    settings: Any,  # BoothConfig
    *,
    store: Any = None,
    repo: Any = None,
    registry: AgentRegistry | None = None,
    on_session_uploaded: SessionHook | None = None,
    port: int | None = None,
) -> IngestServer:
    """Build (not start) the ingest + control server from the booth config.

    ``store``/``repo`` default to the ones the config names; ``port`` overrides
    ``ingest.port`` (0 picks a free one; ``IngestServer.port`` tells which).
    """
    cfg = settings.ingest
    # An agent that kept "changethis" must not get in; nor anyone with the database's.
    refuse_placeholders(settings, ("ingest", "database"))
    if store is None:
        from cloud_trainer.storage import create_blob_store

        store = create_blob_store(settings.storage)
    if repo is None:
        from cloud_trainer.repository import Repository

        repo = Repository.from_config(settings.database)
    if not cfg.agents:
        log.warning("ingest.agents is empty: every agent will be refused (UNAUTHENTICATED)")
    tokens = TokenBook(settings.booth.id, cfg.agents)
    registry = registry or AgentRegistry(repo=repo)
    max_bytes = cfg.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=[ErrorStatusInterceptor(), BearerTokenInterceptor(tokens)],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # Agents ping to notice a dead Wi-Fi link; allow it, and ping idle agents too.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    ingest = IngestService(settings, store, repo, tokens, on_session_uploaded)
    booth_pb2_grpc.add_IngestServicer_to_server(ingest, server)
    booth_pb2_grpc.add_ControlServicer_to_server(ControlService(registry), server)
    address = f"{cfg.host}:{cfg.port if port is None else port}"
    try:
        if cfg.tls is not None:
            bound = server.add_secure_port(address, server_credentials(cfg.tls))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise BadInput(f"ingest cannot listen on {address}: {e}") from None
    if not bound:
        raise BadInput(f"ingest cannot listen on {address}")
    return IngestServer(server, bound, ingest, registry)
