"""Staff login and logout (pages and JSON).

A login is a row in the repository (``staff_logins``) and a signed cookie carrying
its random id and the CSRF token; logout revokes the row, so a copy of the cookie
stops working too (``deps.staff_from_cookie`` checks the row on every request).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from cloud_trainer.config import StaffUser
from cloud_trainer.web.deps import (
    Services,
    ServicesDep,
    check_form_csrf,
    staff_from_cookie,
    staff_user,
)
from cloud_trainer.web.errors import api_errors
from cloud_trainer.web.security import (
    MAX_PASSWORD,
    MAX_USERNAME,
    SESSION_COOKIE,
    dummy_hash,
    hash_login_id,
    new_csrf_token,
    new_login_id,
    password_hash_tag,
    verify_password,
)

router = APIRouter(tags=["auth"])


class LoginBody(BaseModel):
    username: str = Field(max_length=MAX_USERNAME)
    password: str = Field(max_length=MAX_PASSWORD)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _authenticate(services: Services, request: Request, username: str, password: str) -> StaffUser:
    """Return the staff user on success; raise 429 when throttled, 401 when wrong."""
    client = _client(request)
    wait, attempt = services.throttle.attempt(client, username)  # counted until it succeeds
    if wait > 0:
        raise HTTPException(
            429,
            f"too many failed logins; try again in {int(wait) + 1} s",
            {"Retry-After": str(int(wait) + 1)},
        )
    user = staff_user(services.settings, username)
    # An unknown name costs the same argon2 work, so timing does not say which names exist.
    if not verify_password(user.password_hash if user else dummy_hash(), password) or user is None:
        raise HTTPException(401, "wrong username or password")
    services.throttle.succeeded(client, username, attempt)
    return user


def _open_login(services: Services, user: StaffUser, request: Request) -> str:
    """Record a new login for ``user``; returns its id (for the cookie only).

    A login this browser already holds ends here: its cookie is about to be replaced,
    and a copy of the old one taken off the tablet must not outlive it.
    """
    login_id, now = new_login_id(), time.time()
    replaced = staff_from_cookie(request, services)
    if replaced is not None:
        services.repo.revoke_staff_login(replaced.login_sha256, now)
    services.repo.insert_staff_login(
        id_sha256=hash_login_id(login_id),
        booth_id=services.settings.booth.id,
        username=user.username,
        password_hash_sha256=password_hash_tag(user.password_hash),
        created_at=now,
        forget_before=now - services.signer.max_age_s,
    )
    return login_id


def _set_cookie(response, services: Services, login_id: str, csrf: str, request: Request) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        services.signer.dumps({"login": login_id, "csrf": csrf}),
        httponly=True,
        samesite="strict",
        # Secure whenever the booth is published over https, even if the proxy in front
        # of it talks plain http to us; a browser then never sends it in the clear.
        secure=services.settings.web.base_url.startswith("https://")
        or request.url.scheme == "https",
        max_age=services.signer.max_age_s,
    )


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, services: ServicesDep):
    return services.templates.TemplateResponse(request, "login.html", {"error": None})


@router.post("/login", include_in_schema=False)
def login_form(
    request: Request,
    services: ServicesDep,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
):
    try:
        if len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
            # Said on the page, not as the framework's JSON; no argon2 work for it.
            raise HTTPException(400, "wrong username or password")
        user = _authenticate(services, request, username, password)
    except HTTPException as e:
        return services.templates.TemplateResponse(
            request,
            "login.html",
            {"error": e.detail, "username": username[:MAX_USERNAME]},
            status_code=e.status_code,
        )
    response = RedirectResponse("/", status_code=303)
    _set_cookie(response, services, _open_login(services, user, request), new_csrf_token(), request)
    return response


@router.post("/logout", include_in_schema=False)
def logout(
    request: Request,
    services: ServicesDep,
    csrf: Annotated[str | None, Form()] = None,
):
    """End this login for good (every copy of its cookie), then drop the cookie.

    The form carries the CSRF token like every staff form, so another page cannot log
    the tablet out. Without a standing login there is nothing to end or to protect:
    the cookie is dropped and the browser sent to /login.
    """
    staff = staff_from_cookie(request, services)
    if staff is not None:
        check_form_csrf(staff, csrf)
        services.repo.revoke_staff_login(staff.login_sha256, time.time())
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.post(
    "/api/login",
    summary="Log in as staff; returns the CSRF token for later calls",
    responses=api_errors(400, 401, 429),
)
def login_api(body: LoginBody, request: Request, services: ServicesDep):
    user = _authenticate(services, request, body.username, body.password)
    csrf = new_csrf_token()
    response = JSONResponse({"username": user.username, "csrf_token": csrf})
    _set_cookie(response, services, _open_login(services, user, request), csrf, request)
    return response
