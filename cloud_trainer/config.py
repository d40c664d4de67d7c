"""The booth's one YAML file, parsed strictly.

Sections map to pipeline stages and adapters. Adapters (storage, database,
queue, mail) are discriminated unions on ``type``; the embedded defaults run a
whole booth on one machine with nothing but the filesystem.

This module imports nothing heavy: the CLI validates configs on a board too.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from edge_agent.config import (
    PLACEHOLDER_SECRETS,
    AgentConfig,
    ConfigError,
    Ident,
    Strict,
    parse_model,
    read_yaml,
)


class BoothSection(Strict):
    id: Ident = "booth-1"
    name: str = "dancebooth"
    take_s: float = Field(15.0, gt=0, le=600, description="seconds each take captures")
    countdown_s: int = Field(3, ge=0, le=30)
    # A take not fully uploaded this long after it started fails with the cameras that are
    # missing, so a board that never comes back cannot leave a session stuck in capturing.
    upload_deadline_s: float = Field(1800.0, gt=0)
    # Where the booth stands (IANA name): the tablet's "today" and the times in emails.
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name like Europe/Berlin)") from None
        return v


# ---- storage ------------------------------------------------------------------


class LocalStorage(Strict):
    type: Literal["local"] = "local"
    root: Path = Path("var/blobs")


class GcsStorage(Strict):
    type: Literal["gcs"] = "gcs"
    bucket: str
    project: str = "dancebooth"
    # Set for the emulator (STORAGE_EMULATOR_HOST also works); None for real GCS.
    endpoint: str | None = None


StorageConfig = Annotated[LocalStorage | GcsStorage, Field(discriminator="type")]


# ---- metadata ---------------------------------------------------------------------


class SqliteDatabase(Strict):
    type: Literal["sqlite"] = "sqlite"
    path: Path = Path("var/booth.db")


class PostgresDatabase(Strict):
    type: Literal["postgres"] = "postgres"
    url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    db_schema: str | None = Field(None, description="PostgreSQL schema to use (search_path)")

    @field_validator("url")
    @classmethod
    def _a_postgresql_url(cls, v: str) -> str:
        # Checked here, not as a SQLAlchemy traceback when the app starts. The common
        # "postgres://" (Heroku, many dashboards) is the same database: taken as psycopg.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if v.startswith("postgres://"):
            v = "postgresql+psycopg://" + v[len("postgres://") :]
        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError(
                "is not a database URL: postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE"
            ) from None
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername != "postgresql+psycopg":
            raise ValueError(
                f"{url.drivername!r} is not PostgreSQL through psycopg: write "
                "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE"
            )
        return url.render_as_string(hide_password=False)


DatabaseConfig = Annotated[SqliteDatabase | PostgresDatabase, Field(discriminator="type")]


# ---- jobs ---------------------------------------------------------------------------


class SqliteQueue(Strict):
    type: Literal["sqlite"] = "sqlite"
    path: Path = Path("var/queue.db")
    visibility_timeout_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)

    @property
    def lease_s(self) -> float:
        """How long a delivered job stays leased without a heartbeat."""
        return float(self.visibility_timeout_s)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> SqliteQueue:
        # A heartbeat that comes after the lease ran out hands every long job to a second
        # worker while the first still trains it.
        if self.heartbeat_s >= self.visibility_timeout_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be shorter than visibility_timeout_s "
                f"({self.visibility_timeout_s:g}), or every job's lease runs out while it "
                "trains; a third of it is a good value"
            )
        return self


class PubSubQueue(Strict):
    type: Literal["pubsub"] = "pubsub"
    project: str = "dancebooth"
    topic: str = "training-jobs"
    subscription: str = "training-workers"
    # How long a received job stays leased without a heartbeat. Subscriptions are created
    # with at least 10 s (a Pub/Sub minimum); shorter leases use modify_ack_deadline (tests).
    ack_deadline_s: int = Field(60, ge=1, le=600)
    max_attempts: int = Field(3, ge=1)

    @property
    def lease_s(self) -> float:
        """How long a delivered job stays leased without a heartbeat."""
        return float(self.ack_deadline_s)


QueueConfig = Annotated[SqliteQueue | PubSubQueue, Field(discriminator="type")]


# ---- ingest ------------------------------------------------------------------------


class AgentToken(Strict):
    camera_id: Ident
    # sha256 hex of the bearer token; the token itself is never stored.
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    expires_at: float | None = Field(None, description="unix time after which the token is refused")


class TlsServer(Strict):
    cert: Path
    key: Path


class IngestConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    max_message_mb: int = Field(16, ge=1, le=512)
    shard_mb: float = Field(8.0, gt=0, description="frames are chunked into shard objects this big")
    # A partly filled shard is written after this long, so acks (and the agent's spool) never
    # wait for a slow camera to fill a whole shard.
    flush_interval_s: float = Field(0.25, gt=0, le=60)
    tls: TlsServer | None = None
    agents: list[AgentToken] = Field(default_factory=list)


# ---- training and rendering -------------------------------------------------------


class TrainerConfig(Strict):
    size_px: int = Field(128, ge=32, le=512)

    @field_validator("size_px")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        # The U-Net halves the image down to 1 px: any other size fails every job later.
        if v & (v - 1):
            raise ValueError(f"must be a power of two (32, 64, 128, 256 or 512), not {v}")
        return v

    label_map: Literal["skeleton", "parts"] = "skeleton"
    budget_s: float = Field(3600.0, gt=0)
    batch: int = Field(4, ge=1)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    l1_weight: float = Field(100.0, ge=0)
    base_checkpoint: str | None = Field(
        None, description="path or blob URI of the booth's base checkpoint"
    )
    checkpoint_every_steps: int = Field(200, ge=1)
    checkpoint_every_s: float = Field(120.0, gt=0)
    strategy: Literal["auto", "default", "mirrored", "tpu"] = "auto"
    mixed_precision: Literal["auto", "off", "on"] = "auto"
    jit_compile: Literal["auto", "off", "on"] = "auto"
    work_dir: Path = Path("var/jobs")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=0.9)
    worker_max_rss_mb: int | None = Field(
        None,
        ge=0,
        description="a `booth worker` whose memory has grown past this after a job exits, "
        "for its supervisor to start a fresh one (TensorFlow keeps some memory from every "
        "job); default: 60% of the memory it may use; 0: never",
    )


class RenderConfig(Strict):
    side_by_side: bool = True
    batch: int = Field(16, ge=1)
    crf: int = Field(20, ge=0, le=51)


class LinksConfig(Strict):
    expiry_days: float = Field(30.0, gt=0)


# ---- mail ---------------------------------------------------------------------------


def _mail_address(v: str | None) -> str | None:
    """``"Name <addr@host>"`` or ``addr@host`` (empty: not set). Checked here: a sender
    the mail code cannot parse would otherwise fail every email, each as if the
    attendee's address were wrong."""
    if v is None or not v.strip():
        return None
    from email.utils import parseaddr

    if re.search(r"[\x00-\x1f\x7f]", v):
        raise ValueError("an email address cannot hold a line break or control character")
    _name, addr = parseaddr(v)
    local, _, domain = addr.rpartition("@")
    if not local or not domain:
        raise ValueError(f"{v!r} is not an email address ('Name <booth@example.org>')")
    return v


