"""Who is calling: per-agent bearer tokens, and TLS credentials for the server.

Agents send ``authorization: Bearer <token>`` in gRPC metadata. The config keeps
only the token's sha256 (``ingest.agents[].token_sha256``), so a leaked config
does not leak working tokens; comparisons are constant-time. A token belongs
to one camera: the handlers check that the camera an agent speaks for is the
one its token was issued to (``current_agent()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from cloud_trainer.ingest.errors import (
    Malformed,
    PermissionDenied,
    Unauthenticated,
    wrap_handler,
)

log = logging.getLogger(__name__)

# Set for the duration of one authenticated RPC (each RPC runs in its own task).
_current: contextvars.ContextVar[AgentIdentity | None] = contextvars.ContextVar(
    "ingest_agent", default=None
)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    booth_id: str
    camera_id: str
    seconds_left: float | None = None  # until the token expires (None: it does not)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class _TokenEntry:
    digest: bytes
    camera_id: str
    expires_at: float | None


class TokenBook:
    """The registered agents of one booth and their hashed tokens."""

    def __init__(
        self, booth_id: str, agents: Iterable[Any], clock: Callable[[], float] = time.time
    ):
        # agents: cloud_trainer.config.AgentToken
        self.booth_id = booth_id
        self._entries = [
            _TokenEntry(bytes.fromhex(a.token_sha256), a.camera_id, a.expires_at) for a in agents
        ]
        self._clock = clock

    @property
    def cameras(self) -> list[str]:
        return sorted({e.camera_id for e in self._entries})

    def authenticate(self, authorization: str | None) -> AgentIdentity:
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        match = None
        # Compare against every entry so the time taken says nothing about which one matched.
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest) and match is None:
                match = entry
        if match is None:
            raise Unauthenticated("unknown token")
        left = None if match.expires_at is None else match.expires_at - self._clock()
        if left is not None and left <= 0:
            raise Unauthenticated(f"token for camera {match.camera_id!r} has expired")
        return AgentIdentity(self.booth_id, match.camera_id, left)


def current_agent() -> AgentIdentity:
    """The caller of the RPC being handled; only valid inside a handler behind the interceptor."""
    agent = _current.get()
    if agent is None:
        raise Unauthenticated("request was not authenticated")
    return agent


def check_caller(booth_id: str, camera_id: str) -> AgentIdentity:
    """Refuse an agent speaking for a booth or camera its token was not issued to."""
    agent = current_agent()
    if booth_id != agent.booth_id:
        raise PermissionDenied(
            f"camera {camera_id!r} is not registered to booth {booth_id!r} "
            f"(this server serves booth {agent.booth_id!r})"
        )
    if camera_id != agent.camera_id:
        raise PermissionDenied(
            f"camera {camera_id!r} is not registered to booth {booth_id!r} for this token "
            f"(the token belongs to {agent.camera_id!r})"
        )
    return agent


def _refusal(handler: grpc.RpcMethodHandler, method: str, detail: str) -> grpc.RpcMethodHandler:
    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        # Logged here, where the caller's address is known: an unknown token names no
        # camera, and the address is what tells ops which board to fix.
        log.warning("%s from %s refused: UNAUTHENTICATED %s", method, context.peer(), detail)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    return wrap_handler(handler, "", lambda _m, _b: refuse)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, book: TokenBook):
        self._book = book

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        try:
            agent = self._book.authenticate(authorization)
        except Unauthenticated as e:
            return _refusal(handler, handler_call_details.method, str(e))
        return wrap_handler(handler, handler_call_details.method, _bind(agent))


@contextlib.asynccontextmanager
async def _until_expiry(
    agent: AgentIdentity, context: grpc.aio.ServicerContext
) -> AsyncIterator[None]:
    """End a call when its token expires: a stream opened just before must not outlive it."""
    if agent.seconds_left is None:
        yield
        return
    async with asyncio.timeout(agent.seconds_left) as deadline:
        try:
            yield
        except asyncio.CancelledError:
            if not deadline.expired():
                raise
    if deadline.expired():
        log.warning("camera %s: token expired during a call; ending it", agent.camera_id)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"token for camera {agent.camera_id!r} has expired",
        )


def _bind(agent: AgentIdentity) -> Callable[[str, Callable], Callable]:
    import inspect

    def wrap(_method: str, inner: Callable) -> Callable:
        if inspect.isasyncgenfunction(inner):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    request.refuse()
                _current.set(agent)
                async with _until_expiry(agent, context):
                    async for response in inner(request, context):
                        yield response

            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Malformed):
                request.refuse()
            _current.set(agent)
            async with _until_expiry(agent, context):
                return await inner(request, context)

        return unary

    return wrap


def server_credentials(tls: Any) -> grpc.ServerCredentials:
    """TLS credentials from ``ingest.tls`` (cert and key as PEM files)."""
    from edge_agent.errors import BadInput

    try:
        cert = tls.cert.read_bytes()
        key = tls.key.read_bytes()
    except OSError as e:
        raise BadInput(f"ingest.tls: cannot read {e.filename}: {e.strerror}") from None
    problem = tls_pair_problem(cert, key)
    if problem:
        # gRPC would only say it failed to bind, and ops would look for a port conflict.
        raise BadInput(f"ingest.tls: {problem} (cert {tls.cert}, key {tls.key})")
    return grpc.ssl_server_credentials([(key, cert)])


def tls_pair_problem(cert_pem: bytes, key_pem: bytes) -> str | None:
    """Why a PEM certificate and private key cannot serve TLS together, or None."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ModuleNotFoundError:  # cannot check here: gRPC will say what it can
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "the cert file holds no PEM certificate (are cert and key swapped?)"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return "the key file holds no unencrypted PEM private key (are cert and key swapped?)"
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, raw) != cert.public_key().public_bytes(der, raw):
        return "the key does not belong to the certificate (a renewal with the old key?)"
    return None
