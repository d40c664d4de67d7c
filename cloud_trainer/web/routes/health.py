"""Liveness, readiness and Prometheus metrics for ops."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cloud_trainer.web.deps import ServicesDep
from cloud_trainer.web.metrics import render

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is alive")
def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database and blob store answer",
    responses={
        503: {
            "description": "Not ready: the body names the check that failed and why",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
def readyz(services: ServicesDep, response: Response):
    checks = {}
    try:
        with services.repo.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as e:
        checks["database"] = f"error: {e.__class__.__name__}"
    try:
        services.store.exists("readyz-probe")
        checks["storage"] = "ok"
    except Exception as e:  # any backend failure means "not ready"; report its type
        checks["storage"] = f"error: {e.__class__.__name__}"
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return {"ready": ready, **checks}


def _private_client(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


@router.get(
    "/metrics",
    summary="Prometheus metrics (a bearer token when web.metrics_token is set, else private "
    "addresses only)",
    response_class=PlainTextResponse,
    responses={
        401: {"description": "not the web.metrics_token, or none is set and the client is public"}
    },
)
def metrics(
    request: Request, services: ServicesDep, authorization: Annotated[str | None, Header()] = None
):
    token = services.settings.web.metrics_token
    if token:
        allowed = hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
    else:
        # No token set: a scraper on this machine or the private network only. Behind the
        # TLS proxy the client is the forwarded one, so the internet is not let in.
        allowed = _private_client(request)
    if not allowed:
        return PlainTextResponse(
            "metrics need the bearer token set in web.metrics_token\n"
            if token
            else "metrics are served to private addresses only until web.metrics_token is set\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    return Response(
        render(request.app.state.metrics_registry), media_type="text/plain; version=0.0.4"
    )
