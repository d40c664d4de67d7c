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


def test_metrics_stay_open_without_a_token(tmp_path):
    booth = build_app(staff_settings(tmp_path))
    try:
        with TestClient(booth.app) as client:
            assert client.get("/metrics").status_code == 200
    finally:
        booth.repo.close()
