"""Liveness, readiness and Prometheus metrics for ops."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
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


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
def metrics(request: Request):
    return Response(
        render(request.app.state.metrics_registry), media_type="text/plain; version=0.0.4"
    )
