"""Request-scoped dependencies: the app's services and the logged-in staff member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.templating import Jinja2Templates

from cloud_trainer.config import BoothConfig
from cloud_trainer.front_desk import FrontDesk
from cloud_trainer.repository import Repository
from cloud_trainer.web.security import SESSION_COOKIE, CookieSigner, LoginThrottle


@dataclass
class Services:
    settings: BoothConfig
    repo: Repository
    store: Any  # BlobStore
    desk: FrontDesk
    signer: CookieSigner
    throttle: LoginThrottle
    templates: Jinja2Templates
    control: Any = None
    references: Any = None  # callable -> list of {name, title, thumbnail_url}
    deliverer: Any = None  # resend(session_id, new_email)
    extra: dict[str, Any] = field(default_factory=dict)


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


@dataclass
class Staff:
    username: str
    csrf: str


class LoginRequired(Exception):
    """Raised for pages; the app turns it into a redirect to /login."""


def _staff_from_cookie(request: Request, services: Services) -> Staff | None:
    data = services.signer.loads(request.cookies.get(SESSION_COOKIE))
    if not data or "user" not in data or "csrf" not in data:
        return None
    return Staff(username=data["user"], csrf=data["csrf"])


def require_staff_page(request: Request, services: ServicesDep) -> Staff:
    staff = _staff_from_cookie(request, services)
    if staff is None:
        raise LoginRequired()
    return staff


def require_staff_api(
    request: Request,
    services: ServicesDep,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> Staff:
    staff = _staff_from_cookie(request, services)
    if staff is None:
        raise HTTPException(401, "log in first")
    if request.method not in ("GET", "HEAD", "OPTIONS") and x_csrf_token != staff.csrf:
        raise HTTPException(403, "missing or wrong X-CSRF-Token header")
    return staff


StaffPage = Annotated[Staff, Depends(require_staff_page)]
StaffApi = Annotated[Staff, Depends(require_staff_api)]


def check_form_csrf(staff: Staff, token: str | None) -> None:
    if not token or token != staff.csrf:
        raise HTTPException(403, "this form expired; reload the page and try again")
