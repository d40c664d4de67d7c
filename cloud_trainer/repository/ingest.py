"""Takes, the frame index, poses and agents: what ingest and control write.

Frames themselves live in shard objects in the blob store; the ``frames`` table
says where each ``(session, camera, seq)`` is. A shard's rows go in with one
multi-row INSERT that ignores rows already present, so a resent shard never
stores a frame twice, and the rows of a shard commit in the same transaction as
the take's new durable position.

That INSERT is the ingest hot path (one row per frame, hundreds of frames a
second per camera), so it goes to the driver's ``executemany`` as plain tuples:
SQLAlchemy's per-row parameter processing cost several times the database's
own work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, select, update

from cloud_trainer.repository.counters import FRAMES_LOST, add_counts
from cloud_trainer.repository.db import dialect_insert
from cloud_trainer.repository.schema import agents, frames, poses, sessions, takes


@dataclass(frozen=True, slots=True)
class TakePosition:
    """Where a camera's upload stands; ``-1`` means nothing stored yet."""

    durable_seq: int
    pose_durable_seq: int
    frame_count: int | None
    state: str | None  # None: no take row yet


_FRAME_COLUMNS = ("seq", "capture_ts_ns", "shard_key", "offset", "length", "sha256")
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def _insert_frames_sql(paramstyle: str) -> str | None:
    """The driver-level INSERT for frame rows (None: a paramstyle we do not spell)."""
    mark = _PLACEHOLDERS.get(paramstyle)
    if mark is None:
        return None
    columns = ("session_id", "camera_id", *_FRAME_COLUMNS)
    # "offset" is an SQL keyword: quoted, as both SQLite and PostgreSQL allow.
    names = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join([mark] * len(columns))
    return (
        f"INSERT INTO frames ({names}) VALUES ({marks}) "
        "ON CONFLICT (session_id, camera_id, seq) DO NOTHING"
    )


