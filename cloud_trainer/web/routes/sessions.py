"""Sessions: the tablet's pages and the JSON API behind them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from cloud_trainer import email_typos
from cloud_trainer.front_desk import Conflict, EmailTypo, FrontDesk
from cloud_trainer.repository import SessionNotFound
from cloud_trainer.repository.jobs import JOBS_WITH_BEATS, LAST_BEAT
from cloud_trainer.repository.schema import jobs, outbox, takes
from cloud_trainer.repository.sessions import known_id
from cloud_trainer.web.deps import (
    LoginRequired,
    Services,
    ServicesDep,
    StaffApi,
    StaffPage,
    check_form_csrf,
    staff_from_cookie,
)
from cloud_trainer.web.errors import api_errors
from edge_agent.errors import BadInput, BoothError
from edge_agent.skeleton import LIMB_INDEX

router = APIRouter(tags=["sessions"])

STAGES = ("created", "capturing", "uploaded", "training", "rendering", "delivered")


class NewSession(BaseModel):
    name: str = Field(max_length=200)
    email: str = Field(max_length=320)
    consent: bool = False
    reference: str = Field(max_length=120)
    email_as_typed: bool = Field(
        False,
        description="keep an address that looks like a typo of a well-known domain "
        "(without it, such an address is refused with the likely one)",
    )


class Resend(BaseModel):
    email: str | None = None
    email_as_typed: bool = False


def _typed_email(email: str, use_suggestion: str | None, email_ok: str | None) -> tuple[str, bool]:
    """The address a form means, and whether staff kept it as typed.

    The "Did you mean" box has two buttons: one sends the suggestion (taken only if it
    is still the suggestion for what the field holds: the field may have been edited),
    the other the address it was asked about (kept only if the field still holds it).
    """
    email = (email or "").strip()
    if use_suggestion and use_suggestion == email_typos.suggest(email):
        return use_suggestion, False
    return email, bool(email_ok) and email_ok.strip() == email


def email_state(services: Services, session_id: str) -> dict[str, Any] | None:
    with services.repo.engine.connect() as conn:
        row = conn.execute(
            select(
                outbox.c.state,
                outbox.c.to_addr,
                outbox.c.last_error,
                outbox.c.attempts,
                outbox.c.sent_at,
            )
            .where(outbox.c.session_id == session_id)
            .order_by(outbox.c.id.desc())
            .limit(1)
        ).first()
    return dict(row._mapping) if row else None


def takes_view(services: Services, session_id: str) -> list[dict[str, Any]]:
    with services.repo.engine.connect() as conn:
        rows = conn.execute(
            select(takes).where(takes.c.session_id == session_id).order_by(takes.c.camera_id)
        )
        return [
            {
                "camera_id": r.camera_id,
                "state": r.state,
                "frame_count": r.frame_count,
                "frames_stored": r.durable_seq + 1,
                "fps": r.fps,
            }
            for r in rows
        ]


def trainer_quiet_s(services: Services, session_id: str) -> float | None:
    """Seconds since the worker running this session's job last beat (None: none runs).

    A worker beats every few seconds; when it dies, its job stays "running" until the
    stalled-job sweep hands it on, and the progress shown stops moving meanwhile.
    """
    with services.repo.engine.connect() as conn:
        last = conn.execute(
            select(LAST_BEAT)
            .select_from(JOBS_WITH_BEATS)
            .where(jobs.c.session_id == session_id, jobs.c.state == "running")
        ).scalar()
    return max(0.0, time.time() - last) if last else None


def session_view(services: Services, s: dict[str, Any]) -> dict[str, Any]:
    progress = s.get("progress") or {}
    take_rows = takes_view(services, s["id"])
    events = services.repo.session_events(s["id"])
    # When a take still missing a camera's upload is given up (the overdue sweep).
    deadline = (
        s["capture_started_at"] + s["take_s"] + services.settings.booth.upload_deadline_s
        if s["state"] == "capturing" and s.get("capture_started_at")
        else None
    )
    return {
        "id": s["id"],
        "state": s["state"],
        "name": s["name"],
        "email": s["email"],
        "reference": s["reference_name"],
        "reference_title": reference_title(s["reference_name"]),
        "created_at": s["created_at"],
        "updated_at": s["updated_at"],
        "take_s": s["take_s"],
        "cameras": s["cameras"],
        "failure_reason": s["failure_reason"],
        "progress": {k: v for k, v in progress.items() if k != "link_url"},  # older rows
        "quality": s.get("quality"),
        # Staff watch the video here, behind their login. The attendee's own link went to
        # them by email and is not kept: the database holds only its hash.
        "video_url": f"/sessions/{s['id']}/video.mp4" if s.get("video_key") else None,
        "email_delivery": email_state(services, s["id"]),
        "takes": take_rows,
        "frames_uploaded": sum(t["frames_stored"] for t in take_rows),
        "timeline": [
            {"state": e["to_state"], "at": e["at"], "detail": e["detail"]} for e in events
        ],
        "stage_index": _stage_index(s["state"], events),
        "upload_deadline_at": deadline,
        # As the booth's clock shows it (the pages' own filter), like every other time.
        "upload_deadline_clock": (
            services.templates.env.filters["clock"](deadline) if deadline is not None else None
        ),
        "trainer_quiet_s": trainer_quiet_s(services, s["id"]),
        # The countdown runs on the server's clock: the tablet's may be off.
        "server_time": time.time(),
    }


def reference_title(name: str | None) -> str:
    """How staff know a reference: its title ("dance #3 (synthetic)"), not its key."""
    from cloud_trainer.reference import title  # numpy and OpenCV: once a page needs it

    return title(name) if name else "none"


def _stage_index(state: str, events: list[dict[str, Any]]) -> int:
    """Which of STAGES the session is at; a failed one, the stage it failed in (the
    tablet marks it red), so staff see where it stopped at a glance."""
    if state in STAGES:
        return STAGES.index(state)
    reached = [e["to_state"] for e in events if e["to_state"] in STAGES]
    return STAGES.index(reached[-1]) if reached else -1


def _successor(services: Services, session_id: str) -> str | None:
    """The session this booth started in place of ``session_id`` (Start again), if any."""
    if not _is_id(session_id):
        return None
    return services.repo.successor_of(session_id, services.settings.booth.id)


def _is_id(session_id: str) -> bool:
    try:
        known_id(session_id)
    except SessionNotFound:
        return False
    return True


def _get(services: Services, session_id: str) -> dict[str, Any]:
    """The session, for this booth's staff: another booth's (a shared database) is not theirs."""
    try:
        s = services.repo.get_session(session_id)
    except SessionNotFound:
        raise HTTPException(404, "no such session (deleted?)") from None
    if s["booth_id"] != services.settings.booth.id:
        raise HTTPException(404, "no such session (deleted?)")
    return s


def _today_start(tz: str) -> float:
    """Midnight at the booth (``booth.timezone``), not wherever the server runs."""
    now = datetime.now(ZoneInfo(tz))
    return now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _references(services: Services) -> list[dict[str, Any]]:
    return services.references() if services.references else []


def _agents(services: Services) -> list[dict[str, Any]]:
    return services.control.online_agents(services.settings.booth.id) if services.control else []


def _home(
    request: Request,
    services: Services,
    staff,
    message: str | None = None,
    status: int = 200,
    form: dict | None = None,
):
    return services.templates.TemplateResponse(
        request,
        "home.html",
        {
            "staff": staff,
            "error": message,
            "form": form or {},
            "sessions": [
                session_view(services, s)
                for s in services.repo.list_sessions(
                    services.settings.booth.id,
                    since=_today_start(services.settings.booth.timezone),
                )
            ],
            "references": _references(services),
            "agents": _agents(services),
        },
        status_code=status,
    )


# ---- pages ------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def home(request: Request, services: ServicesDep, staff: StaffPage):
    return _home(request, services, staff)


@router.post("/sessions", include_in_schema=False)
def create_session_form(
    request: Request,
    services: ServicesDep,
    staff: StaffPage,
    name: Annotated[str, Form()] = "",
    email: Annotated[str, Form()] = "",
    reference: Annotated[str, Form()] = "",
    consent: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
    use_suggestion: Annotated[str | None, Form()] = None,
    email_ok: Annotated[str | None, Form()] = None,
):
    check_form_csrf(staff, csrf)
    email, as_typed = _typed_email(email, use_suggestion, email_ok)
    form = {"name": name, "email": email, "reference": reference, "consent": consent == "yes"}
    try:
        sid = services.desk.create_session(
            name=name,
            email=email,
            consent=consent == "yes",
            reference=reference,
            email_as_typed=as_typed,
        )
    except EmailTypo as e:
        # A question, not an error: the form again, asking (nothing was created).
        return _home(request, services, staff, None, 200, {**form, "suggestion": e.suggestion})
    except BadInput as e:
        return _home(request, services, staff, str(e), 400, form)
    return RedirectResponse(f"/sessions/{sid}", status_code=303)


@router.get("/sessions/{session_id}", response_class=HTMLResponse, include_in_schema=False)
def session_page(session_id: str, request: Request, services: ServicesDep, staff: StaffPage):
    try:
        found = _get(services, session_id)
    except HTTPException:
        # Gone: started again (maybe on another tablet), then on to the new session;
        # deleted, then home, which says so. An unknown id stays a 404.
        if _is_id(session_id):
            if successor := _successor(services, session_id):
                return RedirectResponse(f"/sessions/{successor}", status_code=303)
            if services.repo.session_deleted(session_id):
                return RedirectResponse("/?gone=1", status_code=303)
        raise
    s = session_view(services, found)
    return services.templates.TemplateResponse(
        request,
        "session.html",
        {"staff": staff, "s": s, "agents": _agents(services), "limbs": LIMB_INDEX, "error": None},
    )


@router.get("/sessions/{session_id}/video.mp4", include_in_schema=False)
def session_video(
    session_id: str,
    services: ServicesDep,
    staff: StaffPage,
    range: Annotated[str | None, Header()] = None,
):
    """The delivered video, for staff to show the attendee at the booth."""
    from cloud_trainer.web.routes.attendee import serve_file

    s = _get(services, session_id)
    return serve_file(services, s, "video", "video/mp4", range, expires_at=time.time() + 300)


async def _action(request, services, staff, session_id, csrf, fn, typed=None):
    """Run a tablet form's action; on a refusal, the session's page with why, and what
    was ``typed`` (e.g. a corrected email) back in its field, not lost."""
    check_form_csrf(staff, csrf)
    await asyncio.to_thread(_get, services, session_id)  # this booth's, or 404
    try:
        # Off the event loop: it serves the boards' uploads and every tablet, and a delete
        # (blob by blob on GCS) or a resend would stall them all. An async action (start)
        # comes back as a coroutine and runs on the loop, where the control plane lives.
        result = await asyncio.to_thread(fn)
        if asyncio.iscoroutine(result):
            await result
    except SessionNotFound:
        raise HTTPException(404, "no such session (deleted?)") from None
    except (BadInput, Conflict, BoothError) as e:
        s = session_view(services, _get(services, session_id))
        status = 400 if isinstance(e, BadInput) else 409
        suggestion = e.suggestion if isinstance(e, EmailTypo) else None
        return services.templates.TemplateResponse(
            request,
            "session.html",
            {
                "staff": staff,
                "s": s,
                "agents": _agents(services),
                "limbs": LIMB_INDEX,
                "error": None if suggestion else str(e),
                "typed": {**(typed or {}), "suggestion": suggestion},
            },
            status_code=200 if suggestion else status,
        )
    return None


async def _then_page(request, services, staff, session_id, csrf, fn, typed=None):
    """A tablet form's action, then back to the session's page (or the page with why not)."""
    err = await _action(request, services, staff, session_id, csrf, fn, typed)
    return err or RedirectResponse(f"/sessions/{session_id}", status_code=303)


def _form_action(name: str, action: Callable[[FrontDesk, str], Any]) -> None:
    """``POST /sessions/{id}/<name>``: a tablet button that runs ``action(desk, id)``,
    then shows the session's page (or the page with why not)."""

    async def form(
        session_id: str,
        request: Request,
        services: ServicesDep,
        staff: StaffPage,
        csrf: Annotated[str | None, Form()] = None,
    ):
        run = partial(action, services.desk, session_id)
        return await _then_page(request, services, staff, session_id, csrf, run)

    form.__name__ = f"{name.replace('-', '_')}_form"
    router.post(f"/sessions/{{session_id}}/{name}", include_in_schema=False)(form)


