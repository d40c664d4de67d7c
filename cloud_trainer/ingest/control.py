"""Control: agents hold a stream open; the cloud pushes StartTake/StopTake down it.

``AgentRegistry`` is the Python API the web app uses::

    booth = registry.booth("booth-1")
    booth.agents()                              # who is online, what each is doing
    results = await booth.start_take(session_id, duration_s=15)
    results["cam0"].acked, results["cam0"].state

A command is acknowledged when the agent's next ``Report`` carries its
``command_id`` as ``last_command_id`` (agents report right after executing one).
Agents dedupe by ``command_id``, so resending a command is always safe.

The registry lives on the gRPC server's event loop. Its async methods may be
awaited from another loop (a web app in its own thread): they hop over.
The last status of each agent is also written to the ``agents`` table.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import secrets
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from cloud_trainer.ingest.auth import check_caller
from protos import booth_pb2, booth_pb2_grpc

log = logging.getLogger(__name__)

# Commands waiting for an agent that does not read them; more means it is stuck.
COMMAND_QUEUE = 32


def state_name(state: int) -> str:
    """``booth_pb2.CAPTURING`` -> ``"capturing"``."""
    name = booth_pb2.AgentState.Name(state) if state in booth_pb2.AgentState.values() else ""
    return "unknown" if name in ("", "AGENT_STATE_UNSPECIFIED") else name.lower()


@dataclass
class AgentView:
    """What the tablet shows about one camera's agent."""

    booth_id: str
    camera_id: str
    online: bool
    state: str  # idle | capturing | uploading | error | unknown | offline
    session_id: str
    last_seen: float | None
    software_version: str = ""
    capabilities: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class CommandResult:
    """One agent's answer to a command."""

    camera_id: str
    command_id: str
    delivered: bool  # pushed down an open control stream
    acked: bool  # the agent reported it executed the command
    state: str
    session_id: str = ""
    error: str = ""


class _Link:
    """One open Connect stream."""

    def __init__(self, register: booth_pb2.Register):
        self.register = register
        self.queue: asyncio.Queue[booth_pb2.Command | None] = asyncio.Queue(COMMAND_QUEUE)


