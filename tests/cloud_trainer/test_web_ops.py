"""The ops routes as Prometheus and ops reach them: /metrics behind an optional bearer token."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from staff_app import build_app, staff_settings


@pytest.fixture
def app_with_token(tmp_path):
    settings = staff_settings(tmp_path)
    settings.web.metrics_token = "scrape-" + "t" * 24
    booth = build_app(settings)
    yield booth
    booth.repo.close()


def test_metrics_need_the_bearer_token_when_one_is_set(app_with_token):
    token = app_with_token.settings.web.metrics_token
    with TestClient(app_with_token.app) as client:
        bare = client.get("/metrics")
        assert bare.status_code == 401
        assert bare.headers["WWW-Authenticate"].startswith("Bearer")
        assert "booth_" not in bare.text
        wrong = client.get("/metrics", headers={"Authorization": f"Bearer {token}x"})
        assert wrong.status_code == 401
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and "booth_" in ok.text
        assert client.get("/healthz").status_code == 200  # probes need no token


@pytest.mark.parametrize(
    ("client", "served"),
    [("127.0.0.1", True), ("10.1.2.3", True), ("::1", True), ("93.184.216.34", False)],
)
def test_metrics_without_a_token_are_for_private_addresses_only(tmp_path, client, served):
    """The deployed config leaves the token empty unless ops set one: the internet (the
    forwarded client behind the TLS proxy) must not read the booth's counters then."""
    booth = build_app(staff_settings(tmp_path))
    try:
        with TestClient(booth.app, client=(client, 50000)) as c:
            r = c.get("/metrics")
            assert r.status_code == (200 if served else 401)
            assert ("booth_" in r.text) == served
            if not served:
                assert "web.metrics_token" in r.text
    finally:
        booth.repo.close()


def test_hsts_is_sent_when_the_booth_is_served_over_https(tmp_path):
    settings = staff_settings(tmp_path)
    plain = build_app(settings)
    settings.web.base_url = "https://booth.example.org"
    secure = build_app(settings)
    try:
        with TestClient(plain.app) as c:
            assert "strict-transport-security" not in c.get("/healthz").headers
        with TestClient(secure.app) as c:
            assert c.get("/healthz").headers["strict-transport-security"] == "max-age=31536000"
    finally:
        plain.repo.close()
        secure.repo.close()
