"""``booth serve`` stops when told to, even while a tablet holds an event stream open."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cloud_trainer.web.security import hash_password

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


@pytest.fixture
def serving(tmp_path):
    """A real ``booth serve`` with a tablet's event stream open on one of its sessions."""
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "web:\n  secret_key: a-real-secret-for-this-test\n"
        f"  staff:\n    - username: staff\n      password_hash: '{hash_password(PASSWORD)}'\n"
        f"storage:\n  type: local\n  root: {tmp_path / 'blobs'}\n"
        f"database:\n  type: sqlite\n  path: {tmp_path / 'booth.db'}\n"
        f"queue:\n  type: sqlite\n  path: {tmp_path / 'queue.db'}\n"
        f"mail:\n  type: outbox\n  maildir: {tmp_path / 'mail'}\n"
        f"  sent_log: {tmp_path / 'mail-sent.log'}\n"
    )
    ready = tmp_path / "ready.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_trainer.cli", "serve", "--config", str(cfg)]
        + ["--http-port", "0", "--grpc-port", "0", "--ready-file", str(ready)],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
        port = json.loads(ready.read_text())["http"]
        base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, timeout=10)
        csrf = client.post("/api/login", json={"username": "staff", "password": PASSWORD})
        headers = {"X-CSRF-Token": csrf.json()["csrf_token"]}
        sid = client.post(
            "/api/sessions",
            json={"name": "Ada", "email": "ada@example.org", "consent": True, "reference": "r"},
            headers=headers,
        ).json()["id"]
        opened = threading.Event()

        def tablet() -> None:
            try:
                with client.stream("GET", f"/api/sessions/{sid}/events", timeout=None) as r:
                    opened.set()
                    for _ in r.iter_bytes():
                        pass
            except httpx.HTTPError:
                pass  # the server went away: what this test wants

        threading.Thread(target=tablet, daemon=True).start()
        assert opened.wait(15), "the event stream did not open"
        proc.http_port = port
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_sigterm_stops_serve_while_a_tablet_holds_an_event_stream(serving):
    serving.send_signal(signal.SIGTERM)
    try:
        code = serving.wait(timeout=30)  # the stream is cut after 5 s; it used to hang on
    except subprocess.TimeoutExpired:
        pytest.fail("booth serve was still running 30 s after SIGTERM")
    assert code == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_a_second_sigterm_ends_serve_at_once(serving):
    serving.send_signal(signal.SIGTERM)
    # The first one is being acted on once the web port stops taking connections (two
    # signals sent back to back would arrive as one).
    deadline = time.monotonic() + 10
    while not _refused(serving.http_port):
        assert time.monotonic() < deadline, "the first SIGTERM closed nothing"
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(timeout=30) == 128 + signal.SIGTERM
    assert "SIGTERM again, exiting now" in serving.stderr.read()
