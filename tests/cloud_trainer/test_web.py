"""The web app through its real HTTP interface (FastAPI's TestClient)."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator

import pytest
import transport_helpers as th
from fastapi.testclient import TestClient
from gcs_signing import service_account_credentials, signed_params, signed_url_ends_at
from staff_app import (
    PASSWORD,
    STAFF,
    VIDEO,
    StaffApp,
    build_app,
    delivered_session,
    log_in,
    staff_settings,
)

from cloud_trainer import links
from cloud_trainer.config import BoothConfig, GcsStorage
from cloud_trainer.web import create_app
from edge_agent.config import ConfigError

LOCAL = ("127.0.0.1", 50000)  # the tablet's client address (metrics: a private one)


@pytest.fixture
def settings(tmp_path) -> BoothConfig:
    return staff_settings(tmp_path)


@pytest.fixture
def booth(settings) -> Iterator[StaffApp]:
    built = build_app(settings)
    yield built
    built.repo.close()


@pytest.fixture
def booth_on_each_db(tmp_path, db_config) -> Iterator[StaffApp]:
    """The app on SQLite and on PostgreSQL."""
    built = build_app(staff_settings(tmp_path, db_config))
    yield built
    built.repo.close()


@pytest.fixture
def client(booth):
    with TestClient(booth.app, client=LOCAL) as c:
        yield c


def new_session(client: TestClient, csrf: str, **overrides) -> dict:
    body = {
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "consent": True,
        "reference": "synthetic:warmup",
    }
    body.update(overrides)
    return client.post("/api/sessions", json=body, headers={"X-CSRF-Token": csrf})


def test_app_refuses_to_start_with_placeholder_secret(settings):
    settings.web.secret_key = "changethis"
    with pytest.raises(ConfigError, match="web.secret_key"):
        create_app(settings)


def test_pages_need_login_and_api_says_401(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/sessions").status_code == 401


def test_login_form_sets_a_signed_cookie_and_tampering_logs_out(client):
    r = client.post(
        "/login", data={"username": STAFF, "password": PASSWORD}, follow_redirects=False
    )
    assert r.status_code == 303
    assert client.get("/").status_code == 200
    cookie = client.cookies.get("booth_session")
    client.cookies.set("booth_session", cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"))
    assert client.get("/api/sessions").status_code == 401


def test_wrong_password_is_rate_limited(client):
    for _ in range(3):
        r = client.post("/api/login", json={"username": STAFF, "password": "nope"})
        assert r.status_code == 401
    r = client.post("/api/login", json={"username": STAFF, "password": PASSWORD})
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert "too many failed logins" in r.json()["detail"]


def test_mutations_need_the_csrf_token(client):
    csrf = log_in(client)
    r = client.post(
        "/api/sessions",
        json={"name": "A", "email": "a@example.org", "consent": True, "reference": "x"},
    )
    assert r.status_code == 403
    assert new_session(client, csrf).status_code == 201


def test_form_post_without_csrf_is_refused(client):
    log_in(client)
    r = client.post(
        "/sessions",
        data={"name": "A", "email": "a@example.org", "consent": "yes", "reference": "x"},
    )
    assert r.status_code == 403


def test_no_consent_no_session(client, booth):
    csrf = log_in(client)
    r = new_session(client, csrf, consent=False)
    assert r.status_code == 400 and "consent" in r.json()["detail"]
    assert booth.repo.list_sessions() == []


def test_no_consent_on_the_tablet_form_shows_the_reason(client):
    csrf = log_in(client)
    r = client.post(
        "/sessions", data={"name": "A", "email": "a@example.org", "reference": "x", "csrf": csrf}
    )
    assert r.status_code == 400
    assert (
        "consent" in r.text and 'value="a@example.org"' in r.text
    )  # the form keeps what staff typed


def test_a_refused_new_attendee_form_keeps_the_consent_tick(client):
    csrf = log_in(client)
    form = {"name": "A", "email": "a@example", "reference": "x", "consent": "yes", "csrf": csrf}
    r = client.post("/sessions", data=form)
    assert r.status_code == 400 and "“a@example” is not a valid email address" in r.text
    assert re.search(
        r'<input type="checkbox" id="consent" name="consent" value="yes" checked>', r.text
    )


def test_a_refused_resend_keeps_the_corrected_email_staff_typed(client, booth):
    csrf = log_in(client)
    sid = th.new_session(booth.repo, booth_id="booth-1")  # not delivered: resend is refused
    r = client.post(f"/sessions/{sid}/resend", data={"email": "ada@fixed.example", "csrf": csrf})
    assert r.status_code == 409
    assert re.search(r'<input type="email" id="resend-email"[^>]*value="ada@fixed.example"', r.text)


def test_a_failed_session_shows_the_stage_it_failed_in(client, booth):
    csrf = log_in(client)
    sid = th.new_session(booth.repo, booth_id="booth-1")
    for state in ("capturing", "uploaded", "training"):
        booth.repo.transition(sid, state)
    booth.repo.fail(sid, "the trainer ran out of memory")
    view = client.get(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).json()
    assert view["state"] == "failed" and view["stage_index"] == 3  # training
    page = client.get(f"/sessions/{sid}").text
    assert re.search(r'data-stage="3" class="failed"', page)
    assert re.search(r'data-stage="2" class="done"', page)


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "a@b",
        "x@example.org\r\nBcc: evil@example.org",
        "",
        "ada@gmail..com",  # the email's own check refused it, after training
        "ada@x-.example.org",
    ],
)
def test_invalid_email_is_refused(client, email):
    csrf = log_in(client)
    r = new_session(client, csrf, email=email)
    assert r.status_code == 400 and "email" in r.json()["detail"]


def test_header_injection_in_the_name_is_refused(client):
    csrf = log_in(client)
    r = new_session(client, csrf, name="Eve\r\nBcc: everyone@example.org")
    assert r.status_code == 400


def test_start_with_no_agents_online_is_refused_and_state_stays(client):
    csrf = log_in(client)
    sid = new_session(client, csrf).json()["id"]
    r = client.post(f"/api/sessions/{sid}/start", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409 and "no cameras" in r.json()["detail"]
    assert client.get(f"/api/sessions/{sid}").json()["state"] == "created"


def test_staff_see_and_touch_only_their_own_booths_sessions(client, booth):
    """Booths may share one database; an attendee of another booth is not this staff's."""
    import transport_helpers as th

    csrf = log_in(client)
    ours = new_session(client, csrf).json()["id"]
    theirs = th.new_session(booth.repo, booth_id="another-booth")
    listed = {s["id"] for s in client.get("/api/sessions").json()}
    assert ours in listed and theirs not in listed
    assert theirs not in client.get("/").text
    assert client.get(f"/api/sessions/{theirs}").status_code == 404
    assert client.get(f"/sessions/{theirs}").status_code == 404
    h = {"X-CSRF-Token": csrf}
    assert client.post(f"/api/sessions/{theirs}/start", headers=h).status_code == 404
    assert client.delete(f"/api/sessions/{theirs}", headers=h).status_code == 404
    assert booth.repo.get_session(theirs)["state"] == "created"  # untouched


