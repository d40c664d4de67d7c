"""The job queue interface and its registry.

One training job per session travels through a queue with at-least-once
delivery. A consumer ``receive``s a ``Lease``; while it holds the lease nobody
else gets the job. The lease lasts a visibility timeout (SQLite) or an ack
deadline (Pub/Sub); a long job keeps it alive with ``heartbeat()`` — or, more
simply, runs inside ``with lease.keep_alive():``, a thread that heartbeats for
it. A worker that dies stops heartbeating, its lease expires and the job is
delivered again, to whichever consumer asks next, with ``attempt`` + 1.

Settling a lease:
- ``ack()``: the job is finished (done *or* failed for good); never delivered again.
  Idempotent, and a stale ack (from a worker whose lease expired and went to
  someone else) does not remove the other worker's job.
- ``nack(retry_after_s)``: give it back for another attempt after a delay.
- ``dead_letter(reason)``: park it where ops can see it; never delivered again.
- ``release()``: hand it back at once *without* using up an attempt: the worker is
  shutting down (SIGTERM), the job did not fail, and its checkpoint lets the next
  worker resume it.

Attempts. ``lease.final`` is True on attempt ``max_attempts``: the caller should
treat a failure as permanent (record it, then ack). ``nack()`` on a final
lease dead-letters instead of retrying. If the final attempt's worker died, the
job comes back once more with ``lease.exhausted`` set: the caller must not run
it again, only record why it gave up (e.g. "the worker died 3 times") and ack.

Delivery is at least once: a job may be delivered twice (a lost ack, a Pub/Sub
redelivery), so consumers must be idempotent on ``job_id`` (the repository's
job state says whether it is already done).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Lease(ABC):
    """One delivery of one job to one consumer."""

    def __init__(
        self,
        job_id: str,
        payload: dict[str, Any],
        attempt: int,
        max_attempts: int,
        heartbeat_s: float,
    ):
        self.job_id = job_id
        self.payload = payload
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.heartbeat_s = heartbeat_s
        # Set when a heartbeat learns that the lease went to someone else.
        self.lost = threading.Event()
        self._settled: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(job_id={self.job_id!r}, attempt={self.attempt}/"
            f"{self.max_attempts}, settled={self._settled})"
        )

    @property
    def final(self) -> bool:
        """This is the last attempt: a failure now is permanent."""
        return self.attempt >= self.max_attempts

    @property
    def exhausted(self) -> bool:
        """Every attempt was used (the final one's worker died): record the failure and ack."""
        return self.attempt > self.max_attempts

    @property
    def settled(self) -> str | None:
        """None while held; else "acked", "nacked", "released" or "dead"."""
        return self._settled

    # ---- what a consumer calls -------------------------------------------------------

    def heartbeat(self) -> bool:
        """Extend the lease by a full timeout. False if it is known to be lost."""
        with self._lock:
            if self._settled is not None or self.lost.is_set():
                return False
            ok = self._extend()
        if not ok:
            self.lost.set()
            log.warning("lease lost", extra={"job_id": self.job_id, "attempt": self.attempt})
        return ok

    extend = heartbeat

    def ack(self) -> None:
        with self._lock:
            if self._settled is not None:
                return
            self._ack()
            self._settled = "acked"

    def nack(self, retry_after_s: float = 0.0) -> None:
        if retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        if self.final:
            self.dead_letter(f"gave up after attempt {self.attempt} of {self.max_attempts}")
            return
        with self._lock:
            if self._settled is not None:
                return
            self._nack(retry_after_s)
            self._settled = "nacked"

    def release(self) -> None:
        """Give the job back for immediate delivery, keeping its attempt count.

        Unlike ``nack``, a final lease is not dead-lettered: stopping a worker is not
        a failure of the job, so a rolling deploy must not use up its attempts.
        """
        with self._lock:
            if self._settled is not None:
                return
            self._release()
            self._settled = "released"
        log.info("job handed back", extra={"job_id": self.job_id, "attempt": self.attempt})

    def dead_letter(self, reason: str) -> None:
        with self._lock:
            if self._settled is not None:
                return
            self._dead_letter(reason)
            self._settled = "dead"
        log.error(
            "job dead-lettered",
            extra={"job_id": self.job_id, "attempt": self.attempt, "reason": reason},
        )

    @contextlib.contextmanager
    def keep_alive(
        self, interval_s: float | None = None, *, also: Callable[[], bool] | None = None
    ) -> Iterator[Lease]:
        """Heartbeat from a background thread while the block runs.

        ``also`` beats with it (the worker's own claim on the job, in its database);
        when it answers False the lease counts as lost too. Check ``lease.lost`` at
        safe points: once set, another worker may hold the job.
        """
        interval = self.heartbeat_s if interval_s is None else interval_s
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                for what, fn in (("heartbeat", self.heartbeat), ("claim", also)):
                    if fn is None:
                        continue
                    try:
                        if not fn():
                            self.lost.set()  # heartbeat() has set it already; a lost claim here
                            return
                    except Exception as e:  # a transient outage: keep trying until it expires
                        log.warning(
                            f"{what} failed",
                            extra={"job_id": self.job_id, "error": f"{type(e).__name__}: {e}"},
                        )

        thread = threading.Thread(target=beat, name=f"lease-{self.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    # ---- what a backend implements ---------------------------------------------------

    @abstractmethod
    def _extend(self) -> bool: ...

    @abstractmethod
    def _ack(self) -> None: ...

    @abstractmethod
    def _nack(self, retry_after_s: float) -> None: ...

    @abstractmethod
    def _dead_letter(self, reason: str) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...


class JobQueue(Protocol):
    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        """Enqueue a job; the payload must be JSON-serialisable."""

    def receive(self, timeout_s: float) -> Lease | None:
        """The next visible job, waiting up to about ``timeout_s``; None if there was none."""

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Dead-lettered jobs for ops: ``{job_id, payload, reason}``. Does not consume them."""

    def close(self) -> None: ...


_MODULES = {"sqlite": "cloud_trainer.queue.sqlite", "pubsub": "cloud_trainer.queue.pubsub"}
_FACTORIES: dict[str, Callable[..., JobQueue]] = {}


def register(type_key: str) -> Callable[[Callable[..., JobQueue]], Callable[..., JobQueue]]:
    def deco(factory: Callable[..., JobQueue]) -> Callable[..., JobQueue]:
        _FACTORIES[type_key] = factory
        return factory

    return deco


def create_job_queue(cfg) -> JobQueue:  # cfg: SqliteQueue | PubSubQueue
    if cfg.type not in _FACTORIES:
        importlib.import_module(_MODULES[cfg.type])
    return _FACTORIES[cfg.type](cfg)
