"""Liveness, readiness and Prometheus metrics for ops."""

from __future__ import annotations

import hmac
import ipaddress
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import PlainTextResponse
from sqlalchemy import text

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
    def database() -> None:
        with services.repo.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def storage() -> None:
        services.store.exists("readyz-probe")

    # Both at once, each with a deadline: a blob store that retries for a minute or a
    # database that stopped answering must make this say "not ready" in seconds, not
    # hold the probe (and a web thread) until the orchestrator gives up.
    running = {
        name: _CHECKS.submit(fn) for name, fn in (("database", database), ("storage", storage))
    }
    wait(running.values(), timeout=READY_CHECK_S)  # one deadline for both
    checks = {}
    for name, future in running.items():
        if not future.done():
            checks[name] = f"error: no answer in {READY_CHECK_S:g} s"
        elif (e := future.exception()) is not None:  # any backend failure: report its type
            checks[name] = f"error: {e.__class__.__name__}"
        else:
            checks[name] = "ok"
    ready = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ready else 503
    return {"ready": ready, **checks}


# How long /readyz waits for each dependency, and the threads its checks run on (a check
# that hangs keeps its thread; a few are enough, later probes just report the timeout).
READY_CHECK_S = 3.0
_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")


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