class AgentRegistry:
    def __init__(self, repo: Any = None, clock: Any = time.time):
        self._repo = repo
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._links: dict[tuple[str, str], _Link] = {}
        self._status: dict[tuple[str, str], booth_pb2.AgentStatus] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._registered: dict[tuple[str, str], booth_pb2.Register] = {}
        self._waiters: dict[tuple[str, str, str], asyncio.Future[booth_pb2.AgentStatus]] = {}
        # One writer thread, so rows land in the order they were issued: with a pool, an
        # agent's "capturing" could finish after its "offline" and stick.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="agent-status")

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def booth(self, booth_id: str) -> Booth:
        return Booth(self, booth_id)

    # ---- reading (safe from any thread) -----------------------------------------------

    def agents(self, booth_id: str) -> list[AgentView]:
        keys = {k for k in (*self._registered, *self._status) if k[0] == booth_id}
        views = []
        for key in sorted(keys):
            online = key in self._links
            status = self._status.get(key)
            reg = self._registered.get(key)
            views.append(
                AgentView(
                    booth_id=key[0],
                    camera_id=key[1],
                    online=online,
                    state=_view_state(online, status),
                    session_id=status.session_id if status else "",
                    last_seen=self._seen.get(key),
                    software_version=reg.software_version if reg else "",
                    capabilities=_as_dict(reg.capabilities) if reg else {},
                    status=_as_dict(status) if status else {},
                )
            )
        return views

    # ---- called by the Control service --------------------------------------------------

    def attach(self, register: booth_pb2.Register) -> _Link:
        """Register an open Connect stream (synchronously: the caller's finally detaches it)."""
        key = (register.booth_id, register.camera_id)
        old = self._links.get(key)
        if old is not None:  # the agent reconnected; the old stream is dead or dying
            _offer(old.queue, None)
        link = _Link(register)
        self._links[key] = link
        self._registered[key] = register
        self._seen[key] = self._clock()
        log.info("agent %s/%s connected (%s)", *key, register.software_version or "?")
        return link

    async def record_connected(self, link: _Link) -> None:
        await self._persist((link.register.booth_id, link.register.camera_id), state="idle")

    async def detach(self, link: _Link) -> None:
        key = (link.register.booth_id, link.register.camera_id)
        if self._links.get(key) is link:
            del self._links[key]
            log.info("agent %s/%s disconnected", *key)
            await self._persist(key, state="offline")

    async def report(self, status: booth_pb2.AgentStatus) -> None:
        key = (status.booth_id, status.camera_id)
        self._status[key] = status
        self._seen[key] = self._clock()
        if status.last_command_id:
            waiter = self._waiters.get((*key, status.last_command_id))
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
        # A report comes on its own RPC and can arrive after the agent's stream closed:
        # the row must then say offline, not the state the agent last knew.
        state = state_name(status.state) if key in self._links else "offline"
        await self._persist(key, state=state)

    async def _persist(self, key: tuple[str, str], *, state: str) -> None:
        if self._repo is None:
            return
        reg = self._registered.get(key)
        status = self._status.get(key)
        try:
            write = functools.partial(
                self._repo.upsert_agent,
                key[0],
                key[1],
                state=state,
                last_seen=self._seen.get(key, self._clock()),
                software_version=reg.software_version if reg else None,
                capabilities=_as_dict(reg.capabilities) if reg else None,
                status=_persisted(status) if status else None,
            )
            await asyncio.get_running_loop().run_in_executor(self._writer, write)
        except Exception as e:
            # Status is advisory; a database hiccup must not cut an agent's control stream.
            log.warning("could not record status of agent %s/%s: %s", *key, e)

    # ---- commands ------------------------------------------------------------------------

    async def send(
        self, booth_id: str, command: booth_pb2.Command, command_id: str, timeout_s: float
    ) -> dict[str, CommandResult]:
        """Push ``command`` to every online agent of the booth; wait for their reports."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            return await _hop(self._loop, self.send(booth_id, command, command_id, timeout_s))
        results: dict[str, CommandResult] = {}
        waits: dict[str, asyncio.Future[booth_pb2.AgentStatus]] = {}
        for (b, cam), link in list(self._links.items()):
            if b != booth_id:
                continue
            fut = asyncio.get_running_loop().create_future()
            self._waiters[(b, cam, command_id)] = fut
            if _offer(link.queue, command):
                waits[cam] = fut
            else:
                results[cam] = CommandResult(
                    cam, command_id, False, False, "unknown", error="agent is not reading commands"
                )
        try:
            if waits:
                await asyncio.wait(waits.values(), timeout=timeout_s)
        finally:
            for cam in waits:
                self._waiters.pop((booth_id, cam, command_id), None)
            for key in [k for k in self._waiters if k[2] == command_id]:
                self._waiters.pop(key, None)
        for cam, fut in waits.items():
            if fut.done():
                st = fut.result()
                results[cam] = CommandResult(
                    cam, command_id, True, True, state_name(st.state), st.session_id, st.error
                )
            else:
                last = self._status.get((booth_id, cam))
                results[cam] = CommandResult(
                    cam,
                    command_id,
                    True,
                    False,
                    state_name(last.state) if last else "unknown",
                    last.session_id if last else "",
                    error=f"no report within {timeout_s:g} s",
                )
        return results


class Booth:
    """The agents of one booth, as the web app sees them."""

    def __init__(self, registry: AgentRegistry, booth_id: str):
        self.registry, self.booth_id = registry, booth_id

    def agents(self) -> list[AgentView]:
        return self.registry.agents(self.booth_id)

    def online(self) -> list[str]:
        return [a.camera_id for a in self.agents() if a.online]

    async def start_take(
        self,
        session_id: str,
        duration_s: float,
        *,
        start_at_ns: int = 0,
        command_id: str | None = None,
        timeout_s: float = 5.0,
    ) -> dict[str, CommandResult]:
        command_id = command_id or secrets.token_hex(8)
        cmd = booth_pb2.Command(
            start=booth_pb2.StartTake(
                command_id=command_id,
                session_id=session_id,
                duration_s=duration_s,
                start_at_ns=start_at_ns,
            )
        )
        log.info("start take %s (%g s) on booth %s", session_id, duration_s, self.booth_id)
        return await self.registry.send(self.booth_id, cmd, command_id, timeout_s)

    async def stop_take(
        self, session_id: str, *, command_id: str | None = None, timeout_s: float = 5.0
    ) -> dict[str, CommandResult]:
        command_id = command_id or secrets.token_hex(8)
        cmd = booth_pb2.Command(
            stop=booth_pb2.StopTake(command_id=command_id, session_id=session_id)
        )
        log.info("stop take %s on booth %s", session_id, self.booth_id)
        return await self.registry.send(self.booth_id, cmd, command_id, timeout_s)


class ControlService(booth_pb2_grpc.ControlServicer):
    def __init__(self, registry: AgentRegistry):
        self.registry = registry

    async def Connect(self, request: booth_pb2.Register, context: grpc.aio.ServicerContext) -> Any:
        check_caller(request.booth_id, request.camera_id)
        link = self.registry.attach(request)
        try:
            # Inside the try: an agent that leaves while this write runs is still detached.
            await self.registry.record_connected(link)
            while True:
                cmd = await link.queue.get()
                if cmd is None:
                    return  # superseded by a newer stream of the same agent
                yield cmd
        finally:
            await asyncio.shield(self.registry.detach(link))

    async def Report(
        self, request: booth_pb2.AgentStatus, context: grpc.aio.ServicerContext
    ) -> booth_pb2.ReportAck:
        check_caller(request.booth_id, request.camera_id)
        await self.registry.report(request)
        return booth_pb2.ReportAck(server_time_ns=time.time_ns())


def _view_state(online: bool, status: booth_pb2.AgentStatus | None) -> str:
    if not online:
        return "offline"
    return state_name(status.state) if status is not None else "unknown"


def _offer(queue: asyncio.Queue, item: Any) -> bool:
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        return False
    return True


# Shown live from memory, stale a second later: not worth a row write per report.
_NOT_PERSISTED = frozenset({"live_pose"})


def _persisted(status: booth_pb2.AgentStatus) -> dict[str, Any]:
    return {k: v for k, v in _as_dict(status).items() if k not in _NOT_PERSISTED}


def _as_dict(message: Any) -> dict[str, Any]:
    """Every field with its native Python type (ints stay ints, unlike proto JSON's int64
    strings; the agent state is its lower-case name), so the tablet sees stable keys."""
    out: dict[str, Any] = {}
    for field_desc in message.DESCRIPTOR.fields:
        value = getattr(message, field_desc.name)
        if field_desc.is_repeated:
            if field_desc.message_type is not None:
                value = [_as_dict(v) for v in value]
            else:
                value = list(value)
        elif field_desc.message_type is not None:
            value = _as_dict(value)
        elif field_desc.enum_type is not None:
            value = state_name(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None  # an agent's NaN fps must not break strict JSON (tablet, PostgreSQL)
        out[field_desc.name] = value
    return out


async def _hop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))
