"""Staff login and logout (pages and JSON)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field

from cloud_trainer.web.deps import Services, ServicesDep
from cloud_trainer.web.errors import api_errors
from cloud_trainer.web.security import (
    MAX_PASSWORD,
    MAX_USERNAME,
    SESSION_COOKIE,
    dummy_hash,
    new_csrf_token,
    verify_password,
)

router = APIRouter(tags=["auth"])


class LoginBody(BaseModel):
    username: str = Field(max_length=MAX_USERNAME)
    password: str = Field(max_length=MAX_PASSWORD)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _authenticate(services: Services, request: Request, username: str, password: str) -> str:
    """Return a fresh CSRF token on success; raise 429 when throttled, 401 when wrong."""
    client = _client(request)
    wait = services.throttle.retry_after_s(client, username)
    if wait > 0:
        raise HTTPException(
            429,
            f"too many failed logins; try again in {int(wait) + 1} s",
            {"Retry-After": str(int(wait) + 1)},
        )
    user = next((u for u in services.settings.web.staff if u.username == username), None)
    # An unknown name costs the same argon2 work, so timing does not say which names exist.
    if not verify_password(user.password_hash if user else dummy_hash(), password) or user is None:
        services.throttle.failed(client, username)
        raise HTTPException(401, "wrong username or password")
    services.throttle.succeeded(client, username)
    return new_csrf_token()


def _set_cookie(response, services: Services, username: str, csrf: str, request: Request) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        services.signer.dumps({"user": username, "csrf": csrf}),
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
    username: Annotated[str, Form(max_length=MAX_USERNAME)],
    password: Annotated[str, Form(max_length=MAX_PASSWORD)],
):
    try:
        csrf = _authenticate(services, request, username, password)
    except HTTPException as e:
        return services.templates.TemplateResponse(
            request,
            "login.html",
            {"error": e.detail, "username": username},
            status_code=e.status_code,
        )
    response = RedirectResponse("/", status_code=303)
    _set_cookie(response, services, username, csrf, request)
    return response


@router.post("/logout", include_in_schema=False)
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.post(
    "/api/login",
    summary="Log in as staff; returns the CSRF token for later calls",
    responses=api_errors(400, 401, 429),
)
def login_api(body: LoginBody, request: Request, services: ServicesDep):
    csrf = _authenticate(services, request, body.username, body.password)
    response = JSONResponse({"username": body.username, "csrf_token": csrf})
    _set_cookie(response, services, body.username, csrf, request)
    return response
