"""What ops see when a service cannot start: one line naming the setting, never a traceback.

Each case is a mistake made on a real deploy: a port another process holds, a data
path with a file in the way, a staff password pasted where its hash belongs (or a hash
compose's ``$`` expansion mangled), a placeholder left in the mail password, and the
lost-tablet logout run where the booth's database is not.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_trainer.config import BoothConfig, ConfigError, placeholder_secrets
from cloud_trainer.service import Service
from edge_agent.errors import BoothError, DeviceError

ROOT = Path(__file__).resolve().parents[2]
GOOD_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"


def booth(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "BOOTH_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "cloud_trainer.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=timeout,
    )


def one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if " WARNING " not in ln]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture
def held_port():
    """A port some other process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def serve_config(tmp_path: Path, extra: str = "") -> Path:
    """A config `booth serve` starts with, all of it under ``tmp_path``."""
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "web:\n  secret_key: a-real-secret-for-this-test\n"
        f"storage:\n  type: local\n  root: {tmp_path / 'blobs'}\n"
        f"database:\n  type: sqlite\n  path: {tmp_path / 'booth.db'}\n"
        f"queue:\n  type: sqlite\n  path: {tmp_path / 'queue.db'}\n" + extra
    )
    return cfg


def test_booth_serve_on_a_port_in_use_says_so_in_one_line(tmp_path, held_port):
    cfg = serve_config(tmp_path)
    r = booth("serve", "--config", str(cfg), "--http-port", str(held_port), "--grpc-port", "0")
    assert r.returncode == 2
    line = one_line(r)
    assert f"the web server cannot listen on 127.0.0.1:{held_port}" in line
    assert "in use" in line
    assert not (tmp_path / "booth.db").exists()  # refused before anything started


def test_a_bounce_listener_port_in_use_says_so_in_one_line(tmp_path, held_port):
    cfg = serve_config(
        tmp_path,
        "mail:\n  type: smtp\n  bounce_address: bounces@booth.example\n"
        f"  bounces_listen: 127.0.0.1:{held_port}\n",
    )
    r = booth("serve", "--config", str(cfg), "--http-port", "0", "--grpc-port", "0")
    assert r.returncode != 0
    line = one_line(r)
    assert f"mail.bounces_listen: cannot take bounces on 127.0.0.1:{held_port}" in line


def test_an_agent_status_port_in_use_is_a_booth_error_not_an_oserror(held_port):
    from edge_agent.status import StatusServer

    with pytest.raises(BoothError, match=f"status endpoint cannot listen on .*:{held_port}"):
        StatusServer(dict, held_port, host="127.0.0.1")


@pytest.mark.parametrize("what", ["storage.root", "database.path", "queue.path"])
def test_a_data_path_with_a_file_in_the_way_names_the_setting(tmp_path, what):
    from cloud_trainer.queue import create_job_queue
    from cloud_trainer.repository import Repository
    from cloud_trainer.storage import create_blob_store

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the booth wants a folder")
    inside = blocker / "sub"
    section = what.split(".")[0]
    cfg = BoothConfig.model_validate(
        {
            "storage": {"type": "local", "root": str(inside)},
            "database": {"type": "sqlite", "path": str(inside / "booth.db")},
            "queue": {"type": "sqlite", "path": str(inside / "queue.db")},
        }
    )
    make = {
        "storage": lambda: create_blob_store(cfg.storage),
        "database": lambda: Repository.from_config(cfg.database),
        "queue": lambda: create_job_queue(cfg.queue),
    }[section]
    with pytest.raises(DeviceError, match=f"{what.replace('.', '[.]')} .* cannot be used: a file"):
        make()