_form_action("start", lambda desk, sid: desk.start(sid, wait=False))
_form_action("stop", lambda desk, sid: desk.stop(sid))
# A camera whose upload never came: train on the others' takes.
_form_action("go-on", lambda desk, sid: desk.go_on_without_missing(sid))


@router.post(
    "/api/sessions/{session_id}/go-on",
    summary="Train on the cameras whose takes are in, without those whose upload never came",
    responses=api_errors(401, 403, 404, 409),
)
async def go_on(session_id: str, services: ServicesDep, staff: StaffApi):
    await _api_call(services, session_id, lambda: services.desk.go_on_without_missing(session_id))
    return session_view(services, services.repo.get_session(session_id))


@router.post("/sessions/{session_id}/again", include_in_schema=False)
async def again_form(
    session_id: str,
    request: Request,
    services: ServicesDep,
    staff: StaffPage,
    csrf: Annotated[str | None, Form()] = None,
):
    # Sent again (a reload of the page a failed start left at this URL, or a double
    # tap): the session was already started again; its page is the new session's.
    if successor := await asyncio.to_thread(_successor, services, session_id):
        check_form_csrf(staff, csrf)
        return RedirectResponse(f"/sessions/{successor}", status_code=303)
    fresh: list[str] = []
    err = await _action(
        request,
        services,
        staff,
        session_id,
        csrf,
        lambda: fresh.append(services.desk.again(session_id)),
    )
    if err:
        return err
    (new_id,) = fresh
    start = partial(services.desk.start, new_id, wait=False)
    return await _then_page(request, services, staff, new_id, csrf, start)


