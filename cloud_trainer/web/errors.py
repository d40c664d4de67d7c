"""What the OpenAPI says each route answers when it refuses, so clients see the real contract.

Every refusal is an ``HTTPException``, which FastAPI sends as ``{"detail": "..."}``:
``ErrorBody``. The JSON API (``/api/...``) always answers that. The attendee pages
(``/v/...``) answer it too unless the client asks for HTML, which gets the error
page instead, and a gone link (410) is always the HTML "gone" page. 422 is
FastAPI's own validation error and is documented by FastAPI itself.

Routes list only the statuses they can really return; ``tests/fuzz`` checks
every status the fuzz sees against this (schemathesis ``status_code_conformance``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Responses = dict[int | str, dict[str, Any]]


class ErrorBody(BaseModel):
    """The body of every JSON error but 422."""

    detail: str = Field(description="What went wrong, in words staff or an attendee can act on")


_WHY: dict[int, str] = {
    400: "Refused input (the reason is in detail), or a body that could not be parsed",
    401: "Not logged in as staff, or the session cookie expired or was tampered with",
    403: "The X-CSRF-Token header is missing or is not this login's token",
    404: "No such session or link (or its video is not ready yet)",
    409: "The action does not fit the session's state (e.g. no camera online, started twice)",
    410: "The link expired, was revoked, or its video and data were deleted",
    416: "The Range header names no byte of the video",
    429: "Too many failed logins from this client for this username",
}

_HEADERS: dict[int, dict[str, Any]] = {
    416: {
        "Content-Range": {
            "description": "bytes */<size of the video>",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds until the next login may be tried",
            "required": True,
            "schema": {"type": "integer"},
        }
    },
}

_HTML = {"text/html": {"schema": {"type": "string"}}}


def api_errors(*codes: int) -> Responses:
    """Error responses of the JSON API: always ``ErrorBody``."""
    return {code: _response(code, {"model": ErrorBody}) for code in codes}


def page_errors(*codes: int) -> Responses:
    """Error responses of the attendee pages: ``ErrorBody`` or the HTML error page.

    The schema is inlined (not a ``model``): FastAPI would file a model under the
    route's own media type, which for these routes is HTML or a video.
    """
    either = {"content": {"application/json": {"schema": ErrorBody.model_json_schema()}, **_HTML}}
    out: Responses = {}
    for code in codes:
        if code == 410:
            out[code] = _response(code, {"content": dict(_HTML)})
        elif code == 416:
            out[code] = _response(code, {})  # an empty body
        else:
            out[code] = _response(code, either)
    return out


def _response(code: int, body: dict[str, Any]) -> dict[str, Any]:
    response = {"description": _WHY[code], **body}
    if code in _HEADERS:
        response["headers"] = _HEADERS[code]
    return response
