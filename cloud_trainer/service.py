"""The cloud process (``booth serve``): web app + API, gRPC ingest and control, job dispatch, mail.

Everything shares one asyncio loop, one repository and one blob store:
- uvicorn serves the FastAPI app (tablet, attendee pages, JSON API, metrics);
- the grpc.aio server takes agents' frames and holds their control streams;
- when every camera of a session is uploaded, a training job is queued;
- a thread sends the email outbox.
Training runs in separate ``booth worker`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from cloud_trainer.config import BoothConfig, refuse_placeholders
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 30.0
# Seconds open HTTP requests (event streams, a slow probe) get to finish on stop.
HTTP_SHUTDOWN_S = 5.0
RETENTION_SWEEP_S = 3600.0
STALLED_SWEEP_S = 60.0
# A job younger than this may be in the middle of its own publish (the upload hook's).
PUBLISH_SETTLE_S = 30.0


def stalled_after_s(queue_cfg: Any) -> float:
    """How long a running job may go unbeaten before it is queued again.

    Several leases: the queue's own redelivery comes first, after one.
    """
    return max(300.0, 5 * queue_cfg.lease_s)


async def every(interval_s: float, work: Callable[[], Any], what: str) -> None:
    """Run ``work`` in a thread now and every ``interval_s``, forever.

    One failed round (a database hiccup, a delete racing it) is logged and the next
    round runs: a sweeper that died would silently stop doing its job.
    """
    while True:
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("%s failed; trying again in %g s", what, interval_s)
        await asyncio.sleep(interval_s)


def pending_job_sweep(repo: Any, queue: Any) -> Coroutine[Any, Any, None]:
    """Every minute, publish a job the queue refused, or one handed back after its message
    was gone (``dispatch.publish_pending``): run by whichever process takes uploads."""
    from cloud_trainer.dispatch import publish_pending

    return every(
        STALLED_SWEEP_S,
        lambda: publish_pending(repo, queue, settle_s=PUBLISH_SETTLE_S),
        "queueing training jobs that are not on the queue",
    )


class RegistryController:
    """The control plane as the front desk sees it (see ``front_desk.TakeController``)."""

    def __init__(self, registry: Any, countdown_s: float, repo: Any):
        self.registry, self.countdown_s, self.repo = registry, countdown_s, repo

    def online_agents(self, booth_id: str) -> list[dict[str, Any]]:
        out = []
        for a in self.registry.agents(booth_id):
            # An agent may report NaN or infinity (fps of an empty take); JSON has neither.
            status = {
                k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in (a.status or {}).items()
            }
            out.append(
                {
                    "camera_id": a.camera_id,
                    "online": a.online,
                    "state": a.state,
                    "session_id": a.session_id,
                    "fps": status.get("fps"),
                    "frames_captured": status.get("frames_captured"),
                    "capture_dropped": status.get("capture_dropped", 0),
                    "pose_dropped": status.get("pose_dropped", 0),
                    "frames_acked": status.get("frames_acked"),
                    "upload_behind": status.get("upload_behind", False),
                    "error": status.get("error") or "",
                    "warnings": list(status.get("warnings") or []),
                    "live_pose": _keypoints(status.get("live_pose")),
                    "last_seen": a.last_seen,
                }
            )
        return [a for a in out if a["online"]] + [a for a in out if not a["online"]]

    async def start_take(
        self, booth_id: str, session_id: str, duration_s: float
    ) -> list[dict[str, Any]]:
        # Every camera starts at the same instant on the shared booth clock, after the
        # countdown the tablet shows.
        start_at_ns = time.time_ns() + int(self.countdown_s * 1e9)
        self.repo.set_progress(session_id, capture_at=start_at_ns / 1e9, stage="capturing")
        results = await self.registry.booth(booth_id).start_take(
            session_id, duration_s, start_at_ns=start_at_ns
        )
        answers = [
            {
                "camera_id": r.camera_id,
                "delivered": r.delivered,
                "acked": r.acked,
                "state": r.state,
                "session_id": r.session_id,
                "error": r.error,
            }
            for r in results.values()
        ]
        if not any(r["delivered"] for r in answers):
            raise BoothError(
                "no camera received the start command; check that the boards are online"
            )
        return answers

    async def stop_take(self, booth_id: str, session_id: str) -> list[str]:
        """StopTake to the booth's cameras; the cameras that received it."""
        results = await self.registry.booth(booth_id).stop_take(session_id)
        return sorted(r.camera_id for r in results.values() if r.delivered)


def listen_socket(host: str, port: int, what: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening, or BoothError saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, OverflowError) as e:
        raise BoothError(f"{what} cannot listen on {host}:{port}: {_reason(e)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise BoothError(
            f"{what} cannot listen on {host}:{port}: {_reason(e)} (is another booth running?)"
        ) from None
    sock.set_inheritable(True)
    return sock


