"""Metadata tables, one definition for SQLite and PostgreSQL (SQLAlchemy Core).

Schema management: ``metadata.create_all`` at start-up (idempotent), then the columns
an older database lacks are added (see ``db._upgrade_columns``). The schema is young and
additive: a new column is nullable or has a constant default. When a change is not
additive we will introduce Alembic.
Timestamps are unix seconds (float) so both backends agree without time zones.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

booths = Table(
    "booths",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
)

agents = Table(
    "agents",
    metadata,
    Column("booth_id", String(64), primary_key=True),
    Column("camera_id", String(64), primary_key=True),
    Column("software_version", String(64), nullable=False, default=""),
    Column("capabilities", JSON, nullable=False, default=dict),
    Column("state", String(32), nullable=False, default="offline"),
    Column("status", JSON, nullable=False, default=dict),  # last AgentStatus as a dict
    Column("last_seen", Float, nullable=True),
)

attendees = Table(
    "attendees",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False),
    Column("consent", Boolean, nullable=False),
    Column("consent_at", Float, nullable=True),
    Column("created_at", Float, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("booth_id", String(64), nullable=False),
    Column(
        "attendee_id", String(32), ForeignKey("attendees.id", ondelete="CASCADE"), nullable=False
    ),
    Column("reference_name", String(120), nullable=False),
    Column("reference_version", Integer, nullable=True),
    Column("state", String(32), nullable=False),
    Column("failure_reason", Text, nullable=True),
    Column("take_s", Float, nullable=False),
    Column("cameras", JSON, nullable=False, default=list),  # camera ids expected in the take
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("capture_started_at", Float, nullable=True),
    Column("uploaded_at", Float, nullable=True),
    Column("delivered_at", Float, nullable=True),
    # Trainer/renderer progress for the tablet: {stage, step, total_steps, eta_s, loss, ...}
    Column("progress", JSON, nullable=False, default=dict),
    Column("quality", JSON, nullable=True),  # {ssim, psnr, pose_dist, ssim_nn_baseline, ...}
    Column("video_key", String(512), nullable=True),
    Column("poster_key", String(512), nullable=True),
    Column("side_by_side_key", String(512), nullable=True),
)
Index("ix_sessions_booth_created", sessions.c.booth_id, sessions.c.created_at)

session_events = Table(
    "session_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "session_id",
        String(32),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("at", Float, nullable=False),
    Column("from_state", String(32), nullable=True),
    Column("to_state", String(32), nullable=False),
    Column("detail", Text, nullable=True),
)

takes = Table(
    "takes",
    metadata,
    Column(
        "session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("camera_id", String(64), primary_key=True),
    Column("state", String(32), nullable=False, default="capturing"),  # capturing | uploaded
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("fps", Float, nullable=True),
    Column("frame_count", Integer, nullable=True),  # from EndOfTake
    Column("durable_seq", Integer, nullable=False, default=-1),
    Column("pose_durable_seq", Integer, nullable=False, default=-1),
    Column("updated_at", Float, nullable=False),
)

# Where each stored frame lives: one row per frame, written in one statement per shard.
frames = Table(
    "frames",
    metadata,
    Column(
        "session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("camera_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("capture_ts_ns", BigInteger, nullable=False),  # ns overflow 32 bits
    Column("shard_key", String(512), nullable=False),
    Column("offset", Integer, nullable=False),
    Column("length", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
)

poses = Table(
    "poses",
    metadata,
    Column(
        "session_id", String(32), ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("camera_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("keypoints", LargeBinary, nullable=False),  # float32 (23, 3) little-endian
    Column("imputed", Boolean, nullable=False, default=False),
    Column("glitch", Boolean, nullable=False, default=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column(
        "session_id",
        String(32),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("state", String(32), nullable=False),  # queued | running | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(128), nullable=True),
    Column(
        "stage", String(32), nullable=True
    ),  # loading | training | scoring | exporting | rendering
    Column("step", Integer, nullable=False, default=0),
    Column("total_steps", Integer, nullable=True),
    Column("eta_s", Float, nullable=True),
    Column("metrics", JSON, nullable=False, default=dict),  # loss history, scores
    Column("error", Text, nullable=True),
    Column("model_key", String(512), nullable=True),
    Column("created_at", Float, nullable=False),
    # Set once the job is on the queue; a job row without it is re-published at start-up.
    Column("published_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("stage_seconds", JSON, nullable=False, default=dict),  # {stage: seconds}
)

# The worker running a job says so every few seconds. A second delivery of the job (Pub/Sub
# may deliver twice; an ack deadline may lapse under a live worker) finds a fresh beat and
# leaves the job alone; a stale one means the worker died. Its own table keeps the schema
# additive (create_all adds tables, not columns).
job_beats = Table(
    "job_beats",
    metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("worker", String(128), nullable=False),
    Column("beat_at", Float, nullable=False),
)

links = Table(
    "links",
    metadata,
    # sha256 of the token: a leaked database does not leak working links.
    Column("token_sha256", String(64), primary_key=True),
    Column(
        "session_id",
        String(32),
        ForeignKey("sessions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

# What is left of a deleted session's links: only the hash and the time, so the
# attendee page can answer 410 Gone (not 404) without keeping any personal data.
link_tombstones = Table(
    "link_tombstones",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("deleted_at", Float, nullable=False),
)

# What is left of a deleted session: its id (a random token, no personal data) and
# its booth, so a board that was offline when the attendee deleted it is told
# "deleted" (and drops its copy) rather than "unknown" (and keeps retrying).
session_tombstones = Table(
    "session_tombstones",
    metadata,
    Column("session_id", String(32), primary_key=True),
    Column("booth_id", String(64), nullable=False),
    Column("deleted_at", Float, nullable=False),
)

# A failed session started again (``FrontDesk.again``) is deleted; its row here sends a
# tablet still showing it to the session that replaced it. No attendee data: two ids.
session_successors = Table(
    "session_successors",
    metadata,
    Column("session_id", String(32), primary_key=True),
    Column("successor_id", String(32), nullable=False, index=True),
    Column("booth_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(255), nullable=False, unique=True),
    Column(
        "session_id",
        String(32),
        ForeignKey("sessions.id", ondelete="SET NULL"),
        nullable=True,
        index=True,
    ),
    Column("to_addr", String(320), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("body_text", Text, nullable=False),
    Column("body_html", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | sending | sent | failed | bounced
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    UniqueConstraint("message_id", name="uq_outbox_message_id"),
)

# Monotonic totals for the Prometheus counters (``cloud_trainer.repository.counters``).
# Deleting an attendee's data deletes the rows the counters were read from, so what
# those rows counted is added here in the same transaction; email outcomes are added
# when they happen. Labels are camera ids, stage names and email states: nothing
# personal, so deletion leaves these rows alone.
counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("label", String(128), primary_key=True),
    Column("value", Float, nullable=False, default=0.0),
)

# One row per staff login (``cloud_trainer.repository.staff_logins``). The signed cookie
# carries the login's random id; only its sha256 is stored, so a leaked database holds no
# working logins. Every staff request reads its row by that key: a revoked (logout,
# ``booth staff logout``) or missing row, or a user whose password hash in the config is
# no longer the one they logged in with, is logged out.
staff_logins = Table(
    "staff_logins",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("booth_id", String(64), nullable=False),
    Column("username", String(64), nullable=False),
    # sha256 of the argon2 hash (web.staff[].password_hash) the login was made with.
    Column("password_hash_sha256", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)
Index("ix_staff_logins_booth_user", staff_logins.c.booth_id, staff_logins.c.username)
