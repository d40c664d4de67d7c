"""Staff logins live on the server: logout, a new password or a removed user end them.

Each test runs the real app (``staff_app.build_app``) on SQLite and on PostgreSQL.
A "copied cookie" is the cookie value taken before the event and replayed after it,
as someone who copied it off the tablet would.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import transport_helpers as th
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, inspect, select
from staff_app import PASSWORD, SECRET_KEY, STAFF, StaffApp, build_app, log_in, staff_settings

from cloud_trainer import cli
from cloud_trainer.config import BoothConfig, SqliteDatabase, StaffUser
from cloud_trainer.repository.schema import metadata, staff_logins
from cloud_trainer.web.security import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    CookieSigner,
    hash_password,
)


@pytest.fixture
def booth(tmp_path, db_config) -> Iterator[StaffApp]:
    built = build_app(staff_settings(tmp_path, db_config))
    yield built
    built.repo.close()


def _logged_out(app, cookie: str) -> bool:
    """True when ``cookie`` gets the logged-out answers: API 401 and pages to /login."""
    with TestClient(app) as c:
        c.cookies.set(SESSION_COOKIE, cookie)
        api = c.get("/api/sessions").status_code
        page = c.get("/", follow_redirects=False)
    if api == 200 and page.status_code == 200:
        return False
    assert api == 401, api
    assert page.status_code == 303 and page.headers["location"] == "/login"
    return True


def _rebuilt(booth: StaffApp, staff: list[StaffUser]) -> StaffApp:
    """The booth restarted on the same database with ``staff`` as its ``web.staff``."""
    settings = booth.settings.model_copy(deep=True)
    settings.web.staff = staff
    return build_app(settings)


def _login_rows(booth: StaffApp) -> list[dict]:
    with booth.repo.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(staff_logins))]


def _logout_form_csrf(html: str) -> str:
    form = re.search(r'<form method="post" action="/logout">(.*?)</form>', html, re.S)
    assert form, "the page has no logout form"
    token = re.search(r'name="csrf" value="([^"]+)"', form.group(1))
    assert token, "the logout form carries no CSRF token"
    return token.group(1)


def test_a_login_is_a_row_under_the_hash_of_its_id_and_opens_pages_and_api(client, booth):
    r = client.post(
        "/login", data={"username": STAFF, "password": PASSWORD}, follow_redirects=False
    )
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert client.get("/").status_code == 200
    assert client.get("/api/sessions").status_code == 200
    log_in(client)  # the JSON login works the same way
    assert client.get("/api/sessions").status_code == 200

    rows = _login_rows(booth)
    assert len(rows) == 2
    assert {r["username"] for r in rows} == {STAFF}
    assert all(r["booth_id"] == "booth-1" for r in rows)
    # The second login replaced the first in this browser, so the first ended.
    assert sorted(r["revoked_at"] is None for r in rows) == [False, True]
    login_id = CookieSigner(SECRET_KEY).loads(client.cookies[SESSION_COOKIE])["login"]
    assert len(login_id) >= 22  # at least 128 random bits, base64
    stored = repr(rows)
    assert login_id not in stored  # only its sha256 is kept


@pytest.mark.parametrize("how", ["form", "api"])
def test_logging_in_again_ends_the_login_the_browser_held(client, booth, how):
    log_in(client)
    copied = client.cookies[SESSION_COOKIE]
    with TestClient(booth.app) as other_tablet:
        log_in(other_tablet)
        if how == "form":
            client.post("/login", data={"username": STAFF, "password": PASSWORD})
        else:
            log_in(client)
        assert client.cookies[SESSION_COOKIE] != copied
        assert client.get("/api/sessions").status_code == 200
        assert _logged_out(booth.app, copied)
        # Another browser's login is its own.
        assert other_tablet.get("/api/sessions").status_code == 200


def test_a_failed_login_leaves_the_standing_one(client, booth):
    log_in(client)
    r = client.post("/api/login", json={"username": STAFF, "password": "wrong"})
    assert r.status_code == 401
    assert client.get("/api/sessions").status_code == 200


def test_the_event_stream_ends_when_its_login_does(client, booth):
    log_in(client)
    sid = th.new_session(booth.repo, booth_id="booth-1")
    login_sha256 = _login_rows(booth)[0]["id_sha256"]
    with client.stream("GET", f"/api/sessions/{sid}/events") as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: ") and sid in first
        # As `booth staff logout` or a logout elsewhere would: the row is revoked. The
        # session changes too, so a stream that ignored the logout would send it on.
        booth.repo.revoke_staff_login(login_sha256, time.time())
        booth.repo.transition(sid, "capturing")
        events = (line for line in lines if line)
        assert next(events) == "event: logged-out"
        assert next(events) == "data: {}"
        assert next(events, None) is None  # and the stream ended


def test_logout_ends_the_login_for_every_copy_of_its_cookie(client, booth):
    csrf = log_in(client)
    copied = client.cookies[SESSION_COOKIE]
    with TestClient(booth.app) as other_tablet:
        log_in(other_tablet)
        r = client.post("/logout", data={"csrf": csrf}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert SESSION_COOKIE not in client.cookies  # still dropped in the browser too
        assert _logged_out(booth.app, copied)
        # Only that login ended: the other tablet's stays.
        assert other_tablet.get("/api/sessions").status_code == 200
    # Logged out already: nothing to end or protect, so no CSRF check, just the login page.
    with TestClient(booth.app) as c:
        c.cookies.set(SESSION_COOKIE, copied)
        r = c.post("/logout", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"


def test_the_log_out_button_sends_the_csrf_token_and_ends_the_login(client, booth):
    client.post("/login", data={"username": STAFF, "password": PASSWORD})
    copied = client.cookies[SESSION_COOKIE]
    csrf = _logout_form_csrf(client.get("/").text)
    r = client.post("/logout", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert _logged_out(booth.app, copied)
    assert [row["revoked_at"] is not None for row in _login_rows(booth)] == [True]


def test_logout_without_the_forms_csrf_token_is_refused_and_keeps_the_login(client, booth):
    log_in(client)
    cookie = client.cookies[SESSION_COOKIE]
    r = client.post("/logout", data={"csrf": "not-the-token"}, follow_redirects=False)
    assert r.status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert not _logged_out(booth.app, cookie)


def test_a_new_password_ends_the_logins_made_with_the_old_one(client, booth):
    log_in(client)
    copied = client.cookies[SESSION_COOKIE]
    new_password = "a whole new password"
    restarted = _rebuilt(
        booth, [StaffUser(username=STAFF, password_hash=hash_password(new_password))]
    )
    try:
        assert _logged_out(restarted.app, copied)
        with TestClient(restarted.app) as c:  # and the new password logs in
            r = c.post("/api/login", json={"username": STAFF, "password": new_password})
            assert r.status_code == 200
            assert c.get("/api/sessions").status_code == 200
    finally:
        restarted.repo.close()


def test_a_removed_user_is_logged_out_and_the_others_stay(client, booth):
    log_in(client)
    copied = client.cookies[SESSION_COOKIE]
    other = StaffUser(username="other", password_hash=hash_password("other password"))
    with_other = _rebuilt(booth, [*booth.settings.web.staff, other])
    try:
        with TestClient(with_other.app) as c:
            c.post("/api/login", json={"username": "other", "password": "other password"})
            others_cookie = c.cookies[SESSION_COOKIE]
    finally:
        with_other.repo.close()
    without_staff = _rebuilt(booth, [other])
    try:
        assert _logged_out(without_staff.app, copied)
        assert not _logged_out(without_staff.app, others_cookie)
    finally:
        without_staff.repo.close()


def test_booth_staff_logout_ends_every_login_of_that_user_at_once(client, booth, tmp_path, capsys):
    log_in(client)
    first = client.cookies[SESSION_COOKIE]
    with TestClient(booth.app) as second_tablet:
        log_in(second_tablet)
        second = second_tablet.cookies[SESSION_COOKIE]
    config = tmp_path / "booth.yaml"
    config.write_text(yaml.safe_dump(booth.settings.model_dump(mode="json")))

    assert cli.main(["staff", "logout", STAFF, "--config", str(config)]) == 0
    assert f"{STAFF}: ended 2 logins" in capsys.readouterr().out
    assert _logged_out(booth.app, first) and _logged_out(booth.app, second)
    assert cli.main(["staff", "logout", STAFF, "--config", str(config)]) == 0
    assert f"{STAFF}: ended 0 logins" in capsys.readouterr().out


def test_a_cookie_from_before_logins_were_stored_logs_nobody_in(booth):
    # The old format ({user, csrf}), correctly signed: it names no login row.
    old = CookieSigner(SECRET_KEY).dumps({"user": STAFF, "csrf": "c"})
    assert _logged_out(booth.app, old)


def test_a_login_at_another_booth_on_the_same_database_does_not_open_this_one(booth):
    other_booth = booth.settings.model_copy(deep=True)
    other_booth.booth.id = "booth-2"
    other_booth.agent.booth_id = "booth-2"
    built = build_app(other_booth)
    try:
        with TestClient(built.app) as c:
            log_in(c)
            cookie = c.cookies[SESSION_COOKIE]
        assert not _logged_out(built.app, cookie)
    finally:
        built.repo.close()
    assert _logged_out(booth.app, cookie)


def test_logins_older_than_a_cookie_lives_are_forgotten_at_the_next_login(client, booth):
    old = time.time() - SESSION_MAX_AGE_S - 60
    booth.repo.insert_staff_login(
        id_sha256="0" * 64,
        booth_id="booth-1",
        username=STAFF,
        password_hash_sha256="x",
        created_at=old,
        forget_before=0.0,
    )
    booth.repo.insert_staff_login(
        id_sha256="1" * 64,
        booth_id="booth-2",  # another booth's are its own to forget
        username=STAFF,
        password_hash_sha256="x",
        created_at=old,
        forget_before=0.0,
    )
    log_in(client)
    kept = {r["id_sha256"] for r in _login_rows(booth)}
    assert "0" * 64 not in kept and "1" * 64 in kept and len(kept) == 2


def test_a_staff_request_costs_one_primary_key_read(client, booth):
    log_in(client)
    statements: list[str] = []
    listen = lambda conn, cur, statement, *_: statements.append(statement)  # noqa: E731
    event.listen(booth.repo.engine, "before_cursor_execute", listen)
    try:
        assert client.get("/api/references").status_code == 200  # touches no other table
    finally:
        event.remove(booth.repo.engine, "before_cursor_execute", listen)
    assert len(statements) == 1, statements
    sql = " ".join(statements[0].split())
    assert "FROM staff_logins WHERE staff_logins.id_sha256 =" in sql


def test_a_database_made_before_staff_logins_gets_the_table(tmp_path: Path):
    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine, tables=[t for t in metadata.sorted_tables if t is not staff_logins])
    assert "staff_logins" not in inspect(engine).get_table_names()
    engine.dispose()

    settings: BoothConfig = staff_settings(tmp_path, SqliteDatabase(path=path))
    built = build_app(settings)
    try:
        assert "staff_logins" in inspect(built.repo.engine).get_table_names()
        with TestClient(built.app) as c:
            log_in(c)
            assert c.get("/api/sessions").status_code == 200
    finally:
        built.repo.close()


def test_the_signer_refuses_a_cookie_past_its_max_age(monkeypatch):
    from types import SimpleNamespace

    from cloud_trainer.web import security

    signer = CookieSigner("s" * 32, max_age_s=60)
    value = signer.dumps({"login": "x", "csrf": "c"})
    assert signer.loads(value)["login"] == "x"
    real = time.time
    monkeypatch.setattr(
        security, "time", SimpleNamespace(time=lambda: real() + 61, monotonic=time.monotonic)
    )
    assert signer.loads(value) is None


def test_a_staff_cookie_past_its_max_age_is_logged_out_though_its_login_stands(booth, monkeypatch):
    from types import SimpleNamespace

    from cloud_trainer.web import security

    with TestClient(booth.app) as c:
        log_in(c)
        assert c.get("/api/sessions").status_code == 200
        real = time.time  # the cookie code's clock only, a day and a minute ahead
        ahead = SimpleNamespace(
            time=lambda: real() + SESSION_MAX_AGE_S + 60, monotonic=time.monotonic
        )
        monkeypatch.setattr(security, "time", ahead)
        assert c.get("/api/sessions").status_code == 401
        page = c.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"


def test_the_delete_form_needs_its_csrf_token_and_this_booths_session(client, booth):
    csrf = log_in(client)
    ours = th.new_session(booth.repo, booth_id=booth.settings.booth.id)
    theirs = th.new_session(booth.repo, booth_id="another-booth")
    for sid in (ours, theirs):
        booth.store.put(f"sessions/{sid}/frames/cam0/shard-00000000.bin", b"frames")
    for data in ({}, {"csrf": "not-the-token"}):
        r = client.post(f"/sessions/{ours}/delete", data=data, follow_redirects=False)
        assert r.status_code == 403
    assert booth.repo.get_session(ours)["state"] == "created"
    assert list(booth.store.list(f"sessions/{ours}/"))
    client.post(f"/sessions/{theirs}/delete", data={"csrf": csrf}, follow_redirects=False)
    assert not booth.repo.session_deleted(theirs)
    assert list(booth.store.list(f"sessions/{theirs}/"))
    r = client.post(f"/sessions/{ours}/delete", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and booth.repo.session_deleted(ours)


def test_an_api_delete_needs_the_csrf_header(client, booth):
    csrf = log_in(client)
    sid = th.new_session(booth.repo, booth_id=booth.settings.booth.id)
    assert client.delete(f"/api/sessions/{sid}").status_code == 403
    assert client.delete(f"/api/sessions/{sid}", headers={"X-CSRF-Token": "x"}).status_code == 403
    assert booth.repo.get_session(sid)["state"] == "created"
    r = client.delete(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 204 and booth.repo.session_deleted(sid)