class IngestRepo:
    engine: Any

    # ---- takes -------------------------------------------------------------------

    def open_take(
        self,
        session_id: str,
        camera_id: str,
        *,
        width: int | None = None,
        height: int | None = None,
        fps: float | None = None,
    ) -> None:
        """Create the take row if this is the camera's first hello; keep it otherwise."""
        now = time.time()
        stmt = dialect_insert(self.engine, takes).values(
            session_id=session_id,
            camera_id=camera_id,
            state="capturing",
            width=width or None,
            height=height or None,
            fps=fps or None,
            durable_seq=-1,
            pose_durable_seq=-1,
            updated_at=now,
        )
        with self.engine.begin() as conn:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=["session_id", "camera_id"]))

    def take_position(self, session_id: str, camera_id: str) -> TakePosition:
        """The highest contiguous stored seq (from the index itself, not a cached counter)."""
        where = and_(frames.c.session_id == session_id, frames.c.camera_id == camera_id)
        with self.engine.connect() as conn:
            n, lo, hi = conn.execute(
                select(func.count(), func.min(frames.c.seq), func.max(frames.c.seq)).where(where)
            ).one()
            if not n or lo != 0:
                durable = -1
            elif n == hi + 1:
                durable = hi
            else:
                # A hole: the contiguous run ends at the first seq whose successor is missing.
                nxt = frames.alias("nxt")
                durable = conn.execute(
                    select(func.min(frames.c.seq)).where(
                        where,
                        ~exists().where(
                            nxt.c.session_id == frames.c.session_id,
                            nxt.c.camera_id == frames.c.camera_id,
                            nxt.c.seq == frames.c.seq + 1,
                        ),
                    )
                ).scalar_one()
            pose_hi = conn.execute(
                select(func.max(poses.c.seq)).where(
                    poses.c.session_id == session_id, poses.c.camera_id == camera_id
                )
            ).scalar_one()
            take = conn.execute(
                select(takes.c.state, takes.c.frame_count).where(
                    takes.c.session_id == session_id, takes.c.camera_id == camera_id
                )
            ).first()
        return TakePosition(
            durable_seq=int(durable),
            pose_durable_seq=-1 if pose_hi is None else int(pose_hi),
            frame_count=None if take is None else take.frame_count,
            state=None if take is None else take.state,
        )

    def commit_shard(
        self,
        session_id: str,
        camera_id: str,
        frame_rows: list[dict[str, Any]],
        pose_rows: list[dict[str, Any]],
        *,
        durable_seq: int,
        pose_durable_seq: int,
    ) -> None:
        """Index one shard's frames and a batch of poses in one transaction.

        Rows need ``seq, capture_ts_ns, shard_key, offset, length, sha256`` (frames) or
        ``seq, keypoints, imputed, glitch`` (poses). Rows already present are left alone.
        """
        keys = {"session_id": session_id, "camera_id": camera_id}
        lost = sum(1 for r in frame_rows if r["length"] == 0)
        with self.engine.begin() as conn:
            if frame_rows:
                self._insert_frame_rows(conn, session_id, camera_id, frame_rows)
            if lost:  # counted once: a shard's frames are new (resends never reach a shard)
                add_counts(conn, [(FRAMES_LOST, camera_id, lost)])
            if pose_rows:
                conn.execute(
                    dialect_insert(self.engine, poses).on_conflict_do_nothing(
                        index_elements=["session_id", "camera_id", "seq"]
                    ),
                    [{**keys, **r} for r in pose_rows],
                )
            conn.execute(
                update(takes)
                .where(takes.c.session_id == session_id, takes.c.camera_id == camera_id)
                .values(
                    durable_seq=self._greatest(takes.c.durable_seq, durable_seq),
                    pose_durable_seq=self._greatest(takes.c.pose_durable_seq, pose_durable_seq),
                    updated_at=time.time(),
                )
            )

    def _insert_frame_rows(
        self, conn: Any, session_id: str, camera_id: str, rows: list[dict[str, Any]]
    ) -> None:
        sql = _insert_frames_sql(self.engine.dialect.paramstyle)
        if sql is None:
            keys = {"session_id": session_id, "camera_id": camera_id}
            stmt = dialect_insert(self.engine, frames).on_conflict_do_nothing(
                index_elements=["session_id", "camera_id", "seq"]
            )
            conn.execute(stmt, [{**keys, **r} for r in rows])
            return
        conn.exec_driver_sql(
            sql,
            [
                (
                    session_id,
                    camera_id,
                    r["seq"],
                    r["capture_ts_ns"],
                    r["shard_key"],
                    r["offset"],
                    r["length"],
                    r["sha256"],
                )
                for r in rows
            ],
        )

    def _greatest(self, column: Any, value: int) -> Any:
        # SQLite's two-argument max() is PostgreSQL's greatest().
        if self.engine.dialect.name == "postgresql":
            return func.greatest(column, value)
        return func.max(column, value)

    def end_take(self, session_id: str, camera_id: str, frame_count: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(takes)
                .where(takes.c.session_id == session_id, takes.c.camera_id == camera_id)
                .values(frame_count=frame_count, updated_at=time.time())
            )

    def mark_take_uploaded(self, session_id: str, camera_id: str) -> bool:
        """Mark the take uploaded; True if this call changed it (False if it already was)."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(takes)
                .where(
                    takes.c.session_id == session_id,
                    takes.c.camera_id == camera_id,
                    takes.c.state != "uploaded",
                )
                .values(state="uploaded", updated_at=time.time())
            ).rowcount
        return bool(n)

    def list_takes(self, session_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(takes).where(takes.c.session_id == session_id).order_by(takes.c.camera_id)
            )
            return [dict(r._mapping) for r in rows]

    def uploaded_cameras(self, session_id: str) -> set[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(takes.c.camera_id).where(
                    takes.c.session_id == session_id, takes.c.state == "uploaded"
                )
            )
            return {r.camera_id for r in rows}

    # ---- the frame index -------------------------------------------------------------

    def frame_index(
        self, session_id: str, camera_id: str, start: int = 0, stop: int | None = None
    ) -> list[dict[str, Any]]:
        """Index rows (seq, capture_ts_ns, shard_key, offset, length, sha256) in seq order."""
        q = select(
            frames.c.seq,
            frames.c.capture_ts_ns,
            frames.c.shard_key,
            frames.c.offset,
            frames.c.length,
            frames.c.sha256,
        ).where(
            frames.c.session_id == session_id,
            frames.c.camera_id == camera_id,
            frames.c.seq >= start,
        )
        if stop is not None:
            q = q.where(frames.c.seq < stop)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(frames.c.seq))]

    def shard_keys(self, session_id: str, camera_id: str) -> set[str]:
        """The shards the index points at for one take."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(frames.c.shard_key)
                .where(frames.c.session_id == session_id, frames.c.camera_id == camera_id)
                .distinct()
            )
            return {r.shard_key for r in rows}

    def frame_digests(
        self, session_id: str, camera_id: str, start: int, stop: int
    ) -> dict[int, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(frames.c.seq, frames.c.sha256).where(
                    frames.c.session_id == session_id,
                    frames.c.camera_id == camera_id,
                    frames.c.seq >= start,
                    frames.c.seq < stop,
                )
            )
            return {r.seq: r.sha256 for r in rows}

    def pose_rows(self, session_id: str, camera_id: str) -> list[dict[str, Any]]:
        """Stored poses in seq order; ``keypoints`` is float32 (23, 3) little-endian bytes."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(poses.c.seq, poses.c.keypoints, poses.c.imputed, poses.c.glitch)
                .where(poses.c.session_id == session_id, poses.c.camera_id == camera_id)
                .order_by(poses.c.seq)
            )
            return [dict(r._mapping) for r in rows]

    def session_booth_and_cameras(self, session_id: str) -> tuple[str, str, list[str]] | None:
        """(booth_id, state, cameras) of a session, or None if there is no such session."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(sessions.c.booth_id, sessions.c.state, sessions.c.cameras).where(
                    sessions.c.id == session_id
                )
            ).first()
        if row is None:
            return None
        return row.booth_id, row.state, list(row.cameras or [])

    # ---- agents -------------------------------------------------------------------------

    def upsert_agent(
        self,
        booth_id: str,
        camera_id: str,
        *,
        state: str,
        last_seen: float,
        software_version: str | None = None,
        capabilities: dict[str, Any] | None = None,
        status: dict[str, Any] | None = None,
    ) -> None:
        values: dict[str, Any] = {"state": state, "last_seen": last_seen}
        if software_version is not None:
            values["software_version"] = software_version
        if capabilities is not None:
            values["capabilities"] = capabilities
        if status is not None:
            values["status"] = status
        stmt = dialect_insert(self.engine, agents).values(
            booth_id=booth_id,
            camera_id=camera_id,
            software_version=software_version or "",
            capabilities=capabilities or {},
            status=status or {},
            state=state,
            last_seen=last_seen,
        )
        with self.engine.begin() as conn:
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["booth_id", "camera_id"], set_=values)
            )

    def list_agents(self, booth_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(agents).where(agents.c.booth_id == booth_id).order_by(agents.c.camera_id)
            )
            return [dict(r._mapping) for r in rows]