class OutboxMail(Strict):
    """No SMTP: messages are delivered into a local maildir (README says where)."""

    type: Literal["outbox"] = "outbox"
    maildir: Path = Path("var/maildir")
    sender: str = "dancebooth <booth@localhost>"
    # Where an attendee's reply goes (the pages tell them to reply to the email): a
    # watched inbox, when the sender is an address nobody reads.
    reply_to: str | None = None
    # Message-IDs handed over, written before the outbox row is updated (exactly-once).
    sent_log: Path = Path("var/mail-sent.log")

    _addresses = field_validator("sender", "reply_to")(_mail_address)


class SmtpMail(Strict):
    type: Literal["smtp"] = "smtp"
    host: str = "127.0.0.1"
    port: int = Field(25, ge=1, le=65535)
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    sender: str = "dancebooth <booth@localhost>"
    reply_to: str | None = None  # see OutboxMail
    timeout_s: float = Field(10.0, gt=0)
    # 30 attempts, 30 s doubling to an hour apart: about a day of trying. A relay down
    # for an afternoon of the conference must not leave every email to a manual Resend.
    max_attempts: int = Field(30, ge=1)
    backoff_initial_s: float = Field(30.0, gt=0)
    backoff_max_s: float = Field(3600.0, gt=0)
    # Message-IDs the relay accepted, written before the outbox row is updated (exactly-once).
    sent_log: Path = Path("var/mail-sent.log")
    # Late bounces (cloud_trainer.bounces): a relay may accept an email and return it
    # hours later to the envelope sender. With bounce_address set, emails go out with it
    # as their envelope sender, and `booth serve` takes mail for it over SMTP on
    # bounces_listen ("host:port"; the bounce domain's MX record points there) and marks
    # the emails bounced. Without bounce_address, bounces_listen is not used.
    bounce_address: str | None = None
    bounces_listen: str | None = None

    _addresses = field_validator("sender", "reply_to", "bounce_address")(_mail_address)

    @field_validator("bounces_listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{v!r} is not host:port (e.g. 0.0.0.0:2525)")
        return v


