"""The web app as the tests build it: real settings, repository and blob store, a staff login.

One definition for ``tests/cloud_trainer/test_web.py`` (TestClient) and
``tests/fuzz/api_fuzz.py`` (schemathesis, also run by ``bench/chaos.py``), so
both test the app that ``create_app`` really builds from a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transport_helpers as th

from cloud_trainer import links
from cloud_trainer.config import BoothConfig, LocalStorage, SqliteDatabase, StaffUser
from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from cloud_trainer.web import create_app
from cloud_trainer.web.security import hash_password

STAFF = "staff"
PASSWORD = "correct horse battery"
SECRET_KEY = "test-secret-" + "x" * 20
VIDEO = bytes(range(256)) * 40  # what delivered_session stores as the video


@dataclass
class StaffApp:
    """The app and the adapters it was built on (tests seed and inspect them directly)."""

    app: Any
    repo: Repository
    store: Any
    settings: BoothConfig


def staff_settings(
    tmp: Path, database: Any = None, *, login_attempts_per_minute: int = 3
) -> BoothConfig:
    """A config with one staff user, on SQLite in ``tmp`` unless ``database`` is given."""
    cfg = BoothConfig()
    cfg.web.secret_key = SECRET_KEY
    cfg.web.staff = [StaffUser(username=STAFF, password_hash=hash_password(PASSWORD))]
    cfg.web.login_attempts_per_minute = login_attempts_per_minute
    cfg.database = database or SqliteDatabase(path=tmp / "booth.db")
    cfg.storage = LocalStorage(root=tmp / "blobs")
    return cfg


def build_app(settings: BoothConfig) -> StaffApp:
    """``create_app`` on a fresh repository and blob store, without references or mail.

    The caller closes ``repo`` when done (``repo.close()``).
    """
    repo = Repository.from_config(settings.database)
    store = create_blob_store(settings.storage)
    app = create_app(settings, repo=repo, store=store, references=lambda: [], deliverer=None)
    return StaffApp(app=app, repo=repo, store=store, settings=settings)


def log_in(client: Any) -> str:
    """Log ``client`` (a TestClient) in as staff; returns the CSRF token (the cookie stays in it)."""
    r = client.post("/api/login", json={"username": STAFF, "password": PASSWORD})
    r.raise_for_status()
    return r.json()["csrf_token"]


def delivered_session(repo: Repository, store: Any) -> tuple[str, str]:
    """A delivered session with a video, a side-by-side and a poster: (session id, link token)."""
    sid = th.new_session(repo, booth_id="booth-1")
    for state in ("capturing", "uploaded", "training", "rendering", "delivered"):
        repo.transition(sid, state)
    store.put(f"sessions/{sid}/video/final.mp4", VIDEO)
    store.put(f"sessions/{sid}/video/poster.jpg", b"\xff\xd8poster\xff\xd9")
    repo.update_session(
        sid,
        video_key=f"sessions/{sid}/video/final.mp4",
        poster_key=f"sessions/{sid}/video/poster.jpg",
        side_by_side_key=f"sessions/{sid}/video/final.mp4",
    )
    return sid, links.create_link(repo, sid, expiry_days=30).token
