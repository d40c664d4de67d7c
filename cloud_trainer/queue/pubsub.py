"""The ``pubsub`` job queue: Google Cloud Pub/Sub with synchronous pull.

Why synchronous pull rather than the streaming ``subscribe()`` callback API: a
worker runs one long job at a time, so it asks for exactly one message when it
is free, and the lease is an explicit object it extends and settles. Nothing is
buffered client-side, so a busy worker never sits on messages another worker
could run, and there is no lease manager doing things behind our back.

Mapping onto Pub/Sub:
- lease = the message's ack deadline. ``receive`` pulls one message; if the
  configured ``ack_deadline_s`` differs from the subscription's (which cannot
  go below 10 s), it sets the message's deadline with ``modify_ack_deadline``.
- heartbeat = ``modify_ack_deadline`` by ``ack_deadline_s`` again;
  ``Lease.keep_alive()`` runs it in a thread (every third of the deadline).
- a worker that dies stops extending; the deadline expires and Pub/Sub
  redelivers the message to any subscriber.
- attempts = ``delivery_attempt``, which Pub/Sub fills in only for
  subscriptions with a dead-letter policy; so we create the subscription with
  one (``<topic>-dead``, forwarding after ``max_attempts + 2`` deliveries, at
  least Pub/Sub's minimum of 5). Our own ``max_attempts`` logic runs first and
  dead-letters explicitly; Pub/Sub's forwarding is a backstop. (On real GCP the
  Pub/Sub service agent needs publisher rights on the dead-letter topic and
  subscriber rights on the subscription for that backstop to work.)
- ``nack(retry_after_s)`` = ``modify_ack_deadline(retry_after_s)``: the message
  comes back after the delay (at most 600 s).
- ``release()`` publishes a copy that carries the attempts used so far
  (``prior_attempts``) and acks the original, since Pub/Sub counts every
  delivery and a handed-back job must not lose an attempt. Should the worker
  die between the two, the job is delivered twice; the repository's job state
  makes that harmless.
- ``dead_letter(reason)`` publishes a copy to ``<topic>-dead`` (kept by the
  ``<subscription>-dead`` subscription for ops) and acks the original.

Pub/Sub does not deduplicate publishes: publishing one job twice delivers it
twice, and consumers check the job's state in the repository.
The emulator is used when ``PUBSUB_EMULATOR_HOST`` is set (the client reads it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

from cloud_trainer.queue.base import Lease, register
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

# Pub/Sub limits: subscription ack deadlines are 10-600 s; modify_ack_deadline 0-600 s;
# dead-letter policies forward after 5-100 delivery attempts.
_MIN_SUBSCRIPTION_DEADLINE_S = 10
_MAX_DEADLINE_S = 600
_MIN_DEAD_LETTER_ATTEMPTS, _MAX_DEAD_LETTER_ATTEMPTS = 5, 100
# A pull shorter than this risks the RPC deadline expiring while a message is in
# flight to us; that message would then wait out its ack deadline.
_MIN_PULL_S = 1.0
_PUBLISH_TIMEOUT_S = 30.0
# Setting up the topics and subscriptions: how long to keep trying an endpoint that does
# not answer before saying so (the client's own default is 10 minutes of silence).
SETUP_TIMEOUT_S = 30.0


class PubSubJobQueue:
    def __init__(
        self,
        *,
        project: str,
        topic: str,
        subscription: str,
        ack_deadline_s: int = 60,
        max_attempts: int = 3,
    ):
        # Imported here: the package must import without the Pub/Sub client.
        from google.api_core import exceptions as gexc
        from google.cloud import pubsub_v1

        self._gexc = gexc
        self.max_attempts = max_attempts
        self.lease_s = int(min(max(ack_deadline_s, 1), _MAX_DEADLINE_S))
        from google.auth.exceptions import DefaultCredentialsError

        try:
            self._publisher = pubsub_v1.PublisherClient()
            self._subscriber = pubsub_v1.SubscriberClient()
        except DefaultCredentialsError as e:
            from cloud_trainer.storage.gcs import credentials_error

            raise BoothError(
                credentials_error("Pub/Sub", e, "set PUBSUB_EMULATOR_HOST for the emulator")
            ) from e
        self.topic_path = self._publisher.topic_path(project, topic)
        self.dead_topic_path = self._publisher.topic_path(project, f"{topic}-dead")
        self.subscription_path = self._subscriber.subscription_path(project, subscription)
        self.dead_subscription_path = self._subscriber.subscription_path(
            project, f"{subscription}-dead"
        )
        self._subscription_deadline_s = min(
            max(self.lease_s, _MIN_SUBSCRIPTION_DEADLINE_S), _MAX_DEADLINE_S
        )
        from google.api_core.retry import Retry, if_exception_type

        endpoint = os.environ.get("PUBSUB_EMULATOR_HOST") or "pubsub.googleapis.com"
        self._setup = {
            "retry": Retry(
                initial=0.5,
                maximum=5.0,
                multiplier=2.0,
                timeout=SETUP_TIMEOUT_S,
                predicate=if_exception_type(gexc.ServiceUnavailable, gexc.DeadlineExceeded),
            ),
            "timeout": 10.0,
        }
        log.info("setting up the job queue", extra={"endpoint": endpoint, "topic": topic})
        try:
            self._ensure_topic(self.topic_path)
            self._ensure_topic(self.dead_topic_path)
            self._ensure_subscription(self.dead_subscription_path, self.dead_topic_path, None)
            existing = self._ensure_subscription(
                self.subscription_path, self.topic_path, self._dead_letter_policy()
            )
            if existing:
                # Made by someone else (gcloud's default is 10 s): its deadline is the one
                # Pub/Sub applies, so each lease must be stretched from that to ours.
                self._subscription_deadline_s = existing
        except (gexc.PermissionDenied, gexc.Unauthenticated) as e:
            self.close()
            raise BoothError(f"Pub/Sub refused to set up the job queue: {e.message}") from e
        except (gexc.RetryError, gexc.ServiceUnavailable, gexc.DeadlineExceeded) as e:
            self.close()
            raise BoothError(
                f"Pub/Sub at {endpoint} did not answer for {SETUP_TIMEOUT_S:.0f} s "
                f"({getattr(e, 'message', None) or e}): check the network"
                + (
                    ", and that the emulator runs (PUBSUB_EMULATOR_HOST)"
                    if "PUBSUB_EMULATOR_HOST" in os.environ
                    else ""
                )
            ) from None

    def __repr__(self) -> str:
        return f"PubSubJobQueue({self.subscription_path!r})"

    # ---- set-up -----------------------------------------------------------------------

    def _dead_letter_policy(self) -> dict[str, Any]:
        attempts = self.max_attempts + 2  # our own dead-lettering must act first
        attempts = min(max(attempts, _MIN_DEAD_LETTER_ATTEMPTS), _MAX_DEAD_LETTER_ATTEMPTS)
        return {"dead_letter_topic": self.dead_topic_path, "max_delivery_attempts": attempts}

    def _ensure_topic(self, path: str) -> None:
        try:
            self._publisher.get_topic(topic=path, **self._setup)
        except self._gexc.NotFound:
            try:
                self._publisher.create_topic(name=path, **self._setup)
                log.info("created Pub/Sub topic", extra={"topic": path})
            except self._gexc.AlreadyExists:
                log.debug("another worker created the topic first", extra={"topic": path})

    def _ensure_subscription(self, path: str, topic: str, dead_letter: dict | None) -> int | None:
        """Create the subscription unless it exists; an existing one's ack deadline (s)."""
        try:
            existing = self._subscriber.get_subscription(subscription=path, **self._setup)
        except self._gexc.NotFound:
            request: dict[str, Any] = {
                "name": path,
                "topic": topic,
                "ack_deadline_seconds": self._subscription_deadline_s,
            }
            if dead_letter:
                request["dead_letter_policy"] = dead_letter
            try:
                self._subscriber.create_subscription(request=request, **self._setup)
                log.info("created Pub/Sub subscription", extra={"subscription": path})
            except self._gexc.AlreadyExists:
                log.debug("another worker created it first", extra={"subscription": path})
            return None
        if dead_letter and not existing.dead_letter_policy.dead_letter_topic:
            log.warning(
                "subscription has no dead-letter policy: Pub/Sub will not count delivery "
                "attempts, so max_attempts cannot be enforced",
                extra={"subscription": path},
            )
        return existing.ack_deadline_seconds or None

    # ---- the interface ----------------------------------------------------------------

    def publish(self, job_id: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self._publisher.publish(self.topic_path, data, job_id=job_id).result(
            timeout=_PUBLISH_TIMEOUT_S
        )
        log.info("job published", extra={"job_id": job_id, "topic": self.topic_path})

    def receive(self, timeout_s: float) -> PubSubLease | None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            for received in self._pull(self.subscription_path, 1, max(remaining, _MIN_PULL_S)):
                lease = self._lease_from(received)
                if lease is not None:
                    return lease
            if time.monotonic() >= deadline:
                return None

    def _pull(self, subscription: str, max_messages: int, timeout_s: float) -> list:
        gexc = self._gexc
        try:
            response = self._subscriber.pull(
                request={"subscription": subscription, "max_messages": max_messages},
                timeout=timeout_s,
                retry=None,
            )
        except gexc.DeadlineExceeded:
            return []
        except gexc.ServiceUnavailable as e:
            log.warning("Pub/Sub unavailable; retrying", extra={"error": str(e)})
            time.sleep(min(timeout_s, 1.0))
            return []
        return list(response.received_messages)

    def _lease_from(self, received) -> PubSubLease | None:
        msg = received.message
        job_id = msg.attributes.get("job_id", "")
        try:
            prior = max(0, int(msg.attributes.get("prior_attempts", "0") or 0))
        except ValueError:
            prior = 0
        attempt = (received.delivery_attempt or 1) + prior
        try:
            payload = json.loads(msg.data.decode())
            if not job_id or not isinstance(payload, dict):
                raise ValueError(
                    "no job_id attribute" if not job_id else "payload is not an object"
                )
        except (UnicodeDecodeError, ValueError) as e:
            # Not one of ours: park it rather than let it bounce between workers.
            lease = PubSubLease(
                self, received.ack_id, job_id or msg.message_id, {}, attempt, data=msg.data
            )
            lease.dead_letter(f"malformed job message: {e}")
            return None
        if self.lease_s != self._subscription_deadline_s:
            self._modify(received.ack_id, self.lease_s)
        log.info("job leased", extra={"job_id": job_id, "attempt": attempt})
        return PubSubLease(self, received.ack_id, job_id, payload, attempt, data=msg.data)

    def _modify(self, ack_id: str, seconds: int) -> None:
        self._subscriber.modify_ack_deadline(
            request={
                "subscription": self.subscription_path,
                "ack_ids": [ack_id],
                "ack_deadline_seconds": seconds,
            }
        )

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """Peek at the dead-letter subscription; the messages stay there for ops."""
        received = self._pull(self.dead_subscription_path, limit, 5.0)
        if received:
            # Hand them straight back: looking must not consume them.
            self._subscriber.modify_ack_deadline(
                request={
                    "subscription": self.dead_subscription_path,
                    "ack_ids": [r.ack_id for r in received],
                    "ack_deadline_seconds": 0,
                }
            )
        out = []
        for r in received:
            try:
                payload = json.loads(r.message.data.decode())
            except (UnicodeDecodeError, ValueError):
                payload = None
            out.append(
                {
                    "job_id": r.message.attributes.get("job_id"),
                    "payload": payload,
                    "reason": r.message.attributes.get("reason"),
                    "attempt": int(r.message.attributes.get("attempt", "0") or 0),
                }
            )
        return out

    def close(self) -> None:
        self._subscriber.close()
        self._publisher.stop()
        self._publisher.transport.close()


class PubSubLease(Lease):
    def __init__(
        self,
        queue: PubSubJobQueue,
        ack_id: str,
        job_id: str,
        payload: dict,
        attempt: int,
        data: bytes | None = None,
    ):
        # Heartbeat three times per deadline: one late beat must not lose the job.
        super().__init__(job_id, payload, attempt, queue.max_attempts, queue.lease_s / 3)
        self._queue = queue
        self._ack_id = ack_id
        self._data = data if data is not None else json.dumps(payload).encode()

    def _extend(self) -> bool:
        gexc = self._queue._gexc
        try:
            self._queue._modify(self._ack_id, self._queue.lease_s)
        except (gexc.InvalidArgument, gexc.FailedPrecondition) as e:
            # Exactly-once subscriptions report expired ack ids; others accept them silently.
            log.warning("ack deadline not extended", extra={"job_id": self.job_id, "error": str(e)})
            return False
        return True

    def _ack(self) -> None:
        q = self._queue
        q._subscriber.acknowledge(
            request={"subscription": q.subscription_path, "ack_ids": [self._ack_id]}
        )

    def _nack(self, retry_after_s: float) -> None:
        self._queue._modify(self._ack_id, int(min(math.ceil(retry_after_s), _MAX_DEADLINE_S)))

    def _release(self) -> None:
        q = self._queue
        q._publisher.publish(
            q.topic_path, self._data, job_id=self.job_id, prior_attempts=str(self.attempt - 1)
        ).result(timeout=_PUBLISH_TIMEOUT_S)
        self._ack()

    def _dead_letter(self, reason: str) -> None:
        q = self._queue
        q._publisher.publish(
            q.dead_topic_path,
            self._data,
            job_id=self.job_id,
            reason=reason[:1000],
            attempt=str(self.attempt),
        ).result(timeout=_PUBLISH_TIMEOUT_S)
        self._ack()


@register("pubsub")
def _create(cfg) -> PubSubJobQueue:  # cfg: PubSubQueue
    return PubSubJobQueue(
        project=cfg.project,
        topic=cfg.topic,
        subscription=cfg.subscription,
        ack_deadline_s=cfg.ack_deadline_s,
        max_attempts=cfg.max_attempts,
    )
