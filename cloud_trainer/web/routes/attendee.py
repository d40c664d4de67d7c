"""The attendee's page at the unguessable link: watch, download, delete."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy import select

from cloud_trainer import links
from cloud_trainer.repository import SessionNotFound
from cloud_trainer.repository.schema import link_tombstones
from cloud_trainer.storage.base import BlobNotFound
from cloud_trainer.web.deps import Services, ServicesDep
from cloud_trainer.web.errors import Responses, page_errors

log = logging.getLogger(__name__)
router = APIRouter(tags=["attendee"])


class Gone(Exception):
    """The link existed but is expired, revoked or its data deleted (HTTP 410).

    ``reason``: ``expired``, ``revoked`` or ``deleted`` (what the page says, see
    ``gone_page``).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def gone_page(reason: str) -> dict[str, str]:
    """What the attendee reads on a link that no longer works: what happened, what next.

    ``deleted_now``: the answer to the attendee's own delete.
    """
    if reason == "expired":
        return {
            "title": "This video is no longer here",
            "message": "Videos stay online for a limited time, and this one's time is up; "
            "it was deleted with the rest of its data.",
            "hint": "If you downloaded it, that copy is yours to keep.",
        }
    if reason == "revoked":
        return {
            "title": "This link no longer works",
            "message": "The booth replaced this link, for example after the email was "
            "sent to a corrected address.",
            "hint": "Look for a newer email from the booth, or reply to this one.",
        }
    if reason == "deleted_now":
        return {
            "title": "Deleted",
            "message": "Your video and all your data were deleted: the video, the frames "
            "we captured, the trained model, and your name and email.",
            "hint": "This link no longer works.",
        }
    return {
        "title": "Deleted",
        "message": "This video and everything the booth kept of it (the frames we "
        "captured, the trained model, the name and email) are deleted.",
        "hint": "",
    }


def _visit(services: Services, token: str) -> links.Visit:
    with services.repo.engine.connect() as conn:
        deleted = conn.execute(
            select(link_tombstones.c.token_sha256).where(
                link_tombstones.c.token_sha256 == links.hash_token(token)
            )
        ).first()
    if deleted:
        raise Gone("deleted")
    try:
        return links.visit(services.repo, token)
    except links.LinkNotFound:
        raise HTTPException(404, "no such video") from None
    except links.LinkGone as e:
        raise Gone(e.reason) from None


def _video_key(s: dict, which: str) -> str:
    key = {
        "video": s.get("video_key"),
        "poster": s.get("poster_key"),
        "side": s.get("side_by_side_key"),
    }[which]
    if not key:
        raise HTTPException(404, "the video is not ready yet")
    return key


def _file_responses(media_type: str, *, ranges: bool) -> Responses:
    """A served file: the whole of it, a range of it, or a redirect to a signed URL (gcs)."""
    binary = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    out: Responses = {
        200: {"description": "The whole file", "content": binary},
        307: {
            "description": "Fetch it from a signed URL of a few minutes instead (gcs storage)",
            "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
        },
    }
    if ranges:
        out[206] = {
            "description": "The bytes the Range header names",
            "content": binary,
            "headers": {"Content-Range": {"required": True, "schema": {"type": "string"}}},
        }
        return {**out, **page_errors(404, 410, 416)}
    return {**out, **page_errors(404, 410)}


@router.get(
    "/v/{token}",
    response_class=HTMLResponse,
    summary="The attendee's video page",
    responses=page_errors(404, 410),
)
def page(token: str, request: Request, services: ServicesDep):
    visit = _visit(services, token)
    return _render_page(request, services, visit, token)


def _render_page(
    request: Request, services: Services, visit: links.Visit, token: str, error: str | None = None
):
    s = visit.session
    missing = False
    if s.get("video_key"):
        try:
            missing = not services.store.exists(s["video_key"])
        except Exception as e:  # the store is down: the player will say so itself
            log.warning("session %s: could not check the video file: %s", s["id"], e)
        if missing:
            log.error("session %s: %s is missing from the blob store", s["id"], s["video_key"])
    context = {
        "s": s,
        "missing": missing,
        "token": token,
        "has_side": bool(s.get("side_by_side_key")),
        "booth": services.settings.booth.name,
        "error": error,
        "expires_at": visit.link_expires_at,
    }
    return services.templates.TemplateResponse(
        request, "attendee.html", context, status_code=400 if error else 200
    )


