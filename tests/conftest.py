"""Shared fixtures: the real servers the adapters talk to, on loopback, started once.

Servers (each a subprocess in its own process group, killed with the group at
teardown, and also sent SIGKILL by the kernel if pytest itself dies):
- ``gcs_emulator``     gcp-storage-emulator, in memory (session)
- ``pubsub_emulator``  Google's Pub/Sub emulator, java (session)
- ``postgres_url``     the local PostgreSQL (not started here; skipped if unreachable)

Adapter configs, parametrized so one test body runs on every backend:
- ``db_config``        sqlite | postgres   (a fresh file / a fresh schema per test)
- ``storage_config``   local | gcs         (a fresh directory / a fresh bucket per test)
- ``blob_store``       the store built from ``storage_config``
- ``queue_config``     sqlite | pubsub     (a fresh file / fresh topic+subscription per test)

Helpers: ``free_port()`` (also as the ``get_free_port`` fixture, for test
modules that cannot import this file).
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_trainer.config import (
    GcsStorage,
    LocalStorage,
    PostgresDatabase,
    PubSubQueue,
    SqliteDatabase,
    SqliteQueue,
)

PUBSUB_EMULATOR = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
# Overrides for other machines: a SQLAlchemy URL, and the emulator's launcher.
PG_URL_ENV = "DANCEBOOTH_TEST_PG_URL"
PUBSUB_EMULATOR_ENV = "DANCEBOOTH_PUBSUB_EMULATOR"
_START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back).

    Another process can take it before you bind it; servers that can, should
    bind port 0 themselves and report the port instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def get_free_port() -> Callable[[], int]:
    """``free_port`` as a fixture: call it to get a port."""
    return free_port


# ---- subprocess servers ------------------------------------------------------------------


def _die_with_parent() -> None:
    # Runs in the child before exec: if pytest is SIGKILLed, the kernel kills the server
    # too (PR_SET_PDEATHSIG), so no emulator outlives a crashed test run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1


class ServerProcess:
    """A server subprocess in its own process group, with its output in a log file.

    Reusable for any server a test needs: ``wait_ready(check)`` polls until the
    check passes (failing with the log tail if the process exits), ``stop()``
    terminates then kills the whole group. Start it from the main thread: the
    kernel kills it when the thread that started it ends (so a crashed pytest
    leaves nothing behind).
    """

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float = _START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Anything the server forked that outlived it belongs to the same group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _start_on_free_port(
    name: str,
    argv_for: Callable[[int], list[str]],
    ready_for: Callable[[int], Callable[[], bool]],
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> tuple[ServerProcess, int]:
    # free_port() races with other processes; a server that lost the race exits, so retry.
    last: Exception | None = None
    for attempt in range(3):
        port = free_port()
        server = ServerProcess(name, argv_for(port), log_dir / f"{name}-{attempt}.log", env)
        try:
            server.wait_ready(ready_for(port))
            return server, port
        except RuntimeError as e:
            server.stop()
            last = e
    raise RuntimeError(f"could not start {name}: {last}")


def _tcp_open(port: int) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return ready


# ---- GCS --------------------------------------------------------------------------------


@dataclass
class GcsEmulator:
    endpoint: str  # http://127.0.0.1:PORT
    project: str

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name and return the name."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        name = f"test-{secrets.token_hex(6)}"
        client = storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )
        client.create_bucket(name)
        return name


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """gcp-storage-emulator (in memory) on a free port, for the whole session.

    Yields a ``GcsEmulator``; ``STORAGE_EMULATOR_HOST`` is set while the fixture is
    active (and restored after), so subprocesses started by tests inherit it.
    Prefer ``GcsStorage(endpoint=emulator.endpoint, ...)``, which needs no environment.
    """
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")

    def ready_for(port: int) -> Callable[[], bool]:
        def ready() -> bool:
            url = f"http://127.0.0.1:{port}/storage/v1/b?project=probe"
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    return r.status == 200
            except (OSError, urllib.error.URLError):
                return False

        return ready

    server, port = _start_on_free_port(
        "gcs-emulator",
        lambda port: [exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        ready_for,
        tmp_path_factory.mktemp("gcs-emulator"),
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", endpoint)
            yield GcsEmulator(endpoint=endpoint, project="dancebooth-test")
    finally:
        server.stop()


# ---- Pub/Sub ------------------------------------------------------------------------------


@dataclass
class PubSubEmulator:
    host: str  # 127.0.0.1:PORT, the value of PUBSUB_EMULATOR_HOST
    project: str

    def queue_config(self, **overrides) -> PubSubQueue:
        """A PubSubQueue on fresh topic/subscription names (isolated from other tests)."""
        suffix = secrets.token_hex(4)
        fields = {
            "project": self.project,
            "topic": f"jobs-{suffix}",
            "subscription": f"workers-{suffix}",
            **overrides,
        }
        return PubSubQueue(**fields)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    """Google's Pub/Sub emulator (java) on a free port, for the whole session.

    Sets ``PUBSUB_EMULATOR_HOST`` while active (the Pub/Sub client reads it; child
    processes inherit it). Skips if the emulator or java is missing.
    """
    launcher = Path(os.environ.get(PUBSUB_EMULATOR_ENV, str(PUBSUB_EMULATOR)))
    if not launcher.exists():
        pytest.skip(f"the Pub/Sub emulator is not installed ({launcher} is absent)")
    if shutil.which("java") is None:
        pytest.skip("the Pub/Sub emulator needs java, which is not on PATH")
    server, port = _start_on_free_port(
        "pubsub-emulator",
        lambda port: [str(launcher), "--host=127.0.0.1", f"--port={port}"],
        _tcp_open,
        tmp_path_factory.mktemp("pubsub-emulator"),
    )
    host = f"127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PUBSUB_EMULATOR_HOST", host)
            yield PubSubEmulator(host=host, project="dancebooth-test")
    finally:
        server.stop()


# ---- PostgreSQL ---------------------------------------------------------------------------


def _pg_candidates() -> list[str]:
    if os.environ.get(PG_URL_ENV):
        return [os.environ[PG_URL_ENV]]
    users = ["postgres", getpass.getuser()]
    return [f"postgresql+psycopg://{u}@127.0.0.1:5432/test" for u in dict.fromkeys(users)]


def _psycopg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A SQLAlchemy URL for the local PostgreSQL (db ``test``, trust auth).

    Tries user ``postgres``, then the current user (or ``$DANCEBOOTH_TEST_PG_URL``).
    Skips, saying why, when none connects.
    """
    import psycopg

    errors = []
    for url in _pg_candidates():
        try:
            with psycopg.connect(_psycopg_conninfo(url), connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return url
        except psycopg.Error as e:
            errors.append(f"{url}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
    pytest.skip("PostgreSQL is unreachable: " + "; ".join(errors))


@pytest.fixture
def pg_database_config(postgres_url: str) -> Iterator[PostgresDatabase]:
    """A ``PostgresDatabase`` on a fresh schema (random name), dropped with CASCADE after."""
    import psycopg

    schema = f"t_{secrets.token_hex(6)}"
    yield PostgresDatabase(url=postgres_url, db_schema=schema)
    with psycopg.connect(_psycopg_conninfo(postgres_url), autocommit=True) as conn:
        # Fail loudly rather than hang if a test left a transaction holding locks.
        conn.execute("SET lock_timeout = '20s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def db_config(request: pytest.FixtureRequest, tmp_path: Path):
    """The metadata database, once per backend: a fresh SQLite file, or a fresh PG schema."""
    if request.param == "sqlite":
        return SqliteDatabase(path=tmp_path / "booth.db")
    return request.getfixturevalue("pg_database_config")


# ---- blob stores ----------------------------------------------------------------------------


@pytest.fixture(params=["local", "gcs"])
def storage_config(request: pytest.FixtureRequest, tmp_path: Path):
    """Blob store config, once per backend: a fresh directory, or a fresh emulator bucket."""
    if request.param == "local":
        return LocalStorage(root=tmp_path / "blobs")
    emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
    return GcsStorage(
        bucket=emulator.new_bucket(), project=emulator.project, endpoint=emulator.endpoint
    )


@pytest.fixture
def blob_store(storage_config):
    """The blob store built from ``storage_config`` (so: local and gcs)."""
    from cloud_trainer.storage import create_blob_store

    return create_blob_store(storage_config)


# ---- job queues ----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "pubsub"])
def queue_config(request: pytest.FixtureRequest, tmp_path: Path):
    """Job queue config, once per backend, with 2 s leases so expiry tests stay quick.

    A fresh SQLite file, or fresh Pub/Sub topic and subscription names. Change a
    field with ``queue_config.model_copy(update={...})``.
    """
    if request.param == "sqlite":
        return SqliteQueue(
            path=tmp_path / "queue.db", visibility_timeout_s=2.0, heartbeat_s=0.5, max_attempts=3
        )
    emulator: PubSubEmulator = request.getfixturevalue("pubsub_emulator")
    return emulator.queue_config(ack_deadline_s=2, max_attempts=3)


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """The path of every file or directory ``os.fsync`` is called on, in order (it still syncs)."""
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced
