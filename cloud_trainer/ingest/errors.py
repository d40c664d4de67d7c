"""Domain errors of the transport, and the one interceptor that turns them into gRPC statuses.

Handlers raise plain exceptions that say what went wrong in the booth's words
(``UnknownCamera``, ``OutOfOrder``, ``SessionNotFound``...). ``ErrorStatusInterceptor``
maps each to a status code with a readable detail, logs it once, and keeps the
server serving everybody else. Anything unexpected becomes ``INTERNAL`` with a
short reference that also appears in the log next to the traceback.

A unary request is parsed by gRPC before any handler (or this interceptor's
wrapper) runs, and a parse failure there would reach the caller as ``UNKNOWN``.
So the interceptor also wraps the request parser: a message that does not parse
becomes a ``Malformed`` marker, and the call ends with ``INVALID_ARGUMENT`` (as
a malformed message on a stream does) once whoever comes first refuses it: the
token check (``auth``, so an unknown caller still hears UNAUTHENTICATED), or
else the handler, whose failure on the marker is reported as the parse error.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cloud_trainer.repository.sessions import SessionNotFound
from cloud_trainer.session import InvalidTransition
from cloud_trainer.storage.base import BlobNotFound
from edge_agent.errors import (
    SESSION_DELETED,
    SESSION_STATE_KEY,
    TAKE_NOT_WANTED,
    BadInput,
    BoothError,
)

log = logging.getLogger(__name__)


class Unauthenticated(BoothError):
    """No token, an unknown token, or an expired one."""


class PermissionDenied(BoothError):
    """An authenticated agent asking for something its booth or camera may not do."""


class TakeNotWanted(PermissionDenied):
    """A camera the session does not take (staff went on without it): drop the take."""


class OutOfOrder(BadInput):
    """A frame whose seq leaves a gap; the agent must resume from the acked position."""


class Conflict(BadInput):
    """A seq that is already stored with different content."""


class NotAccepting(BoothError):
    """The session or take is in a state where this request makes no sense (e.g. failed)."""


class SessionDeleted(SessionNotFound):
    """A session its attendee deleted: the board must drop its copy, not offer it again."""

    @classmethod
    def of(cls, session_id: str) -> SessionDeleted:
        return cls(
            f"session {session_id} was deleted by its attendee; drop this take and its recording"
        )


class StorageUnavailable(BoothError):
    """The blob store or the database failed; the agent should retry later."""


class Superseded(BoothError):
    """A newer stream of the same camera and session took over (the agent reconnected)."""


def _status_table() -> list[tuple[type[BaseException], grpc.StatusCode]]:
    # Most specific first: OutOfOrder and Conflict are BadInputs too.
    table: list[tuple[type[BaseException], grpc.StatusCode]] = [
        (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (OutOfOrder, grpc.StatusCode.OUT_OF_RANGE),
        (Conflict, grpc.StatusCode.ALREADY_EXISTS),
        (SessionNotFound, grpc.StatusCode.NOT_FOUND),
        (BlobNotFound, grpc.StatusCode.NOT_FOUND),
        (InvalidTransition, grpc.StatusCode.FAILED_PRECONDITION),
        (NotAccepting, grpc.StatusCode.FAILED_PRECONDITION),
        (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
        (Superseded, grpc.StatusCode.ABORTED),
        (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
        (BadInput, grpc.StatusCode.INVALID_ARGUMENT),
        (OSError, grpc.StatusCode.UNAVAILABLE),
    ]
    try:
        from sqlalchemy.exc import OperationalError
    except ModuleNotFoundError:  # pragma: no cover - the cloud extra always has it
        pass
    else:
        table.append((OperationalError, grpc.StatusCode.UNAVAILABLE))
    return table


_STATUS = _status_table()


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status and detail for a domain error, or None if it is a bug."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            if isinstance(exc, DecodeError):
                return code, f"malformed message: {exc or 'cannot parse protobuf'}"
            if isinstance(exc, OSError) and not isinstance(exc, BoothError):
                return code, f"storage unavailable: {exc.strerror or exc}"
            if code == grpc.StatusCode.UNAVAILABLE and not isinstance(exc, BoothError):
                return code, f"database unavailable: {type(exc).__name__}"
            return code, str(exc)
    return None


async def abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """Log ``exc`` once and end the RPC with the mapped status. Never returns."""
    mapped = status_for(exc)
    if mapped is None:
        ref = secrets.token_hex(4)
        log.error("%s failed unexpectedly (ref %s)", method, ref, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server log")
    code, detail = mapped
    log.warning("%s refused: %s %s", method, code.name, detail)
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, SessionDeleted):
        trailers = ((SESSION_STATE_KEY, SESSION_DELETED),)
    elif isinstance(exc, TakeNotWanted):
        trailers = ((SESSION_STATE_KEY, TAKE_NOT_WANTED),)
    await context.abort(code, detail, trailers)


class Malformed:
    """A unary request whose bytes did not parse (see the module doc)."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError):
        self.error = error

    def refuse(self) -> None:
        raise self.error


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(e)

    return parse_or_mark


def _cause(exc: BaseException, request: Any) -> BaseException:
    # A handler that failed on a request that never parsed failed because of the parse.
    return request.error if isinstance(request, Malformed) else exc


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises AbortError (aio); let it through untouched.
    return isinstance(exc, grpc.aio.AbortError)


def _wrap_unary(method: str, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behavior(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request_or_iterator, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await abort_for(_cause(exc, request_or_iterator), context, method)

    return behavior


def _wrap_stream(method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    async def behavior(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in inner(request_or_iterator, context):
                yield response
        except Exception as exc:
            if _is_abort(exc):
                raise
            await abort_for(_cause(exc, request_or_iterator), context, method)

    return behavior


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    wrap: Callable[[str, Callable], Callable],
    *,
    mark_malformed: bool = False,
) -> grpc.RpcMethodHandler:
    """Rebuild ``handler`` with its behaviour passed through ``wrap(method, behaviour)``.

    ``wrap`` receives the behaviour and must return one of the same kind (a
    coroutine function, or an async generator function for streamed responses).
    ``mark_malformed``: a unary request that does not parse reaches ``wrap``'s
    behaviour as a ``Malformed`` instead of failing inside gRPC.
    """
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    parse = handler.request_deserializer
    if mark_malformed and not handler.request_streaming:
        parse = _tolerant(parse)
    return make(
        wrap(method, getattr(handler, attr)),
        request_deserializer=parse,
        response_serializer=handler.response_serializer,
    )


def _wrap_any(method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(inner):
        return _wrap_stream(method, inner)
    return _wrap_unary(method, inner)


class ErrorStatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors raised by any handler to a status code with a readable detail."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return wrap_handler(handler, handler_call_details.method, _wrap_any, mark_malformed=True)