def _serve(
    services: Services,
    visit: links.Visit,
    which: str,
    media_type: str,
    range_header: str | None,
    download_name: str | None = None,
):
    return serve_file(
        services,
        visit.session,
        which,
        media_type,
        range_header,
        expires_at=visit.link_expires_at,
        download_name=download_name,
    )


def serve_file(
    services: Services,
    session: dict,
    which: str,
    media_type: str,
    range_header: str | None,
    *,
    expires_at: float,
    download_name: str | None = None,
):
    """One of a session's files (``video``, ``side``, ``poster``): a signed URL on gcs,
    else the bytes (a Range of them). Never cached: a deleted or expired video must
    not keep playing from a shared device's cache."""
    key = _video_key(session, which)
    disposition = f'attachment; filename="{download_name}"' if download_name else None
    try:
        signed = links.signed_url(
            services.store,
            key,
            expires_at,
            disposition=disposition,
            content_type=media_type,
        )
    except links.LinkGone as e:  # expired since _visit checked it
        raise Gone(e.reason) from None
    if signed:
        # Not cached: the next request comes back through the link, which checks it again.
        return RedirectResponse(signed, status_code=307, headers={"Cache-Control": "no-store"})
    try:
        planned = links.serve_range(services.store, key, range_header, media_type)
    except BlobNotFound:
        # Deleted a moment ago (a delete removes the files before the rows), or lost.
        if services.repo.session_deleted(session["id"]):
            raise Gone("deleted") from None
        log.error("session %s: %s is missing from the blob store", session["id"], key)
        raise HTTPException(
            404,
            "this video's file is missing on our side; reply to the email with the link "
            "and the booth team will look into it",
        ) from None
    headers = {**planned.headers, "Cache-Control": "no-store"}
    if disposition and planned.status != 416:
        headers["Content-Disposition"] = disposition
    return StreamingResponse(planned.body, status_code=planned.status, headers=headers)


@router.get(
    "/v/{token}/video.mp4",
    summary="The H.264 video (supports Range requests)",
    response_class=Response,
    responses=_file_responses("video/mp4", ranges=True),
)
def video(token: str, services: ServicesDep, range: Annotated[str | None, Header()] = None):
    return _serve(services, _visit(services, token), "video", "video/mp4", range)


@router.get(
    "/v/{token}/side-by-side.mp4",
    summary="The video beside the reference dancer",
    response_class=Response,
    responses=_file_responses("video/mp4", ranges=True),
)
def side_by_side(token: str, services: ServicesDep, range: Annotated[str | None, Header()] = None):
    return _serve(services, _visit(services, token), "side", "video/mp4", range)


@router.get(
    "/v/{token}/download",
    summary="Download the video",
    response_class=Response,
    responses=_file_responses("video/mp4", ranges=True),
)
def download(token: str, services: ServicesDep, range: Annotated[str | None, Header()] = None):
    return _serve(services, _visit(services, token), "video", "video/mp4", range, "dancebooth.mp4")


@router.get(
    "/v/{token}/poster.jpg",
    summary="The poster image",
    response_class=Response,
    responses=_file_responses("image/jpeg", ranges=False),
)
def poster(token: str, services: ServicesDep):
    return _serve(services, _visit(services, token), "poster", "image/jpeg", None)


@router.get("/v/{token}/delete", include_in_schema=False)
def delete_page(token: str):
    """The address bar after a delete shows this URL; opened again, it is the video's page
    (which says whether the data is gone)."""
    return RedirectResponse(f"/v/{quote(token, safe='')}", status_code=303)


@router.post(
    "/v/{token}/delete",
    response_class=HTMLResponse,
    summary="Delete my data (needs confirm=yes)",
    responses=page_errors(400, 404, 410),
)
def delete_my_data(
    token: str, request: Request, services: ServicesDep, confirm: Annotated[str, Form()] = ""
):
    visit = _visit(services, token)
    s = visit.session
    if confirm != "yes":
        error = "tick the box to confirm that everything should be deleted"
        return _render_page(request, services, visit, token, error)
    # A double tap sends two deletes: the one that finds the data already gone has
    # done its job too.
    with contextlib.suppress(SessionNotFound):
        services.desk.delete(s["id"])
    return services.templates.TemplateResponse(request, "gone.html", gone_page("deleted_now"))