@pytest.mark.parametrize("bad", ["hunter2hunter2", "argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"])
def test_a_staff_password_hash_that_is_not_one_is_refused_at_validation(tmp_path, bad):
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(f"web:\n  staff:\n    - username: ada\n      password_hash: '{bad}'\n")
    r = booth("config", "validate", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # The file's errors are listed one per line, each naming its key.
    line = next(ln for ln in r.stderr.splitlines() if "web.staff.0.password_hash" in ln)
    assert "not an argon2 hash" in line and "booth staff hash-password" in line
    cfg.write_text(f"web:\n  staff:\n    - username: ada\n      password_hash: '{GOOD_HASH}'\n")
    assert booth("config", "validate", str(cfg)).returncode == 0


def test_placeholders_in_staff_hashes_and_the_mail_password_stop_booth_serve():
    cfg = BoothConfig.model_validate(
        {
            "web": {
                "secret_key": "a-real-secret-for-this-test",
                "staff": [
                    {"username": "ada", "password_hash": GOOD_HASH},
                    {"username": "bob", "password_hash": "changethis"},
                ],
            },
            "mail": {"type": "smtp", "username": "booth", "password": "changethis"},
        }
    )
    assert placeholder_secrets(cfg, services=("web",)) == ["web.staff.1.password_hash"]
    # serve sends the outbox as well: its placeholders count, before anything starts.
    with pytest.raises(
        ConfigError,
        match=r"web.staff.1.password_hash \(the output of `booth staff hash-password`\); "
        r"mail.password \(the SMTP relay's password\)",
    ):
        asyncio.run(Service(cfg, http_port=0, grpc_port=0).run())


def test_staff_logout_where_the_booth_database_is_not_refuses_instead_of_ending_nothing(
    tmp_path,
):
    r = booth("staff", "logout", "ada", cwd=tmp_path)
    assert r.returncode == 2
    line = one_line(r)
    assert "no booth database at var/booth.db" in line and "--config" in line
    assert not (tmp_path / "var").exists()  # no empty database made on the way


def test_a_backend_section_without_its_type_names_the_key_and_the_choices(tmp_path):
    cfg = tmp_path / "booth.yaml"
    cfg.write_text("storage:\n  root: /srv/blobs\nagent:\n  source:\n    path: take.mp4\n")
    r = booth("config", "validate", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "storage.type: missing: this section needs its type ('local', 'gcs')" in r.stderr
    assert "agent.source.type: missing" in r.stderr and "'file'" in r.stderr
    assert "discriminator" not in r.stderr


@pytest.mark.parametrize("mistake", ["swapped", "other-key", "empty-key"])
def test_a_tls_pair_that_cannot_work_is_named_as_tls_not_as_a_port(tmp_path, mistake):
    from types import SimpleNamespace

    import transport_helpers as th

    from cloud_trainer.ingest.auth import server_credentials

    pair, other = th.self_signed(tmp_path / "a"), th.self_signed(tmp_path / "b")
    cert, key = {
        "swapped": (pair.key, pair.cert),
        "other-key": (pair.cert, other.key),
        "empty-key": (pair.cert, tmp_path / "empty.key"),
    }[mistake]
    (tmp_path / "empty.key").write_bytes(b"")
    why = {
        "swapped": "no PEM certificate",
        "other-key": "does not belong to the certificate",
        "empty-key": "no unencrypted PEM private key",
    }[mistake]
    with pytest.raises(BoothError, match=f"ingest.tls: the .*{why}"):
        server_credentials(SimpleNamespace(cert=cert, key=key))
    assert server_credentials(SimpleNamespace(cert=pair.cert, key=pair.key)) is not None


def test_validate_names_the_placeholder_secrets_serve_would_refuse(tmp_path):
    """`booth config validate` is the pre-flight check: a file serve refuses must not be 'ok'."""
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(
        "web:\n  secret_key: changethis\n"
        "mail:\n  type: smtp\n  username: booth\n  password: changethis\n"
    )
    r = booth("config", "validate", str(cfg))
    assert r.returncode == 0 and not r.stdout.strip().endswith(": ok")
    assert "web.secret_key (a random string" in r.stdout
    assert "mail.password (the SMTP relay's password)" in r.stdout
    assert "agent.uplink.token" not in r.stdout  # no agent section: not this file's concern
    cfg.write_text("web:\n  secret_key: a-real-one-for-this-test\n")
    assert booth("config", "validate", str(cfg)).stdout.strip().endswith(": ok")
    # The database's password in its URL, as deploy/config/booth.cloud.yaml writes it.
    cfg.write_text(
        "web:\n  secret_key: a-real-one-for-this-test\n"
        "database:\n  type: postgres\n  url: postgresql+psycopg://booth:changethis@db/booth\n"
    )
    assert "database.url (the database's password" in booth("config", "validate", str(cfg)).stdout
    # A board's file holds no cloud secrets: only the agent's token is its concern.
    cfg.write_text("agent:\n  uplink:\n    token: changethis\n")
    r = booth("config", "validate", str(cfg))
    assert "agent.uplink.token" in r.stdout and "web.secret_key" not in r.stdout
    cfg.write_text("agent:\n  uplink:\n    token: a-real-token-for-this-test\n")
    assert booth("config", "validate", str(cfg)).stdout.strip().endswith(": ok")


@pytest.mark.parametrize(
    "yaml_text, key, says",
    [
        ("web:\n  base_url: booth.example.org\n", "web.base_url", "not an http(s) URL"),
        (
            "database:\n  type: postgres\n  url: mysql://x@db/booth\n",
            "database.url",
            "not PostgreSQL through psycopg",
        ),
        ("database:\n  type: postgres\n  url: 'not a url'\n", "database.url", "not a database URL"),
    ],
)
def test_a_base_url_or_database_url_that_cannot_work_is_named_at_validation(
    tmp_path, yaml_text, key, says
):
    cfg = tmp_path / "booth.yaml"
    cfg.write_text(yaml_text)
    r = booth("config", "validate", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if key in ln)
    assert says in line


def test_a_heroku_style_postgres_url_is_taken_as_psycopg():
    cfg = BoothConfig.model_validate(
        {"database": {"type": "postgres", "url": "postgres://booth:pw@db:5432/booth"}}
    )
    assert cfg.database.url == "postgresql+psycopg://booth:pw@db:5432/booth"


def test_pretrain_publish_without_the_booths_config_is_refused_before_training(tmp_path):
    r = booth("pretrain", "--out", str(tmp_path / "base"), "--publish", "blob:base/x")
    assert r.returncode == 2
    assert "--publish needs the booth's config" in one_line(r)
    assert not (tmp_path / "base").exists()  # nothing started


def test_gcs_credentials_that_do_not_work_say_why(tmp_path, monkeypatch):
    """Compose always sets GOOGLE_APPLICATION_CREDENTIALS: 'set it' pointed the wrong way
    when the file was missing or unreadable."""
    from cloud_trainer.storage.gcs import GcsBlobStore
    from edge_agent.errors import BoothError

    missing = tmp_path / "nope.json"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    with pytest.raises(BoothError) as e:
        GcsBlobStore("bucket")
    assert f"GOOGLE_APPLICATION_CREDENTIALS={missing}" in str(e.value)
    assert "not found" in str(e.value) or "No such file" in str(e.value)