MailConfig = Annotated[OutboxMail | SmtpMail, Field(discriminator="type")]


# ---- web ---------------------------------------------------------------------------


_ARGON2_HASH = re.compile(
    r"^\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$"
)


class StaffUser(Strict):
    username: str
    # An argon2 hash (`booth staff hash-password`); never the password itself.
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _argon2(cls, v: str) -> str:
        # A pasted password, or a hash whose $ compose expanded, would pass every check
        # and then let nobody log in. A placeholder is refused when the app starts.
        if v.strip().lower() in PLACEHOLDER_SECRETS or _ARGON2_HASH.match(v):
            return v
        raise ValueError(
            "is not an argon2 hash: make one with `booth staff hash-password`"
            " (in a compose file or .env, write each $ as $$)"
        )


class WebConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    base_url: str = "http://127.0.0.1:8000"
    secret_key: str = "changethis"
    staff: list[StaffUser] = Field(default_factory=list)
    login_attempts_per_minute: int = Field(5, ge=1)
    # The TLS proxy in front of the app, whose X-Forwarded-For/-Proto are believed (its
    # address or a comma-separated list; "*" trusts anyone, only on a private network).
    forwarded_allow_ips: str = "127.0.0.1"
    # When set, /metrics answers only "Authorization: Bearer <metrics_token>" (Prometheus'
    # `authorization` scrape setting); empty leaves it open, for a private network.
    metrics_token: str = ""

    @field_validator("base_url")
    @classmethod
    def _an_http_url(cls, v: str) -> str:
        # Every attendee's link is built on it: one without a scheme mails dead links.
        from urllib.parse import urlsplit

        parts = urlsplit(v.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{v!r} is not an http(s) URL: the attendees' links start with it "
                "(https://booth.example.org)"
            )
        return v.strip().rstrip("/")


def blob_prefix(uri: str) -> str | None:
    """The store prefix ``blob:<prefix>`` names (None: not a blob-store name)."""
    return uri[len("blob:") :].strip("/") if uri.startswith("blob:") else None


def local_checkpoint_exists(path: str) -> bool:
    """A checkpoint on local disk: a directory, or a prefix (``.../ckpt-4000``) whose
    files sit beside it."""
    return Path(path).exists() or Path(f"{path}.index").exists()


