"""Fuzzing the web app over HTTP: schemathesis on its OpenAPI, plus what the OpenAPI omits.

Properties:
- schemathesis (schema-valid and schema-violating requests to every operation,
  logged in as staff, the attendee pages with a real link too) never gets a
  5xx, and every status code, JSON body, content type and required header it
  gets back is one the OpenAPI documents for that operation;
- a forged or mangled session cookie logs nobody in and never crashes a page;
- any session id in a staff URL (pages and API) is a 404, never a crash;
- any Range header on a video gets exactly the bytes it names (206), the whole
  video (200) or 416.

Bugs this found are regression tests at the end of the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest
from api_fuzz import FuzzTarget, fuzz_target, run_api_fuzz
from fastapi.testclient import TestClient
from fuzz_settings import examples, fuzz_marks, fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st
from staff_app import VIDEO

pytestmark = fuzz_marks()


@pytest.fixture
def target(tmp_path: Path):
    with fuzz_target(tmp_path) as t:
        yield t


@pytest.fixture
def client(target: FuzzTarget):
    with TestClient(target.app, raise_server_exceptions=False) as c:
        c.cookies.set("booth_session", target.cookie)
        yield c


def test_schemathesis_gets_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    result = run_api_fuzz(examples(share=0.15), tmp_dir=tmp_path)
    assert result["requests"] > 0 and result["operations"] >= 19
    assert result["server_errors"] == 0, "\n\n".join(result["failures"])
    assert result["undocumented_statuses"] == {}, result["undocumented_statuses"]
    assert result["schema_violations"] == 0, "\n\n".join(result["failures"])


_cookie_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters=";"), max_size=60
)


@fuzz_settings(share=1.0)
@given(value=_cookie_text | st.builds(lambda a, b: f"{a}.{b}", _cookie_text, _cookie_text))
def test_a_forged_session_cookie_logs_nobody_in_and_crashes_nothing(
    target: FuzzTarget, value: str
) -> None:
    with TestClient(target.app, raise_server_exceptions=False) as c:
        cookie = f"booth_session={value}".encode("latin-1")
        api = c.get("/api/sessions", headers={"cookie": cookie})
        page = c.get("/", headers={"cookie": cookie}, follow_redirects=False)
    if value == target.cookie:
        return
    assert api.status_code == 401, api.text
    assert page.status_code == 303 and page.headers["location"] == "/login"


_session_id = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="/?#"), min_size=1, max_size=30
) | st.sampled_from(["..", ".", "%2e%2e", "a b", "x\x00", "sessions", "\u2025", "0" * 40])


@fuzz_settings(share=1.0)
@given(session_id=_session_id)
def test_any_session_id_in_a_staff_url_is_a_404_never_a_crash(
    client: TestClient, target: FuzzTarget, session_id: str
) -> None:
    assume(session_id not in (".", ".."))  # the HTTP client resolves these dot segments itself
    sid = quote(session_id, safe="")
    csrf = {"X-CSRF-Token": target.csrf}
    form = {"csrf": target.csrf}
    responses = {
        "page": client.get(f"/sessions/{sid}"),
        "plot": client.get(f"/sessions/{sid}/plot.png"),
        "api": client.get(f"/api/sessions/{sid}"),
        "events": client.get(f"/api/sessions/{sid}/events"),
        "delete": client.delete(f"/api/sessions/{sid}", headers=csrf),
        "start": client.post(f"/api/sessions/{sid}/start", headers=csrf),
        "resend": client.post(f"/api/sessions/{sid}/resend", headers=csrf, json={}),
        "start form": client.post(f"/sessions/{sid}/start", data=form, follow_redirects=False),
        "delete form": client.post(f"/sessions/{sid}/delete", data=form, follow_redirects=False),
    }
    for name, r in responses.items():
        assert r.status_code < 500, f"{name} {session_id!r}: {r.status_code}"
    for name in ("page", "plot", "api", "events", "delete", "start", "resend", "start form"):
        assert responses[name].status_code == 404, f"{name} {session_id!r}"


_digits = st.text("0123456789", max_size=30) | st.sampled_from(["", "0", "99999999999999999999"])
_range = (
    st.builds(
        lambda unit, a, b, sp: f"{unit}{sp}={sp}{a}{sp}-{sp}{b}",
        st.sampled_from(["bytes", "BYTES", "items", "byte", ""]),
        _digits,
        _digits,
        st.sampled_from(["", " ", "\t"]),
    )
    | st.builds(lambda a, b: f"bytes={a},{b}", st.text("0123456789-", max_size=8), _digits)
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
)


@fuzz_settings(share=1.0)
@given(header=_range, path=st.sampled_from(["video.mp4", "side-by-side.mp4", "download"]))
def test_any_range_header_gets_the_named_bytes_the_whole_video_or_416(
    client: TestClient, target: FuzzTarget, header: str, path: str
) -> None:
    r = client.get(f"/v/{target.token}/{path}", headers={"Range": header})
    size = len(VIDEO)
    if r.status_code == 200:
        assert r.content == VIDEO
    elif r.status_code == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", r.headers["content-range"])
        assert m, r.headers["content-range"]
        start, end, total = map(int, m.groups())
        assert total == size and 0 <= start <= end < size
        assert r.content == VIDEO[start : end + 1]
    else:
        assert r.status_code == 416, f"{header!r}: {r.status_code}"
        assert r.headers["content-range"] == f"bytes */{size}"


# ---- bugs this found, kept as regression tests -------------------------------------------------------------------------------


def test_a_range_with_5000_digits_is_not_a_server_error(
    client: TestClient, target: FuzzTarget
) -> None:
    r = client.get(f"/v/{target.token}/video.mp4", headers={"Range": "bytes=" + "1" * 5000 + "-"})
    assert r.status_code < 500


@pytest.fixture
def pg_target(tmp_path: Path, pg_database_config):
    with (
        fuzz_target(tmp_path, pg_database_config) as t,
        TestClient(t.app, raise_server_exceptions=False) as c,
    ):
        c.cookies.set("booth_session", t.cookie)
        yield t, c


@pytest.mark.parametrize("request_name", ["get", "delete", "create"])
def test_a_nul_byte_is_not_a_server_error_on_postgres(pg_target, request_name: str) -> None:
    target, client = pg_target
    csrf = {"X-CSRF-Token": target.csrf}
    if request_name == "get":
        r = client.get("/api/sessions/x%00")
    elif request_name == "delete":
        r = client.delete("/api/sessions/x%00", headers=csrf)
    else:
        body = {"name": "Ada", "email": "ada@example.org", "consent": True, "reference": "r\x00"}
        r = client.post("/api/sessions", json=body, headers=csrf)
    assert r.status_code < 500


def test_an_agent_reporting_nan_fps_does_not_break_the_agent_list(target: FuzzTarget) -> None:
    # Found by the Control.Report fuzz: a NaN fps went into /api/agents as is, and JSON has no
    # NaN, so the tablet's agent list was a 500 until the agent reported again (fixed 43c6c68).
    import asyncio

    from cloud_trainer.ingest.control import AgentRegistry
    from cloud_trainer.service import RegistryController
    from cloud_trainer.web import create_app
    from protos import booth_pb2

    settings = target.app.state.services.settings
    registry = AgentRegistry(repo=target.repo)
    status = booth_pb2.AgentStatus(booth_id=settings.booth.id, camera_id="cam0", fps=float("nan"))
    asyncio.run(registry.report(status))
    control = RegistryController(registry, 3, target.repo)
    app = create_app(
        settings, repo=target.repo, store=target.store, control=control, references=lambda: []
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        c.cookies.set("booth_session", target.cookie)
        r = c.get("/api/agents")
        assert r.status_code == 200 and r.json()[0]["fps"] is None