@router.post("/sessions/{session_id}/resend", include_in_schema=False)
async def resend_form(
    session_id: str,
    request: Request,
    services: ServicesDep,
    staff: StaffPage,
    csrf: Annotated[str | None, Form()] = None,
    email: Annotated[str, Form()] = "",
    use_suggestion: Annotated[str | None, Form()] = None,
    email_ok: Annotated[str | None, Form()] = None,
):
    email, as_typed = _typed_email(email, use_suggestion, email_ok)
    resend = partial(services.desk.resend, session_id, email or None, email_as_typed=as_typed)
    typed = {"email": email}
    return await _then_page(request, services, staff, session_id, csrf, resend, typed)


@router.post("/sessions/{session_id}/delete", include_in_schema=False)
async def delete_form(
    session_id: str,
    request: Request,
    services: ServicesDep,
    staff: StaffPage,
    csrf: Annotated[str | None, Form()] = None,
):
    check_form_csrf(staff, csrf)
    with contextlib.suppress(SessionNotFound, HTTPException):  # pressed twice: gone either way
        await asyncio.to_thread(_get, services, session_id)  # this booth's only
        await asyncio.to_thread(services.desk.delete, session_id)
    return RedirectResponse("/?deleted=1", status_code=303)


@router.get("/sessions/{session_id}/plot.png", include_in_schema=False)
def plot(session_id: str, services: ServicesDep, staff: StaffPage):
    _get(services, session_id)  # 404 for an unknown id, before it becomes a blob key
    key = f"sessions/{session_id}/job/progress.png"
    if not services.store.exists(key):
        raise HTTPException(404, "no training plot yet")
    return Response(
        services.store.get(key), media_type="image/png", headers={"Cache-Control": "no-store"}
    )