def blob_uri(uri: str, storage: LocalStorage | GcsStorage) -> str:
    """A base checkpoint's name as the trainer reads it: a local path or ``blob:<prefix>``.

    ``gs://<bucket>/<prefix>`` is accepted for the configured bucket (what an operator
    copying a base into the bucket would write) and means ``blob:<prefix>``; any other
    URL scheme is refused, since the workers reach only the configured store.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    bucket, _, prefix = rest.partition("/")
    gcs = isinstance(storage, GcsStorage)
    if scheme == "gs" and gcs and bucket == storage.bucket:
        if not prefix.strip("/"):
            raise ValueError(f"{uri} names a whole bucket, not a base checkpoint in it")
        return f"blob:{prefix.strip('/')}"
    where = f"the gcs bucket {storage.bucket!r}" if gcs else "the local blob store"
    raise ValueError(
        f"base checkpoint {uri}: the workers read bases only from {where}; name it "
        "blob:<prefix> (an object prefix in that store) or give a local path"
    )


class BoothConfig(Strict):
    """The whole booth file. Every section has embedded defaults."""

    booth: BoothSection = Field(default_factory=BoothSection)
    models_dir: Path = Path("models")
    agent: AgentConfig = Field(default_factory=AgentConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    storage: StorageConfig = Field(default_factory=LocalStorage)
    database: DatabaseConfig = Field(default_factory=SqliteDatabase)
    queue: QueueConfig = Field(default_factory=SqliteQueue)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    links: LinksConfig = Field(default_factory=LinksConfig)
    mail: MailConfig = Field(default_factory=OutboxMail)
    web: WebConfig = Field(default_factory=WebConfig)

    @model_validator(mode="after")
    def _base_in_store(self) -> BoothConfig:
        if self.trainer.base_checkpoint:
            self.trainer.base_checkpoint = blob_uri(self.trainer.base_checkpoint, self.storage)
        return self

    @model_validator(mode="after")
    def _agent_in_booth(self) -> BoothConfig:
        if self.agent.booth_id != self.booth.id and "agent" in self.model_fields_set:
            raise ValueError(
                f"agent.booth_id {self.agent.booth_id!r} does not match booth.id {self.booth.id!r}"
            )
        return self


def load_config(path: str | Path) -> BoothConfig:
    return parse_model(read_yaml(path), BoothConfig, source=str(path))


def placeholder_secrets(cfg: BoothConfig, *, services: tuple[str, ...] = ("web",)) -> list[str]:
    """Keys whose secret is still a placeholder, for the services about to start."""
    bad = []
    if "web" in services and cfg.web.secret_key.strip().lower() in PLACEHOLDER_SECRETS:
        bad.append("web.secret_key")
    if "web" in services:
        bad += [
            f"web.staff.{i}.password_hash"
            for i, u in enumerate(cfg.web.staff)
            if u.password_hash.strip().lower() in PLACEHOLDER_SECRETS
        ]
    if "agent" in services and cfg.agent.uplink.token.strip().lower() in PLACEHOLDER_SECRETS:
        bad.append("agent.uplink.token")
    if "ingest" in services:
        placeholder_hashes = {
            hashlib.sha256(p.encode()).hexdigest() for p in PLACEHOLDER_SECRETS if p
        }
        bad += [
            f"ingest.agents.{i}.token_sha256"
            for i, a in enumerate(cfg.ingest.agents)
            if a.token_sha256 in placeholder_hashes
        ]
    if "database" in services and isinstance(cfg.database, PostgresDatabase):
        from sqlalchemy.engine import make_url

        password = make_url(cfg.database.url).password
        if password is not None and password.strip().lower() in PLACEHOLDER_SECRETS:
            bad.append("database.url")
    smtp_auth = isinstance(cfg.mail, SmtpMail) and cfg.mail.username
    if (
        "mail" in services
        and smtp_auth
        and (cfg.mail.password or "").strip().lower() in PLACEHOLDER_SECRETS
    ):
        bad.append("mail.password")
    return bad


# What to put in place of each placeholder.
_PLACEHOLDER_HINTS = {
    "web.secret_key": "a random string: python -c 'import secrets; print(secrets.token_urlsafe(32))'",
    "password_hash": "the output of `booth staff hash-password`",
    "agent.uplink.token": "the token `booth ingest --new-token CAMERA` printed for this camera",
    "token_sha256": "the sha256 `booth ingest --new-token CAMERA` printed",
    "mail.password": "the SMTP relay's password",
    "database.url": "the database's password in place of the placeholder in the URL",
}


def placeholder_problems(cfg: BoothConfig, services: tuple[str, ...]) -> list[str]:
    """``key: what to set it to`` for each placeholder secret of ``services``."""
    out = []
    for key in placeholder_secrets(cfg, services=services):
        hint = next((h for k, h in _PLACEHOLDER_HINTS.items() if key.endswith(k)), "")
        out.append(f"{key} ({hint})" if hint else key)
    return out


def refuse_placeholders(cfg: BoothConfig, services: tuple[str, ...]) -> None:
    bad = placeholder_problems(cfg, services)
    if bad:
        raise ConfigError("refusing to start: placeholder secret(s) still set: " + "; ".join(bad))
