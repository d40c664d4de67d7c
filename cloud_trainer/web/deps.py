"""Request-scoped dependencies: the app's services and the logged-in staff member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.templating import Jinja2Templates

from cloud_trainer.config import BoothConfig, StaffUser
from cloud_trainer.front_desk import FrontDesk
from cloud_trainer.repository import Repository
from cloud_trainer.web.security import (
    SESSION_COOKIE,
    CookieSigner,
    LoginThrottle,
    hash_login_id,
    password_hash_tag,
)


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
    login_sha256: str  # the key of this login's row (what logout revokes)


class LoginRequired(Exception):
    """Raised for pages; the app turns it into a redirect to /login."""


def staff_from_cookie(request: Request, services: Services) -> Staff | None:
    """The staff member whose login the cookie names, or None (logged out).

    The signature and age come from the cookie; whether the login still stands comes
    from its row (one primary-key read), so logout and ``booth staff logout`` end every
    copy of the cookie at once. A user no longer in ``web.staff``, or whose password
    hash there changed since the login, is logged out too.
    """
    data = services.signer.loads(request.cookies.get(SESSION_COOKIE))
    if not data or not isinstance(data.get("login"), str) or not isinstance(data.get("csrf"), str):
        return None
    login = services.repo.get_staff_login(hash_login_id(data["login"]))
    if (
        login is None
        or login["revoked_at"] is not None
        or login["booth_id"] != services.settings.booth.id
    ):
        return None
    user = staff_user(services.settings, login["username"])
    if user is None or password_hash_tag(user.password_hash) != login["password_hash_sha256"]:
        return None
    return Staff(username=user.username, csrf=data["csrf"], login_sha256=login["id_sha256"])


def staff_user(settings: BoothConfig, username: str) -> StaffUser | None:
    return next((u for u in settings.web.staff if u.username == username), None)


def require_staff_page(request: Request, services: ServicesDep) -> Staff:
    staff = staff_from_cookie(request, services)
    if staff is None:
        raise LoginRequired()
    return staff


def require_staff_api(
    request: Request,
    services: ServicesDep,
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> Staff:
    staff = staff_from_cookie(request, services)
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