# ---- JSON API -------------------------------------------------------------------------


# The staff guard (deps.require_staff_api) answers 401 without a login, 403 on a write
# without the CSRF header; each route adds what it refuses itself.
@router.get("/api/sessions", summary="Today's sessions, newest first", responses=api_errors(401))
def list_sessions(services: ServicesDep, staff: StaffApi, all_days: bool = False):
    since = None if all_days else _today_start(services.settings.booth.timezone)
    booth = services.settings.booth.id
    return [session_view(services, s) for s in services.repo.list_sessions(booth, since=since)]


@router.post(
    "/api/sessions",
    status_code=201,
    summary="Enter an attendee (consent required)",
    responses=api_errors(400, 401, 403),
)
def create_session(body: NewSession, services: ServicesDep, staff: StaffApi):
    try:
        sid = services.desk.create_session(
            name=body.name,
            email=body.email,
            consent=body.consent,
            reference=body.reference,
            email_as_typed=body.email_as_typed,
        )
    except BadInput as e:
        raise HTTPException(400, str(e)) from None
    return session_view(services, services.repo.get_session(sid))


@router.get(
    "/api/sessions/{session_id}",
    summary="One session with its progress",
    responses=api_errors(401, 404),
)
def get_session(session_id: str, services: ServicesDep, staff: StaffApi):
    return session_view(services, _get(services, session_id))


async def _api_call(services: Services, session_id: str, fn):
    await asyncio.to_thread(_get, services, session_id)  # this booth's, or 404
    try:
        result = await asyncio.to_thread(fn)  # off the loop, as in _action
        if asyncio.iscoroutine(result):
            result = await result
        return result
    except SessionNotFound:
        raise HTTPException(404, "no such session (deleted?)") from None
    except BadInput as e:
        raise HTTPException(400, str(e)) from None
    except (Conflict, BoothError) as e:
        raise HTTPException(409, str(e)) from None


