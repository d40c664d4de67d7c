"""``create_app(settings)``: the FastAPI app behind the tablet, the attendee pages and the API."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud_trainer.config import BoothConfig, refuse_placeholders
from cloud_trainer.deliver import email_time
from cloud_trainer.front_desk import FrontDesk
from cloud_trainer.repository import Repository
from cloud_trainer.web import metrics
from cloud_trainer.web.deps import LoginRequired, Services
from cloud_trainer.web.headers import SecurityHeaders
from cloud_trainer.web.routes import attendee, auth, health, sessions
from cloud_trainer.web.security import CookieSigner, LoginThrottle

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
_DEFAULT: Any = object()  # "build it from settings"; None means "not available"


def readable_email(email: str) -> str:
    """``user@xn--e1afmkfd.xn--p1ai`` as ``user@пример.рф``; anything else as it is."""
    local, at, domain = (email or "").rpartition("@")
    if not at or "xn--" not in domain.lower():
        return email
    try:
        return f"{local}@{domain.encode('ascii').decode('idna')}"
    except UnicodeError:
        return email


def create_app(
    settings: BoothConfig,
    *,
    repo: Repository | None = None,
    store: Any = None,
    control: Any = None,
    references: Any = _DEFAULT,
    deliverer: Any = _DEFAULT,
    enqueue: Any = None,
) -> FastAPI:
    """Build the app. Anything not passed in is built from ``settings`` (embedded defaults)."""
    refuse_placeholders(settings, ("web",))
    if repo is None:
        repo = Repository.from_config(settings.database)
    if store is None:
        from cloud_trainer.storage import create_blob_store

        store = create_blob_store(settings.storage)
    if references is _DEFAULT:
        references = _default_references(settings, store)
    if deliverer is _DEFAULT:
        deliverer = _default_deliverer(settings, repo, store)

    def cameras() -> list[str]:
        if control is None:
            return []
        return sorted(a["camera_id"] for a in control.online_agents(settings.booth.id))

    desk = FrontDesk(
        repo=repo,
        booth_id=settings.booth.id,
        take_s=settings.booth.take_s,
        cameras=cameras,
        control=control,
        delete_blobs=lambda sid: store.delete_prefix(f"sessions/{sid}/"),
        resend_email=deliverer.resend if deliverer is not None else None,
        enqueue=enqueue,
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    zone = ZoneInfo(settings.booth.timezone)
    # Times as the booth's clock shows them (server-side: the pages run no inline script).
    templates.env.filters["clock"] = lambda ts: datetime.fromtimestamp(ts, zone).strftime("%H:%M")
    # An internationalised domain is stored as the browser sent it (punycode): staff
    # check the address with the attendee in the letters the attendee knows.
    templates.env.filters["readable_email"] = readable_email
    # The attendee's page says when the link ends exactly as their email does.
    templates.env.filters["expires"] = lambda ts: email_time(ts, settings.booth.timezone)
    services = Services(
        settings=settings,
        repo=repo,
        store=store,
        desk=desk,
        signer=CookieSigner(settings.web.secret_key),
        throttle=LoginThrottle(settings.web.login_attempts_per_minute),
        templates=templates,
        control=control,
        references=references,
        deliverer=deliverer,
    )

    app = FastAPI(
        title="dancebooth",
        version="0.1.0",
        description="Staff tablet, attendee pages and the booth's JSON API.",
    )
    app.add_middleware(SecurityHeaders, https=settings.web.base_url.startswith("https://"))
    app.state.services = services
    app.state.metrics_registry = metrics.make_registry(repo, settings.booth.id)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    for module in (auth, sessions, attendee, health):
        app.include_router(module.router)

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired):
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(attendee.Gone)
    async def _gone(request: Request, exc: attendee.Gone):
        return templates.TemplateResponse(
            request, "gone.html", attendee.gone_page(exc.reason), status_code=410
        )

    # Starlette's class: the router's own 404 and 405 (a truncated link, an unknown
    # path) are raised as that, not as FastAPI's subclass, and deserve the page too.
    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        wants_html = "text/html" in request.headers.get(
            "accept", ""
        ) and not request.url.path.startswith("/api/")
        if wants_html and exc.status_code >= 400:
            return templates.TemplateResponse(
                request,
                "error.html",
                {
                    "status": exc.status_code,
                    "message": exc.detail,
                    # An attendee's link: the staff login is no way back for them.
                    "attendee": request.url.path.startswith("/v/"),
                },
                status_code=exc.status_code,
                headers=getattr(exc, "headers", None),
            )
        return await http_exception_handler(request, exc)

    return app


def _default_references(settings: BoothConfig, store: Any):
    from cloud_trainer.reference import ReferenceLibrary

    library = ReferenceLibrary(store)
    return library.catalogue


def _default_deliverer(settings: BoothConfig, repo: Repository, store: Any):
    from cloud_trainer.deliver import Deliverer

    return Deliverer(repo=repo, store=store, settings=settings)


__all__ = ["create_app", "HTMLResponse"]