def _reason(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


@dataclass
class Service:
    settings: BoothConfig
    http_port: int | None = None
    grpc_port: int | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    bound: dict[str, int] = field(default_factory=dict)

    async def run(self) -> None:
        import uvicorn

        from cloud_trainer.deliver import OutboxSender
        from cloud_trainer.dispatch import enqueue_training, publish_pending
        from cloud_trainer.ingest.control import AgentRegistry
        from cloud_trainer.ingest.server import serve
        from cloud_trainer.queue import create_job_queue
        from cloud_trainer.repository import Repository
        from cloud_trainer.storage import create_blob_store
        from cloud_trainer.web import create_app

        cfg = self.settings
        refuse_placeholders(cfg, ("web", "mail", "database"))  # it sends the outbox too
        if not cfg.web.staff:
            log.warning(
                "web.staff is empty: nobody can log in to start a session "
                "(add one with `booth staff hash-password`)"
            )
        http_port = cfg.web.port if self.http_port is None else self.http_port
        # Bound here, first, not by uvicorn: a port in use is one line (exit 2) before
        # anything started, where uvicorn logs a traceback and exits the process itself.
        http_socket = listen_socket(cfg.web.host, http_port, "the web server")
        repo = Repository.from_config(cfg.database)
        store = create_blob_store(cfg.storage)
        queue = create_job_queue(cfg.queue)
        bounces = None
        if getattr(cfg.mail, "bounces_listen", None) and cfg.mail.bounce_address:
            from cloud_trainer.bounces import BounceServer

            host, _, port = cfg.mail.bounces_listen.rpartition(":")
            bounces = BounceServer(repo, cfg.mail.bounce_address, host, int(port)).start()
            self.bound["bounces"] = bounces.port
        try:
            publish_pending(repo, queue)
        except Exception as e:  # the queue is down: the sweep below retries every minute
            log.warning("could not queue pending training jobs yet (%s); retrying", e)
        registry = AgentRegistry(repo=repo)
        registry.bind_loop(asyncio.get_running_loop())

        async def on_uploaded(session_id: str) -> None:
            await asyncio.to_thread(enqueue_training, repo, queue, session_id)

        ingest = serve(
            cfg,
            store=store,
            repo=repo,
            registry=registry,
            on_session_uploaded=on_uploaded,
            port=self.grpc_port,
        )
        await ingest.start()
        self.bound["grpc"] = ingest.port
        control = RegistryController(registry, cfg.booth.countdown_s, repo)
        app = create_app(
            cfg,
            repo=repo,
            store=store,
            control=control,
            enqueue=lambda sid: enqueue_training(repo, queue, sid),
        )
        server = _quiet_server(
            uvicorn.Config(
                app,
                host=cfg.web.host,
                port=http_port,
                log_level="warning",
                lifespan="off",
                proxy_headers=True,
                forwarded_allow_ips=cfg.web.forwarded_allow_ips,
                # A tablet's open event stream must not hold a stop (a deploy) until
                # Docker's SIGKILL: requests still open after this are cancelled.
                timeout_graceful_shutdown=HTTP_SHUTDOWN_S,
            )
        )
        mail_stop = threading.Event()
        sender = OutboxSender(repo, cfg.mail, store=store)
        mail_thread = threading.Thread(
            target=sender.run_forever, args=(mail_stop,), name="outbox", daemon=True
        )
        mail_thread.start()
        http_task = asyncio.create_task(server.serve(sockets=[http_socket]))
        while not server.started and not http_task.done():
            await asyncio.sleep(0.05)
        if http_task.done():
            await ingest.stop(0)
            if bounces is not None:
                bounces.stop()
            http_task.result()
            raise BoothError("the web server did not start")
        self.bound["http"] = server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "booth %s serving: http on %s:%d, grpc on %s:%d",
            cfg.booth.id,
            cfg.web.host,
            self.bound["http"],
            cfg.ingest.host,
            self.bound["grpc"],
        )
        self.ready.set()

        from cloud_trainer.dispatch import fail_overdue_captures, republish_stalled

        desk = app.state.services.desk
        keep_s = cfg.links.expiry_days * 86400.0
        sweepers = [
            asyncio.create_task(
                every(
                    SWEEP_INTERVAL_S,
                    lambda: fail_overdue_captures(repo, cfg.booth.upload_deadline_s),
                    "checking for overdue captures",
                )
            ),
            asyncio.create_task(
                every(
                    STALLED_SWEEP_S,
                    lambda: republish_stalled(repo, queue, stalled_after_s(cfg.queue)),
                    "looking for jobs whose worker died",
                )
            ),
            asyncio.create_task(pending_job_sweep(repo, queue)),
            # The consent says: kept until deleted or the link expires. Then it goes.
            asyncio.create_task(
                every(
                    RETENTION_SWEEP_S, lambda: desk.delete_expired(keep_s), "deleting expired data"
                )
            ),
        ]
        try:
            stop_task = asyncio.create_task(self.stop.wait())
            await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for sweeper in sweepers:
                sweeper.cancel()
            server.should_exit = True
            mail_stop.set()
            if bounces is not None:
                bounces.stop()
            await ingest.stop(2.0)
            await asyncio.gather(http_task, return_exceptions=True)
            mail_thread.join(timeout=5)
            queue.close()
            repo.close()


def _quiet_server(config):
    """A uvicorn server without its own signal handling: ``booth serve`` owns SIGTERM/SIGINT.

    uvicorn swaps in its handlers while it serves, so a SIGTERM stopped only the web
    server (ingest and the sweeps ran on), a second one went unseen, and it raised the
    signal again once done. Here the service's stop event shuts everything down,
    uvicorn included, and a second signal ends the process (``commands.serve``).
    """
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return QuietServer(config)


def _keypoints(skeleton: dict[str, Any] | None) -> list[list[float | None]] | None:
    """A reported Skeleton as ``[[x, y, score], ...]`` (fractions of the frame), or None."""
    points = (skeleton or {}).get("keypoints") or []
    if not points:
        return None
    return [[k.get("x"), k.get("y"), k.get("score")] for k in points]