def _with_session(services: Services, session_id: str, **answer: Any) -> dict[str, Any]:
    """A command's answer, with the session as it is now."""
    return {"session": session_view(services, services.repo.get_session(session_id)), **answer}


@router.post(
    "/api/sessions/{session_id}/start",
    summary="Start the take on every camera of the booth",
    responses=api_errors(401, 403, 404, 409),
)
async def start(session_id: str, services: ServicesDep, staff: StaffApi):
    acks = await _api_call(services, session_id, lambda: services.desk.start(session_id))
    return _with_session(services, session_id, agents=acks)


@router.post(
    "/api/sessions/{session_id}/stop",
    summary="End the take early on every camera; what was filmed is the take",
    responses=api_errors(401, 403, 404, 409),
)
async def stop(session_id: str, services: ServicesDep, staff: StaffApi):
    told = await _api_call(services, session_id, lambda: services.desk.stop(session_id))
    return _with_session(services, session_id, cameras=told)


@router.post(
    "/api/sessions/{session_id}/again",
    summary="A failed take's attendee dances again: a fresh session (not started yet)",
    description="Copies the attendee, consent and reference into a new session and "
    "deletes the failed one. Start the new session with /api/sessions/{id}/start.",
    status_code=201,
    responses=api_errors(401, 403, 404, 409),
)
async def again(session_id: str, services: ServicesDep, staff: StaffApi):
    new_id = await _api_call(services, session_id, lambda: services.desk.again(session_id))
    return session_view(services, services.repo.get_session(new_id))


@router.post(
    "/api/sessions/{session_id}/resend",
    summary="Send the email again, optionally to a corrected address",
    responses=api_errors(400, 401, 403, 404, 409),
)
async def resend(session_id: str, body: Resend, services: ServicesDep, staff: StaffApi):
    await _api_call(
        services,
        session_id,
        lambda: services.desk.resend(session_id, body.email, email_as_typed=body.email_as_typed),
    )
    return session_view(services, services.repo.get_session(session_id))


@router.delete(
    "/api/sessions/{session_id}",
    status_code=204,
    summary="Delete the attendee's data",
    responses=api_errors(401, 403, 404),
)
def delete_session(session_id: str, services: ServicesDep, staff: StaffApi):
    _get(services, session_id)  # this booth's, or 404
    try:
        services.desk.delete(session_id)
    except SessionNotFound:
        raise HTTPException(404, "no such session (already deleted?)") from None
    return Response(status_code=204)


@router.get(
    "/api/sessions/{session_id}/events",
    summary="Server-sent events: the session whenever it changes",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "One `data:` event with the session view per change, "
            "`event: deleted` when it is deleted, `event: logged-out` when the login ends",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **api_errors(401, 404),
    },
)
async def events(session_id: str, request: Request, services: ServicesDep, staff: StaffApi):
    """The stream re-checks the login every round, as each request would: a logout, a
    removed user or ``booth staff logout`` ends it with ``event: logged-out``. Database
    reads run in a worker thread, so a slow database does not stall the event loop."""
    _get(services, session_id)

    def read() -> dict:
        if staff_from_cookie(request, services) is None:
            raise LoginRequired()
        return session_view(services, services.repo.get_session(session_id))

    async def stream():
        last = None
        while not await request.is_disconnected():
            try:
                view = await asyncio.to_thread(read)
            except LoginRequired:
                yield "event: logged-out\ndata: {}\n\n"
                return
            except SessionNotFound:
                yield "event: deleted\ndata: {}\n\n"
                return
            # A change is a change of the session, not of the clock it is sent with.
            seen = json.dumps({k: v for k, v in view.items() if k != "server_time"}, default=str)
            if seen != last:
                last = seen
                yield f"data: {json.dumps(view, default=str)}\n\n"
            if (
                view["state"] in ("delivered", "failed")
                and view["email_delivery"]
                and view["email_delivery"]["state"] in ("sent", "failed", "bounced")
            ):
                return
            await asyncio.sleep(1.0)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@router.get(
    "/api/agents",
    summary="The booth's cameras and what each is doing",
    tags=["agents"],
    responses=api_errors(401),
)
def agents(services: ServicesDep, staff: StaffApi):
    return _agents(services)


@router.get(
    "/api/references",
    summary="Reference dances staff can pick",
    tags=["references"],
    responses=api_errors(401),
)
def references(services: ServicesDep, staff: StaffApi):
    return _references(services)
