"""Monotonic totals behind the Prometheus counters, on SQLite and PostgreSQL alike.

Prometheus reads a counter that goes down as a process restart, so ``rate()``
turns a deleted session into a spike. The counters used to be read only from
live rows (takes, jobs, the outbox), and deleting an attendee's data deletes
those rows. Now each counter is what live rows count plus the ``counters``
table, which is fed two ways, both inside the transaction that does the work:

- ``retire_session_counts``: the session's takes and job are deleted with
  ``DELETE ... RETURNING`` and exactly what those rows counted (frames stored,
  seconds per job stage) is added to the table, so the sum never moves;
- ``add_counts``: an email's outcome is counted when it is recorded, because
  ``FrontDesk.delete`` removes the outbox rows outside the repository.

``counter_values`` reads the live rows and the table in one statement, so a
scrape that races a deletion sees either side of it, never the rows counted in
both places or in neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from sqlalchemy import JSON, Connection, Float, String, cast, literal, null, select, union_all

from cloud_trainer.repository.db import dialect_insert
from cloud_trainer.repository.schema import counters, jobs, takes

FRAMES_INGESTED = "frames_ingested"  # label: camera id
FRAMES_LOST = "frames_lost"  # label: camera id; corrupt at capture, stored as empty records
JOB_STAGE_SECONDS = "job_stage_seconds"  # label: stage
JOB_STAGE_RUNS = "job_stage_runs"  # label: stage
EMAILS = "emails"  # label: final outbox state (sent | failed | bounced)

_STAGES_DOC = "job_stages"  # a row of counter_values' union carrying a job's stage_seconds


def add_counts(conn: Connection, amounts: Iterable[tuple[str, str, float]]) -> None:
    """Add ``(name, label, amount)`` to the stored totals, inside the caller's transaction."""
    summed: Counter[tuple[str, str]] = Counter()
    for name, label, amount in amounts:
        summed[(name, label)] += amount
    # One row per key: PostgreSQL refuses an upsert that touches a row twice.
    rows = [{"name": n, "label": lbl, "value": float(v)} for (n, lbl), v in summed.items() if v]
    if not rows:
        return
    stmt = dialect_insert(conn, counters)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["name", "label"],
            set_={"value": counters.c.value + stmt.excluded.value},
        ),
        rows,
    )


def retire_session_counts(conn: Connection, session_id: str) -> None:
    """Delete the session's takes and job, keeping what they counted in ``counters``.

    Runs in the deleting transaction, before the session row goes (whose cascade
    would otherwise remove these rows uncounted). ``RETURNING`` hands back exactly
    the rows deleted, so a shard committed just before is counted and none twice.
    """
    amounts: list[tuple[str, str, float]] = []
    for camera_id, durable_seq in conn.execute(
        takes.delete()
        .where(takes.c.session_id == session_id)
        .returning(takes.c.camera_id, takes.c.durable_seq)
    ):
        amounts.append((FRAMES_INGESTED, camera_id, durable_seq + 1))
    for (stage_seconds,) in conn.execute(
        jobs.delete().where(jobs.c.session_id == session_id).returning(jobs.c.stage_seconds)
    ):
        amounts.extend(_stage_amounts(stage_seconds))
    add_counts(conn, amounts)


def _stage_amounts(stage_seconds: dict[str, Any] | None) -> list[tuple[str, str, float]]:
    """One job's contribution: its seconds per stage, and one run of each stage."""
    out: list[tuple[str, str, float]] = []
    for stage, seconds in (stage_seconds or {}).items():
        out += [(JOB_STAGE_SECONDS, stage, float(seconds)), (JOB_STAGE_RUNS, stage, 1.0)]
    return out


class CountersRepo:
    engine: Any

    def counter_values(self) -> dict[str, dict[str, float]]:
        """Every counter by label: live takes and jobs plus the stored totals.

        One ``UNION ALL`` statement reads one snapshot on both backends (a deletion
        moves counts from the live rows to the table in one transaction).
        """
        json_null = cast(null(), JSON)
        text_null = cast(null(), String)
        float_null = cast(null(), Float)
        query = union_all(
            select(
                literal(FRAMES_INGESTED).label("name"),
                takes.c.camera_id.label("label"),
                cast(takes.c.durable_seq + 1, Float).label("value"),
                json_null.label("doc"),
            ),
            select(literal(_STAGES_DOC), text_null, float_null, jobs.c.stage_seconds),
            select(counters.c.name, counters.c.label, counters.c.value, json_null),
        )
        totals: Counter[tuple[str, str]] = Counter()
        with self.engine.connect() as conn:
            for name, label, value, doc in conn.execute(query):
                if name == _STAGES_DOC:
                    for stage_name, stage, amount in _stage_amounts(doc):
                        totals[(stage_name, stage)] += amount
                else:
                    totals[(name, label)] += value
        out: dict[str, dict[str, float]] = {}
        for (name, label), value in totals.items():
            out.setdefault(name, {})[label] = value
        return out