def test_delete_twice_and_unknown_sessions(client, booth):
    csrf = log_in(client)
    sid = new_session(client, csrf).json()["id"]
    booth.store.put(f"sessions/{sid}/frames/cam0/shard-00000000.bin", b"frames")
    assert client.delete(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert list(booth.store.list(f"sessions/{sid}/")) == []
    assert client.delete(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert client.get(f"/api/sessions/{sid}").status_code == 404


def test_attendee_page_range_requests_and_delete_my_data(client, booth):
    repo, store = booth.repo, booth.store
    sid, token = delivered_session(repo, store)
    page = client.get(f"/v/{token}")
    assert page.status_code == 200 and "<video" in page.text and "Delete my data" in page.text
    # How long it stays, and a delete that the phone itself will not send unconfirmed.
    assert re.search(r"Here until \d{1,2} \w+ \d{4}, \d\d:\d\d \(.+?\): download it", page.text)
    assert re.search(r'<input type="checkbox" name="confirm"[^>]*required', page.text)
    whole = client.get(f"/v/{token}/video.mp4")
    assert whole.status_code == 200 and whole.content == VIDEO
    # Not cached: after "delete my data" or the link's end, a shared device must not
    # keep playing it from its cache.
    assert whole.headers["cache-control"] == "no-store"
    part = client.get(f"/v/{token}/video.mp4", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == "bytes 100-199/10240"
    tail = client.get(f"/v/{token}/video.mp4", headers={"Range": "bytes=-16"})
    assert tail.content == whole.content[-16:]
    assert (
        client.get(f"/v/{token}/video.mp4", headers={"Range": "bytes=999999-"}).status_code == 416
    )
    # Deleting needs the confirmation box.
    assert client.post(f"/v/{token}/delete", data={}).status_code == 400
    r = client.post(f"/v/{token}/delete", data={"confirm": "yes"})
    assert r.status_code == 200 and "deleted" in r.text
    assert client.get(f"/v/{token}").status_code == 410
    assert client.get(f"/v/{token}/video.mp4").status_code == 410
    assert list(store.list(f"sessions/{sid}/")) == []
    assert client.post(f"/v/{token}/delete", data={"confirm": "yes"}).status_code == 410


def test_staff_watch_the_video_behind_their_login_and_the_link_is_not_kept(client, booth):
    """The tablet showed the attendee's own link, kept in plain text in the database (a
    leaked backup held every working link) and one tap from its "delete my data"."""
    import transport_helpers as th

    repo, store = booth.repo, booth.store
    sid, _ = delivered_session(repo, store)
    assert client.get(f"/sessions/{sid}/video.mp4", follow_redirects=False).status_code == 303
    csrf = log_in(client)
    view = client.get(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).json()
    assert view["video_url"] == f"/sessions/{sid}/video.mp4" and "link_url" not in view
    page = client.get(f"/sessions/{sid}")
    assert f'href="/sessions/{sid}/video.mp4"' in page.text and "/v/" not in page.text
    r = client.get(view["video_url"], headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == VIDEO[:100]
    other = th.new_session(repo, booth_id="booth-2")
    assert client.get(f"/sessions/{other}/video.mp4").status_code == 404


def test_a_video_file_missing_from_storage_is_a_page_not_a_server_error(client, booth):
    repo, store = booth.repo, booth.store
    sid, token = delivered_session(repo, store)
    store.delete(f"sessions/{sid}/video/final.mp4")  # lost, or a delete under way
    r = client.get(f"/v/{token}/video.mp4", headers={"Accept": "text/html"})
    assert r.status_code == 404 and "missing" in r.text and "reply to the email" in r.text
    assert client.get(f"/v/{token}/download").status_code == 404
    # The page says so too, instead of a black player that never starts.
    page = client.get(f"/v/{token}")
    assert page.status_code == 200 and 'id="missing"' in page.text
    assert "<video" not in page.text and 'id="download"' not in page.text


def test_tampered_and_revoked_links(client, booth):
    repo, store = booth.repo, booth.store
    _, token = delivered_session(repo, store)
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert client.get(f"/v/{tampered}").status_code == 404
    page = client.get(f"/v/{tampered}", headers={"Accept": "text/html"})
    # A page for the attendee, not a way to the staff login.
    assert "whole link from your email" in page.text and 'href="/"' not in page.text
    links.revoke(repo, token)
    revoked = client.get(f"/v/{token}")
    assert revoked.status_code == 410 and "newer email" in revoked.text


def test_an_expired_link_says_what_happened_and_what_the_attendee_can_do(client, booth):
    repo, store = booth.repo, booth.store
    sid, _ = delivered_session(repo, store)
    expired = links.create_link(repo, sid, expiry_days=1, now=time.time() - 2 * 86400)
    r = client.get(f"/v/{expired.token}")
    assert r.status_code == 410
    assert "time is up" in r.text and "revoked" not in r.text


def test_a_truncated_link_or_unknown_path_is_a_page_not_json(client, booth):
    for path in ("/v/", "/no/such/page"):
        r = client.get(path, headers={"Accept": "text/html"})
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "Something is not right" in r.text
    # The API keeps answering JSON.
    r = client.get("/api/no-such-thing", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_the_delete_url_opened_again_leads_to_the_videos_page(client, booth):
    """After a delete the address bar shows /v/<token>/delete: reopened or shared, it is
    the page that says the data is gone, not a "Method Not Allowed"."""
    repo, store = booth.repo, booth.store
    _, token = delivered_session(repo, store)
    r = client.get(f"/v/{token}/delete", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/v/{token}"
    assert client.post(f"/v/{token}/delete", data={"confirm": "yes"}).status_code == 200
    gone = client.get(f"/v/{token}/delete")
    assert gone.status_code == 410 and "Deleted" in gone.text


@pytest.fixture
def gcs_booth(tmp_path, gcs_emulator) -> Iterator[StaffApp]:
    """The app on a GCS emulator bucket, with a store that can sign URLs (as on GCP).

    ``store`` is the emulator's anonymous client (it writes; the signing one cannot
    reach Google for a token), on the same bucket as the app's signing store.
    """
    from cloud_trainer.repository import Repository
    from cloud_trainer.storage import create_blob_store
    from cloud_trainer.storage.gcs import GcsBlobStore

    settings = staff_settings(tmp_path)
    settings.storage = GcsStorage(
        bucket=gcs_emulator.new_bucket(),
        project=gcs_emulator.project,
        endpoint=gcs_emulator.endpoint,
    )
    signer = GcsBlobStore(
        settings.storage.bucket,
        project=settings.storage.project,
        endpoint=settings.storage.endpoint,
        credentials=service_account_credentials(),
    )
    repo = Repository.from_config(settings.database)
    app = create_app(settings, repo=repo, store=signer, references=lambda: [], deliverer=None)
    yield StaffApp(app=app, repo=repo, store=create_blob_store(settings.storage), settings=settings)
    repo.close()


def _redirect(client: TestClient, path: str) -> str:
    r = client.get(path, follow_redirects=False)
    assert r.status_code == 307, (r.status_code, r.text)
    assert r.headers["cache-control"] == "no-store"  # the next visit asks the link again
    return r.headers["location"]


def test_download_on_gcs_redirects_to_a_url_that_downloads(gcs_booth):
    _, token = delivered_session(gcs_booth.repo, gcs_booth.store)
    with TestClient(gcs_booth.app) as client:
        url = _redirect(client, f"/v/{token}/download")
        params = signed_params(url)
        assert params["response-content-disposition"] == 'attachment; filename="dancebooth.mp4"'
        assert params["response-content-type"] == "video/mp4"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.headers["Content-Disposition"].startswith("attachment;")
            assert r.read() == VIDEO
        # Watching plays inline: no attachment on the video or the poster.
        for path, media_type in (("video.mp4", "video/mp4"), ("poster.jpg", "image/jpeg")):
            params = signed_params(_redirect(client, f"/v/{token}/{path}"))
            assert "response-content-disposition" not in params
            assert params["response-content-type"] == media_type


def test_gcs_redirects_live_minutes_and_never_outlive_the_link(gcs_booth):
    repo = gcs_booth.repo
    sid, month_token = delivered_session(repo, gcs_booth.store)
    # A link made 30 days minus 90 s ago: 90 s of its 30 days are left.
    ending = links.create_link(repo, sid, expiry_days=30, now=time.time() - 30 * 86400 + 90)
    with TestClient(gcs_booth.app) as client:
        for path in ("download", "video.mp4", "side-by-side.mp4", "poster.jpg"):
            url = _redirect(client, f"/v/{month_token}/{path}")
            assert int(signed_params(url)["X-Goog-Expires"]) == links.SIGNED_URL_MAX_S <= 300
            url = _redirect(client, f"/v/{ending.token}/{path}")
            assert 0 < int(signed_params(url)["X-Goog-Expires"]) <= 90
            assert signed_url_ends_at(url) <= ending.expires_at
        # Revoked or expired: no new URL, whichever route asks.
        links.revoke(repo, ending.token)
        expired = links.create_link(repo, sid, expiry_days=1, now=time.time() - 86400)
        for token in (ending.token, expired.token):
            r = client.get(f"/v/{token}/download", follow_redirects=False)
            assert r.status_code == 410 and "location" not in r.headers


def test_health_and_metrics_move(client, booth):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["ready"] is True
    before = client.get("/metrics").text
    assert not re.search(r'booth_sessions\{state="created"\} [1-9]', before)
    csrf = log_in(client)
    new_session(client, csrf)
    after = client.get("/metrics").text
    assert 'booth_sessions{state="created"} 1.0' in after
    assert (
        "booth_queue_depth" in after or "booth_emails" in after or "booth_frames_ingested" in after
    )


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_metrics_are_this_booths_and_say_what_an_alert_needs(client, booth):
    import transport_helpers as th

    repo, ours = booth.repo, booth.settings.booth.id
    now = time.time()
    # Another booth's camera and session, in the same database: not ours to report.
    repo.upsert_agent("booth-2", "cam0", state="idle", last_seen=now)
    th.new_session(repo, booth_id="booth-2")
    repo.upsert_agent(
        ours,
        "cam0",
        state="idle",
        last_seen=now,
        status={"upload_behind": True, "spool_bytes": "4096"},
    )
    repo.upsert_agent(ours, "cam1", state="idle", last_seen=now - 120)  # gone quiet
    done, waiting = (th.new_session(repo, booth_id=ours) for _ in range(2))
    for sid in (done, waiting):
        repo.transition(sid, "capturing")
        repo.transition(sid, "uploaded")
    finished = repo.create_job(done)
    repo.start_job(finished, "w1")
    repo.finish_job(finished)
    repo.create_job(waiting)

    m = _samples(client.get("/metrics").text)
    assert m["booth_agents_online"] == 1
    assert m['booth_agent_up{camera="cam0"}'] == 1 and m['booth_agent_up{camera="cam1"}'] == 0
    assert m['booth_agent_last_seen_age_seconds{camera="cam1"}'] >= 120
    assert m['booth_agent_upload_behind{camera="cam0"}'] == 1
    assert m['booth_agent_spool_bytes{camera="cam0"}'] == 4096
    # Finished jobs are not queue depth (they stay for the retention period).
    assert m['booth_queue_depth{state="queued"}'] == 1
    assert m['booth_queue_depth{state="running"}'] == 0
    assert 'booth_queue_depth{state="done"}' not in m
    assert 0 <= m["booth_job_oldest_queued_age_seconds"] < 60
    assert m["booth_job_running_quiet_seconds"] == 0  # none runs

    # A worker that died mid-job: its job stays "running", its beat ages.
    from sqlalchemy import update as sql_update

    from cloud_trainer.repository.schema import job_beats

    stalled = th.new_session(repo, booth_id=ours)
    repo.transition(stalled, "capturing")
    repo.transition(stalled, "uploaded")
    job = repo.create_job(stalled)
    repo.start_job(job, "w-dead")
    with repo.engine.begin() as conn:
        conn.execute(sql_update(job_beats).values(beat_at=now - 900))
    m = _samples(client.get("/metrics").text)
    assert 900 <= m["booth_job_running_quiet_seconds"] < 960
    assert m['booth_sessions{state="uploaded"}'] == 3
    assert m.get('booth_sessions{state="created"}', 0) == 0  # booth-2's
    assert m["booth_database_up"] == 1


def test_openapi_lists_the_json_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in (
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/start",
        "/v/{token}/video.mp4",
    ):
        assert p in paths


def _counter_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the counter families in a /metrics page, keyed by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.type == "counter"
        for s in family.samples
        if s.name.endswith("_total")
    }


def test_metrics_counters_do_not_drop_when_a_session_is_deleted(booth_on_each_db):
    repo = booth_on_each_db.repo
    with TestClient(booth_on_each_db.app, client=LOCAL) as client:
        csrf = log_in(client)
        sid = new_session(client, csrf).json()["id"]
        repo.open_take(sid, "cam0")
        frame = {"capture_ts_ns": 1, "shard_key": "k", "offset": 0, "length": 1, "sha256": "0" * 64}
        frames = [{**frame, "seq": s} for s in range(4)]
        frames[2]["length"] = 0  # corrupt at capture: stored as an empty record
        repo.commit_shard(sid, "cam0", frames, [], durable_seq=3, pose_durable_seq=-1)
        repo.update_job_progress(repo.create_job(sid), stage_seconds={"training": 12.0})
        row = repo.enqueue_email(
            sid,
            email={
                "message_id": "<m@booth>",
                "to_addr": "ada@example.org",
                "subject": "s",
                "body_text": "t",
                "body_html": "h",
            },
        )
        repo.claim_emails(time.time(), lease_s=60)
        repo.mark_email_sent(row, time.time())
        before = _counter_samples(client.get("/metrics").text)
        assert before[("booth_frames_ingested_total", (("camera", "cam0"),))] == 4
        assert before[("booth_frames_lost_total", (("camera", "cam0"),))] == 1
        assert before[("booth_job_stage_seconds_total", (("stage", "training"),))] == 12
        assert before[("booth_emails_total", (("state", "sent"),))] == 1

        r = client.delete(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf})
        assert r.status_code == 204 and repo.list_takes(sid) == [] and repo.emails() == []

        assert _counter_samples(client.get("/metrics").text) == before


def _check_documented(openapi: dict, method: str, template: str, r) -> None:
    """The response's status, content type, required headers and error body are in the OpenAPI."""
    responses = openapi["paths"][template][method]["responses"]
    where = f"{method.upper()} {template} {r.status_code}"
    assert str(r.status_code) in responses, f"{where} undocumented: {sorted(responses)}"
    documented = responses[str(r.status_code)]
    media = r.headers.get("content-type", "").split(";")[0]
    if r.content:
        assert media in documented.get("content", {}), f"{where}: {media}"
    for name, header in documented.get("headers", {}).items():
        assert not header.get("required") or name in r.headers, f"{where}: no {name}"
    if media == "application/json" and r.status_code >= 400:
        assert list(r.json()) == ["detail"] and isinstance(r.json()["detail"], str), r.text


def test_every_error_the_api_answers_is_documented_in_the_openapi(client, booth):
    """The fuzz runs logged in with a CSRF token; this reaches the refusals it cannot."""
    repo, store = booth.repo, booth.store
    openapi = client.get("/openapi.json").json()
    checked = set()

    def check(method: str, template: str, r, status: int) -> None:
        assert r.status_code == status, f"{method} {template}: {r.status_code} {r.text[:200]}"
        _check_documented(openapi, method, template, r)
        checked.add(status)

    check("get", "/api/sessions", client.get("/api/sessions"), 401)
    check("get", "/api/agents", client.get("/api/agents"), 401)
    for status in (401, 401, 401, 429):
        r = client.post("/api/login", json={"username": STAFF, "password": "nope"})
        check("post", "/api/login", r, status)
    # Staff would wait a minute for the throttle; the test forgets the failures instead.
    client.app.state.services.throttle.succeeded(LOCAL[0], STAFF)
    csrf = log_in(client)
    body = {"name": "A", "email": "a@example.org", "consent": True, "reference": "r"}
    check("post", "/api/sessions", client.post("/api/sessions", json=body), 403)
    check("post", "/api/sessions", new_session(client, csrf, consent=False), 400)
    sid = new_session(client, csrf).json()["id"]
    unknown = "0" * 32
    headers = {"X-CSRF-Token": csrf}
    check("get", "/api/sessions/{session_id}", client.get(f"/api/sessions/{unknown}"), 404)
    r = client.post(f"/api/sessions/{sid}/start", headers=headers)
    check("post", "/api/sessions/{session_id}/start", r, 409)
    r = client.post(f"/api/sessions/{sid}/resend", headers=headers, json={})
    check("post", "/api/sessions/{session_id}/resend", r, 409)
    r = client.delete(f"/api/sessions/{unknown}", headers=headers)
    check("delete", "/api/sessions/{session_id}", r, 404)

    _, token = delivered_session(repo, store)
    check("get", "/v/{token}", client.get(f"/v/{token[:-1]}x"), 404)
    r = client.get(f"/v/{token}/video.mp4", headers={"Range": "bytes=5-9"})
    check("get", "/v/{token}/video.mp4", r, 206)
    r = client.get(f"/v/{token}/download", headers={"Range": "bytes=999999-"})
    check("get", "/v/{token}/download", r, 416)
    check("post", "/v/{token}/delete", client.post(f"/v/{token}/delete", data={}), 400)
    links.revoke(repo, token)
    check("get", "/v/{token}/poster.jpg", client.get(f"/v/{token}/poster.jpg"), 410)
    assert checked == {206, 400, 401, 403, 404, 409, 410, 416, 429}


def test_the_cookie_is_secure_when_the_booth_is_published_over_https(settings):
    # TLS ends at a proxy that talks plain http to the app: the cookie is Secure anyway.
    settings.web.base_url = "https://booth.example.org"
    built = build_app(settings)
    try:
        with TestClient(built.app) as c:
            r = c.post("/api/login", json={"username": STAFF, "password": PASSWORD})
            assert r.status_code == 200
            assert "secure" in r.headers["set-cookie"].lower()
    finally:
        built.repo.close()
    plain = build_app(staff_settings(settings.database.path.parent / "plain"))
    try:
        with TestClient(plain.app) as c:  # http base_url, http request: no Secure flag
            r = c.post("/api/login", json={"username": STAFF, "password": PASSWORD})
            assert "secure" not in r.headers["set-cookie"].lower()
    finally:
        plain.repo.close()


def test_an_unknown_username_costs_a_password_check_too(client, monkeypatch):
    from cloud_trainer.web.routes import auth

    checked = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda h, p: checked.append(h) or real(h, p))
    assert (
        client.post("/api/login", json={"username": "nobody", "password": "x"}).status_code == 401
    )
    assert len(checked) == 1  # the same argon2 work as a real user's wrong password


def test_over_long_login_fields_are_refused_before_any_work(client):
    r = client.post("/api/login", json={"username": "a" * 100_000, "password": "x"})
    assert r.status_code == 422
    # The tablet's form: a page that says so, not the framework's JSON.
    page = client.post("/login", data={"username": "a" * 100, "password": "x"})
    assert page.status_code == 400 and "wrong username or password" in page.text
    assert "<form" in page.text and "a" * 65 not in page.text


def test_the_login_throttle_limits_a_name_across_addresses_and_stays_bounded():
    from cloud_trainer.web.security import LoginThrottle

    now = [0.0]
    t = LoginThrottle(2, clock=lambda: now[0])
    # One name guessed from many addresses: the wide limit (2 x WIDE) stops it.
    for i in range(2 * t.WIDE):
        assert t.attempt(f"10.0.0.{i}", "staff")[0] == 0.0  # let in, and it fails
    assert t.retry_after_s("10.9.9.9", "staff") > 0
    now[0] += 61
    assert t.retry_after_s("10.9.9.9", "staff") == 0.0
    # A flood of new names fills at most MAX_KEYS entries, then new keys wait (fail closed).
    flood = LoginThrottle(2, clock=lambda: now[0])
    flood.MAX_KEYS = 50
    for i in range(200):
        flood.attempt(f"172.16.{i}.1", f"user{i}")
    assert len(flood._failures) <= 50  # noqa: SLF001
    assert flood.retry_after_s("192.168.1.1", "staff") == 60.0
    now[0] += 61  # the window forgets the flood: room again
    assert flood.retry_after_s("192.168.1.1", "staff") == 0.0


def test_logins_checked_at_the_same_time_cannot_get_past_the_throttle_together():
    """Each attempt counts from its start: a burst of logins in the thread pool all saw
    the counter before any had failed, and 20 guesses got through a limit of 3."""
    from cloud_trainer.web.security import LoginThrottle

    now = [0.0]
    t = LoginThrottle(3, clock=lambda: now[0])
    started = [t.attempt("10.0.0.1", "staff") for _ in range(20)]  # none finished yet
    assert sum(1 for wait, _ in started if wait == 0) == 3
    assert all(wait > 0 for wait, _ in started[3:])
    # A success takes its own attempt back, in the name-wide count too.
    ok = LoginThrottle(3, clock=lambda: now[0])
    for _ in range(5):
        wait, stamp = ok.attempt("10.0.0.2", "staff")
        assert wait == 0
        ok.succeeded("10.0.0.2", "staff", stamp)
    assert ok._failures == {}  # noqa: SLF001


def test_every_response_carries_the_security_headers(client):
    csrf = log_in(client)
    page = client.get("/")
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-robots-tag"] == "noindex, nofollow"  # a shared link stays unlisted
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"  # a shared tablet's back button
    api = client.get("/api/sessions", headers={"X-CSRF-Token": csrf})
    assert api.headers["x-content-type-options"] == "nosniff" and "no-store" not in api.headers.get(
        "cache-control", ""
    )
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp + ";"  # no inline code runs, injected or not
    sid = new_session(client, csrf).json()["id"]
    for html in (page.text, client.get(f"/sessions/{sid}").text, client.get("/login").text):
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []  # every script is a file
        assert not re.search(r"\son(submit|click|load|error)=", html)
    docs = client.get("/docs")  # Swagger's bundle comes from a CDN: no CSP there
    assert docs.status_code == 200 and "content-security-policy" not in docs.headers


def test_a_double_tap_on_delete_my_data_answers_deleted_twice(booth_on_each_db):
    """Two deletes of one session overlap (a double tap): neither may end in a 500."""
    repo, store = booth_on_each_db.repo, booth_on_each_db.store
    sid, token = delivered_session(repo, store)
    desk = booth_on_each_db.app.state.services.desk
    remove_blobs = desk.delete_blobs
    inner: list[Exception | None] = []
    taps = []

    def blobs_then_the_second_tap(session_id: str) -> None:
        remove_blobs(session_id)
        taps.append(session_id)
        if len(taps) == 1:  # the second request runs while the first is between its steps
            try:
                desk.delete(session_id)
                inner.append(None)
            except Exception as e:  # noqa: BLE001 - reported by the assert below
                inner.append(e)

    desk.delete_blobs = blobs_then_the_second_tap
    with TestClient(booth_on_each_db.app, client=LOCAL) as client:
        r = client.post(f"/v/{token}/delete", data={"confirm": "yes"})
        assert r.status_code == 200 and "were deleted" in r.text, r.text
        assert inner == [None]
        assert client.get(f"/v/{token}").status_code == 410
        # A tap that arrives after both: the link is gone, said as a page, not an error.
        again = client.post(f"/v/{token}/delete", data={"confirm": "yes"})
        assert again.status_code == 410
    assert list(store.list(f"sessions/{sid}/")) == []


def test_a_delete_that_fails_midway_changes_nothing_so_the_attendee_can_retry(
    booth_on_each_db, monkeypatch
):
    """The links' tombstones, the emails and the session go in one transaction."""
    import cloud_trainer.repository.sessions as session_rows
    from cloud_trainer.repository.schema import outbox

    repo, store = booth_on_each_db.repo, booth_on_each_db.store
    desk = booth_on_each_db.app.state.services.desk
    sid, token = delivered_session(repo, store)
    email = {"message_id": "<mail-1@booth>", "to_addr": "ada@example.com"}
    repo.enqueue_email(sid, email={**email, "subject": "s", "body_text": "t", "body_html": "h"})

    def database_gone(conn, session_id):
        raise RuntimeError("the database connection dropped")

    monkeypatch.setattr(session_rows, "retire_session_counts", database_gone)
    with pytest.raises(RuntimeError):
        desk.delete(sid)
    monkeypatch.undo()
    assert repo.get_session(sid)["email"] == "ada@example.com"  # still all there
    with TestClient(booth_on_each_db.app, client=LOCAL) as client:
        assert client.get(f"/v/{token}").status_code == 200  # not "deleted": retry works
        r = client.post(f"/v/{token}/delete", data={"confirm": "yes"})
        assert r.status_code == 200 and "were deleted" in r.text
        assert client.get(f"/v/{token}").status_code == 410
    with repo.engine.connect() as conn:
        assert conn.execute(outbox.select()).all() == []


def test_data_goes_when_its_link_expires_or_an_undelivered_session_is_old(booth_on_each_db):
    """The consent promises: kept until the attendee deletes it or the link expires."""
    import transport_helpers as th
    from sqlalchemy import update

    from cloud_trainer.repository.schema import links as links_table
    from cloud_trainer.repository.schema import sessions

    repo, store = booth_on_each_db.repo, booth_on_each_db.store
    desk = booth_on_each_db.app.state.services.desk
    now = time.time()
    expired, _ = delivered_session(repo, store)
    kept, _ = delivered_session(repo, store)
    old_failed = th.new_session(repo, booth_id=desk.booth_id)
    recent = th.new_session(repo, booth_id=desk.booth_id)
    with repo.engine.begin() as conn:
        conn.execute(
            update(links_table)
            .where(links_table.c.session_id == expired)
            .values(expires_at=now - 1)
        )
        conn.execute(
            update(sessions).where(sessions.c.id == old_failed).values(created_at=now - 31 * 86400)
        )
    keep_s = 30 * 86400
    assert desk.expired(keep_s, now) == sorted([expired, old_failed])
    assert desk.delete_expired(keep_s, now) == 2
    assert list(store.list(f"sessions/{expired}/")) == []
    assert repo.session_deleted(expired) and repo.session_deleted(old_failed)
    assert repo.get_session(kept)["state"] == "delivered" and repo.get_session(recent)
    assert list(store.list(f"sessions/{kept}/"))
    assert desk.delete_expired(keep_s, now) == 0  # nothing left to do


def test_start_again_after_a_failed_take_makes_a_fresh_session_for_the_attendee(client, booth):
    csrf = log_in(client)
    headers = {"X-CSRF-Token": csrf}
    old = new_session(client, csrf, name="Grace Hopper", email="grace@example.org").json()["id"]
    booth.repo.transition(old, "capturing")
    booth.repo.fail(old, "camera cam1 never finished uploading")
    # The boards film a session once: starting the failed one again is refused, with why.
    r = client.post(f"/api/sessions/{old}/start", headers=headers)
    assert r.status_code == 409 and "Start again" in r.json()["detail"]
    page = client.get(f"/sessions/{old}")
    assert f'action="/sessions/{old}/again"' in page.text and "Start again" in page.text
    r = client.post(f"/api/sessions/{old}/again", headers=headers)
    assert r.status_code == 201, r.text
    fresh = r.json()
    assert fresh["id"] != old and fresh["state"] == "created"
    assert (fresh["name"], fresh["email"]) == ("Grace Hopper", "grace@example.org")
    assert fresh["reference"] == "synthetic:warmup"
    assert client.get(f"/api/sessions/{old}").status_code == 404  # no second copy of them
    # A second tablet still on the old session's page is led to the new one (its poll
    # of the API sees 404 and reloads the page's own URL).
    r = client.get(f"/sessions/{old}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sessions/{fresh['id']}"
    assert "/sessions/${sid}" in client.get("/static/session.js").text
    # Only a failed take is started again.
    r = client.post(f"/api/sessions/{fresh['id']}/again", headers=headers)
    assert r.status_code == 409
    # Started again twice: the first failed session leads to the newest one.
    booth.repo.transition(fresh["id"], "capturing")
    booth.repo.fail(fresh["id"], "camera cam1 never finished uploading")
    third = client.post(f"/api/sessions/{fresh['id']}/again", headers=headers).json()["id"]
    for gone in (old, fresh["id"]):
        r = client.get(f"/sessions/{gone}", follow_redirects=False)
        assert r.headers["location"] == f"/sessions/{third}"
    # Deleted, the pointers go with it: the old pages lead home, which says why.
    assert client.delete(f"/api/sessions/{third}", headers=headers).status_code in (200, 204)
    for gone in (old, fresh["id"], third):
        r = client.get(f"/sessions/{gone}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/?gone=1"
    assert client.get("/sessions/" + "0" * 32, follow_redirects=False).status_code == 404


def test_the_start_again_form_sent_twice_leads_to_the_new_session_not_a_404(client, booth):
    """A start that failed leaves the tablet on the form's URL: a reload sends it again."""
    csrf = log_in(client)
    old = new_session(client, csrf).json()["id"]
    booth.repo.transition(old, "capturing")
    booth.repo.fail(old, "camera cam1 never finished uploading")
    first = client.post(f"/sessions/{old}/again", data={"csrf": csrf}, follow_redirects=False)
    fresh = booth.repo.successor_of(old, booth.settings.booth.id)
    assert fresh is not None and first.status_code in (303, 409)
    again = client.post(f"/sessions/{old}/again", data={"csrf": csrf}, follow_redirects=False)
    assert again.status_code == 303 and again.headers["location"] == f"/sessions/{fresh}"


def test_the_tablets_today_starts_at_midnight_where_the_booth_stands():
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from cloud_trainer.web.routes.sessions import _today_start

    for tz in ("Pacific/Kiritimati", "UTC", "Pacific/Pago_Pago"):  # UTC+14 ... UTC-11
        start = datetime.fromtimestamp(_today_start(tz), ZoneInfo(tz))
        assert (start.hour, start.minute) == (0, 0)
        assert start.date() == datetime.now(ZoneInfo(tz)).date()


def test_staff_can_go_on_without_a_camera_whose_upload_never_came(client, booth):
    """cam1's board went away mid-upload: the session trains on cam0's take instead of
    waiting out the upload deadline or having the attendee dance again."""
    csrf = log_in(client)
    sid = new_session(client, csrf).json()["id"]
    booth.repo.transition(sid, "capturing", cameras=["cam0", "cam1"])
    for cam in ("cam0", "cam1"):
        booth.repo.open_take(sid, cam, fps=120.0)
    go_on = f"/sessions/{sid}/go-on"
    r = client.post(go_on, data={"csrf": csrf})
    assert r.status_code == 409 and "still being filmed" in r.text  # the take is not over
    booth.repo.update_session(sid, capture_started_at=time.time() - 60)
    r = client.post(go_on, data={"csrf": csrf})
    assert r.status_code == 409 and "no camera has finished uploading" in r.text
    booth.repo.mark_take_uploaded(sid, "cam0")
    r = client.post(go_on, data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/sessions/{sid}"
    s = booth.repo.get_session(sid)
    assert (s["state"], s["cameras"]) == ("uploaded", ["cam0"])
    r = client.post(f"/api/sessions/{sid}/go-on", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 409  # once
    page = client.get(f"/sessions/{sid}")
    assert 'id="go-on"' in page.text and "Go on without it" in page.text


def test_going_on_without_a_camera_queues_the_training_at_once(booth):
    import transport_helpers as th

    from cloud_trainer.front_desk import FrontDesk

    queued: list[str] = []
    desk = FrontDesk(
        booth.repo, booth_id="booth-1", take_s=1.0, cameras=lambda: ["cam0"], enqueue=queued.append
    )
    sid = th.new_session(booth.repo, ("cam0", "cam1"), booth_id="booth-1")
    booth.repo.transition(sid, "capturing")
    booth.repo.open_take(sid, "cam0", fps=120.0)
    booth.repo.mark_take_uploaded(sid, "cam0")
    started = booth.repo.get_session(sid)["capture_started_at"]
    assert desk.go_on_without_missing(sid, now=started + 60) == ["cam0"]
    assert queued == [sid]


def test_readyz_says_not_ready_when_the_blob_store_hangs(client, booth, monkeypatch):
    """A store that stops answering (a GCS client retrying for a minute) used to hold the
    probe until the orchestrator gave up; it now reports the check that did not answer."""
    import threading

    from cloud_trainer.web.routes import health

    released = threading.Event()
    monkeypatch.setattr(health, "READY_CHECK_S", 0.2)
    monkeypatch.setattr(booth.store, "exists", lambda key: released.wait(30))
    try:
        r = client.get("/readyz")
    finally:
        released.set()
    assert r.status_code == 503
    assert r.json() == {"ready": False, "database": "ok", "storage": "error: no answer in 0.2 s"}


def test_the_tablet_says_which_references_still_need_review(booth):
    refs = [
        {"name": "salsa", "title": "salsa", "version": 2, "thumbnail_url": None, "flagged": 3},
        {"name": "tango", "title": "tango", "version": 1, "thumbnail_url": None, "flagged": 0},
    ]
    app = create_app(
        booth.settings,
        repo=booth.repo,
        store=booth.store,
        references=lambda: refs,
        deliverer=None,
    )
    with TestClient(app, client=LOCAL) as c:
        log_in(c)
        page = c.get("/").text
    salsa = page[page.index('value="salsa"') : page.index('value="tango"')]
    assert "needs review: 3 flagged frames" in salsa
    assert "needs review" not in page[page.index('value="tango"') :]


# ---- "Did you mean …?" ------------------------------------------------------------------


def _attendee_form(csrf: str, **extra) -> dict:
    form = {"name": "Ana", "reference": "x", "consent": "yes", "csrf": csrf}
    return {**form, **extra}


def test_a_likely_typo_in_the_email_domain_asks_before_creating_the_session(client, booth):
    csrf = log_in(client)
    r = client.post("/sessions", data=_attendee_form(csrf, email="ana@gmial.com"))
    assert r.status_code == 200 and booth.repo.list_sessions() == []
    assert "Did you mean <b>ana@gmail.com</b>?" in r.text
    assert re.search(r'name="use_suggestion" value="ana@gmail.com"', r.text)
    assert re.search(r'name="email_ok" value="ana@gmial.com"', r.text)
    assert 'value="Ana"' in r.text  # the rest of the form is kept

    # "Use ana@gmail.com"
    r = client.post(
        "/sessions",
        data=_attendee_form(csrf, email="ana@gmial.com", use_suggestion="ana@gmail.com"),
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert [s["email"] for s in booth.repo.list_sessions()] == ["ana@gmail.com"]


def test_staff_can_keep_an_address_that_looks_like_a_typo(client, booth):
    csrf = log_in(client)
    data = _attendee_form(csrf, email="ana@gmial.com", email_ok="ana@gmial.com")
    r = client.post("/sessions", data=data, follow_redirects=False)
    assert r.status_code == 303
    assert [s["email"] for s in booth.repo.list_sessions()] == ["ana@gmial.com"]


def test_an_answer_about_an_address_no_longer_in_the_field_is_not_taken(client, booth):
    """Staff retyped the field after the question: a stale Use/Keep must not apply."""
    csrf = log_in(client)
    stale_use = _attendee_form(csrf, email="bo@hotmial.com", use_suggestion="ana@gmail.com")
    r = client.post("/sessions", data=stale_use)
    assert r.status_code == 200 and "Did you mean <b>bo@hotmail.com</b>?" in r.text
    stale_keep = _attendee_form(csrf, email="bo@hotmial.com", email_ok="ana@gmial.com")
    r = client.post("/sessions", data=stale_keep)
    assert r.status_code == 200 and "Did you mean <b>bo@hotmail.com</b>?" in r.text
    assert booth.repo.list_sessions() == []


def test_the_api_refuses_a_likely_typo_unless_told_to_keep_it(client, booth):
    csrf = log_in(client)
    r = new_session(client, csrf, email="ana@gmail.con")
    assert r.status_code == 400 and "did you mean ana@gmail.com" in r.json()["detail"]
    r = new_session(client, csrf, email="ana@gmail.con", email_as_typed=True)
    assert r.status_code == 201 and r.json()["email"] == "ana@gmail.con"


def test_a_corrected_address_for_a_resend_is_checked_for_typos_too(client, booth):
    csrf = log_in(client)
    sid, _token = delivered_session(booth.repo, booth.store)
    resent: list[tuple[str, str | None]] = []
    booth.app.state.services.desk.resend_email = lambda s, email: resent.append((s, email))
    r = client.post(f"/sessions/{sid}/resend", data={"email": "ada@gmail.con", "csrf": csrf})
    assert r.status_code == 200 and "Did you mean <b>ada@gmail.com</b>?" in r.text
    assert re.search(r'id="resend-email"[^>]*value="ada@gmail.con"', r.text)
    assert resent == []
    r = client.post(
        f"/sessions/{sid}/resend",
        data={"email": "ada@gmail.con", "use_suggestion": "ada@gmail.com", "csrf": csrf},
        follow_redirects=False,
    )
    assert r.status_code == 303 and resent == [(sid, "ada@gmail.com")]


@pytest.mark.parametrize(
    ("typed", "stored"),
    [
        # As Chromium sends user@пример.рф from an <input type=email>.
        ("user@xn--e1afmkfd.xn--p1ai", "user@xn--e1afmkfd.xn--p1ai"),
        ("ada@münchen.de", "ada@xn--mnchen-3ya.de"),  # typed through the API
    ],
)
def test_an_internationalised_domain_is_taken(client, booth, typed, stored):
    csrf = log_in(client)
    r = new_session(client, csrf, email=typed)
    assert r.status_code == 201, r.text
    assert r.json()["email"] == stored


def test_letters_beyond_a_z_before_the_at_are_refused_saying_so(client, booth):
    csrf = log_in(client)
    r = new_session(client, csrf, email="josé@example.org")
    assert r.status_code == 400
    assert "letters beyond A-Z before the @" in r.json()["detail"]


def test_the_session_says_how_long_its_trainer_has_been_quiet(client, booth):
    """A worker killed mid-job leaves the job 'running' and the progress frozen: the view
    carries the age of the worker's last heartbeat, so the page can say so."""
    from sqlalchemy import update as sql_update

    from cloud_trainer.repository.schema import job_beats

    csrf = log_in(client)
    sid = th.new_session(booth.repo, booth_id="booth-1")
    for state in ("capturing", "uploaded", "training"):
        booth.repo.transition(sid, state)
    job = booth.repo.create_job(sid)
    view = client.get(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).json()
    assert view["trainer_quiet_s"] is None  # queued: no worker yet
    booth.repo.start_job(job, "w1")
    with booth.repo.engine.begin() as conn:
        conn.execute(sql_update(job_beats).values(beat_at=time.time() - 400))
    view = client.get(f"/api/sessions/{sid}", headers={"X-CSRF-Token": csrf}).json()
    assert 400 <= view["trainer_quiet_s"] < 460


def test_staff_see_an_internationalised_domain_in_its_own_letters(client, booth):
    """Stored as punycode (as the browser sends it), shown as the attendee knows it."""
    csrf = log_in(client)
    sid = new_session(client, csrf, email="user@xn--e1afmkfd.xn--p1ai").json()["id"]
    page = client.get(f"/sessions/{sid}").text
    assert "user@пример.рф" in page
