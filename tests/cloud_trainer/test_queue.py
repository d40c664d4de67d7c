"""Job queues: one suite, run on ``sqlite`` and on ``pubsub`` (through Google's emulator).

Leases last 2 s here (``queue_config``). Each consumer is its own queue
object, as separate workers would be; a worker that "dies" simply stops
touching its lease.
"""

from __future__ import annotations

import threading

import pytest

from cloud_trainer.config import SqliteQueue
from cloud_trainer.queue import create_job_queue
from cloud_trainer.queue.sqlite import SqliteJobQueue

# Long enough for a 2 s lease to expire and the job to come back, with room for a
# loaded machine; receive() returns as soon as the job is there.
REDELIVERY_WAIT_S = 15.0


@pytest.fixture
def consumers(queue_config):
    """A factory of independent queue clients on one queue, all closed at teardown."""
    made = []

    def make(**overrides):
        cfg = queue_config.model_copy(update=overrides) if overrides else queue_config
        q = create_job_queue(cfg)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def test_published_job_is_received_once_and_gone_after_ack(consumers):
    q = consumers()
    q.publish("job-1", {"session_id": "s1", "size_px": 64})
    lease = q.receive(timeout_s=10)
    assert lease is not None
    assert (lease.job_id, lease.payload, lease.attempt) == (
        "job-1",
        {"session_id": "s1", "size_px": 64},
        1,
    )
    assert not lease.final
    lease.ack()
    assert lease.settled == "acked"
    assert q.receive(timeout_s=1) is None


def test_receive_times_out_with_none_on_an_empty_queue(consumers):
    assert consumers().receive(timeout_s=0.5) is None


def test_every_published_job_is_received_exactly_once(consumers):
    q = consumers()
    for i in range(3):
        q.publish(f"job-{i}", {"i": i})
    got = []
    for _ in range(3):
        lease = q.receive(timeout_s=10)
        assert lease is not None
        got.append(lease.job_id)
        lease.ack()
    assert sorted(got) == ["job-0", "job-1", "job-2"]


def test_a_leased_job_is_invisible_to_other_consumers(consumers):
    a, b = consumers(), consumers()
    a.publish("job-1", {})
    lease = a.receive(timeout_s=10)
    assert lease is not None
    with lease.keep_alive():  # so a stalled test machine cannot let the lease lapse
        assert b.receive(timeout_s=0.5) is None
    lease.ack()


def test_nack_redelivers_with_the_next_attempt(consumers):
    q = consumers()
    q.publish("job-1", {"k": 1})
    first = q.receive(timeout_s=10)
    assert first is not None and first.attempt == 1
    first.nack(retry_after_s=0)
    second = q.receive(timeout_s=REDELIVERY_WAIT_S)
    assert second is not None
    assert (second.job_id, second.payload, second.attempt) == ("job-1", {"k": 1}, 2)
    second.ack()


def test_expired_lease_is_redelivered_to_another_consumer(consumers):
    dead_worker, other = consumers(), consumers()
    dead_worker.publish("job-1", {"k": 1})
    abandoned = dead_worker.receive(timeout_s=10)
    assert abandoned is not None and abandoned.attempt == 1
    # The worker "dies": no heartbeat, no ack. The job comes back after the lease.
    again = other.receive(timeout_s=REDELIVERY_WAIT_S)
    assert again is not None
    assert (again.job_id, again.attempt) == ("job-1", 2)
    again.ack()


def test_stale_ack_does_not_remove_the_job_from_its_new_holder(consumers):
    slow, fast, third = consumers(), consumers(), consumers()
    slow.publish("job-1", {})
    stale = slow.receive(timeout_s=10)
    assert stale is not None
    current = fast.receive(timeout_s=REDELIVERY_WAIT_S)
    assert current is not None and current.attempt == 2
    stale.ack()  # too late: the job belongs to `fast` now
    current.nack(retry_after_s=0)
    back = third.receive(timeout_s=REDELIVERY_WAIT_S)
    assert back is not None
    assert (back.job_id, back.attempt) == ("job-1", 3)
    back.ack()


def test_heartbeats_keep_a_long_job_leased(consumers):
    worker, other = consumers(), consumers()
    worker.publish("job-1", {})
    lease = worker.receive(timeout_s=10)
    assert lease is not None
    stolen: list = []
    with lease.keep_alive():
        # Poll for 2 lease lengths: without heartbeats the job would come back.
        got = other.receive(timeout_s=4)
        if got is not None:
            stolen.append(got)
        assert not lease.lost.is_set()
    lease.ack()
    assert stolen == []


def test_ack_is_idempotent_and_settles_the_lease(consumers):
    q = consumers()
    q.publish("job-1", {})
    lease = q.receive(timeout_s=10)
    assert lease is not None
    lease.ack()
    lease.ack()
    lease.nack(0)  # settling again is a no-op
    assert lease.settled == "acked"
    assert lease.heartbeat() is False
    assert q.receive(timeout_s=1) is None


def test_final_attempt_is_reported_and_its_nack_dead_letters(consumers):
    q = consumers(max_attempts=2)
    q.publish("job-1", {"k": "v"})
    first = q.receive(timeout_s=10)
    assert first is not None and (first.attempt, first.final) == (1, False)
    first.nack(0)
    last = q.receive(timeout_s=REDELIVERY_WAIT_S)
    assert last is not None and (last.attempt, last.final, last.exhausted) == (2, True, False)
    last.nack(0)
    assert last.settled == "dead"
    assert q.receive(timeout_s=1) is None
    dead = q.dead_letters()
    assert [(d["job_id"], d["payload"]) for d in dead] == [("job-1", {"k": "v"})]
    assert "attempt 2 of 2" in dead[0]["reason"]


def test_job_whose_final_worker_died_comes_back_exhausted(consumers):
    dead_worker, other = consumers(max_attempts=1), consumers(max_attempts=1)
    dead_worker.publish("job-1", {})
    only = dead_worker.receive(timeout_s=10)
    assert only is not None and only.final and not only.exhausted
    back = other.receive(timeout_s=REDELIVERY_WAIT_S)
    assert back is not None
    assert (back.attempt, back.exhausted) == (2, True)
    back.ack()  # the caller recorded the failure


def test_release_hands_the_job_back_at_once_without_using_an_attempt(consumers):
    stopping, other = consumers(max_attempts=2), consumers(max_attempts=2)
    stopping.publish("job-1", {"k": "v"})
    first = stopping.receive(timeout_s=10)
    assert first is not None and first.attempt == 1
    first.nack(0)  # a real failure: counts
    second = stopping.receive(timeout_s=REDELIVERY_WAIT_S)
    assert second is not None and (second.attempt, second.final) == (2, True)
    second.release()  # the worker is shutting down: does not count, and is not dead-lettered
    assert second.settled == "released"
    again = other.receive(timeout_s=REDELIVERY_WAIT_S)
    assert again is not None
    assert (again.job_id, again.payload, again.attempt) == ("job-1", {"k": "v"}, 2)
    assert again.final and not again.exhausted
    again.ack()
    assert other.receive(timeout_s=1) is None
    assert other.dead_letters() == []


def test_explicit_dead_letter_keeps_the_reason(consumers):
    q = consumers()
    q.publish("job-1", {"k": 1})
    lease = q.receive(timeout_s=10)
    assert lease is not None
    lease.dead_letter("corrupt shard sessions/s1/corpus/000.tfrecord")
    assert lease.settled == "dead"
    assert [d["reason"] for d in q.dead_letters()] == [
        "corrupt shard sessions/s1/corpus/000.tfrecord"
    ]


# ---- sqlite specifics ----------------------------------------------------------------------


def _sqlite(tmp_path, **kw) -> SqliteJobQueue:
    cfg = SqliteQueue(path=tmp_path / "q.db", visibility_timeout_s=30, heartbeat_s=5, **kw)
    q = create_job_queue(cfg)
    assert isinstance(q, SqliteJobQueue)
    return q


def test_sqlite_publish_of_a_pending_job_does_not_duplicate_it(tmp_path):
    q = _sqlite(tmp_path)
    q.publish("job-1", {"v": 1})
    q.publish("job-1", {"v": 2})
    lease = q.receive(timeout_s=1)
    assert lease is not None and lease.payload == {"v": 1}
    q.publish("job-1", {"v": 3})  # while leased: still one job
    assert q.receive(timeout_s=0.2) is None
    lease.ack()
    assert q.stats() == {"ready": 0, "leased_or_delayed": 0, "dead": 0}


def test_sqlite_publish_revives_a_dead_job_with_fresh_attempts(tmp_path):
    q = _sqlite(tmp_path, max_attempts=1)
    q.publish("job-1", {"v": 1})
    lease = q.receive(timeout_s=1)
    assert lease is not None
    lease.nack(0)
    assert q.stats()["dead"] == 1
    q.publish("job-1", {"v": 2})
    again = q.receive(timeout_s=1)
    assert again is not None and (again.payload, again.attempt) == ({"v": 2}, 1)


def test_sqlite_nack_delay_hides_the_job_until_then(tmp_path):
    q = _sqlite(tmp_path)
    q.publish("job-1", {})
    lease = q.receive(timeout_s=1)
    assert lease is not None
    lease.nack(retry_after_s=3600)
    assert q.receive(timeout_s=0.2) is None
    assert q.stats() == {"ready": 0, "leased_or_delayed": 1, "dead": 0}


def test_sqlite_concurrent_consumers_never_share_a_job(tmp_path):
    q = _sqlite(tmp_path)
    for i in range(20):
        q.publish(f"job-{i}", {"i": i})
    got: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        mine = _sqlite(tmp_path)
        while (lease := mine.receive(timeout_s=0.3)) is not None:
            with lock:
                got.append(lease.job_id)
            lease.ack()

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(f"job-{i}" for i in range(20))


def test_sqlite_heartbeat_reports_a_lease_taken_by_another_worker(tmp_path):
    cfg = SqliteQueue(path=tmp_path / "q.db", visibility_timeout_s=0.5, heartbeat_s=0.1)
    a, b = create_job_queue(cfg), create_job_queue(cfg)
    a.publish("job-1", {})
    stale = a.receive(timeout_s=1)
    assert stale is not None
    current = b.receive(timeout_s=REDELIVERY_WAIT_S)
    assert current is not None
    assert stale.heartbeat() is False
    assert stale.lost.is_set()
    assert current.heartbeat() is True


# ---- pubsub specifics ----------------------------------------------------------------------


def test_pubsub_foreign_message_is_dead_lettered_not_handed_out(pubsub_emulator):
    from google.cloud import pubsub_v1

    from cloud_trainer.queue.pubsub import PubSubJobQueue

    q = create_job_queue(pubsub_emulator.queue_config(ack_deadline_s=2))
    assert isinstance(q, PubSubJobQueue)
    publisher = pubsub_v1.PublisherClient()
    try:
        publisher.publish(q.topic_path, b"not json", job_id="job-x").result(timeout=30)
        publisher.publish(q.topic_path, b'{"k": 1}').result(timeout=30)  # no job_id
        q.publish("job-ok", {"k": 2})
        lease = q.receive(timeout_s=10)
        assert lease is not None and lease.job_id == "job-ok"
        lease.ack()
        assert q.receive(timeout_s=1) is None
        reasons = sorted(d["reason"] for d in q.dead_letters())
        assert len(reasons) == 2
        assert all(r.startswith("malformed job message") for r in reasons)
    finally:
        publisher.stop()
        q.close()


def test_pubsub_creates_topic_and_subscription_once_for_many_workers(pubsub_emulator):
    cfg = pubsub_emulator.queue_config()
    first, second = create_job_queue(cfg), create_job_queue(cfg)
    try:
        first.publish("job-1", {})
        lease = second.receive(timeout_s=10)
        assert lease is not None and lease.job_id == "job-1"
        lease.ack()
    finally:
        first.close()
        second.close()


def test_pubsub_a_subscription_made_beforehand_still_holds_a_lease_for_its_full_length(
    pubsub_emulator,
):
    """Made with gcloud's defaults (ack deadline 10 s, no dead-letter topic), as an operator
    following a how-to would; the queue's own leases are 20 s."""
    from google.cloud import pubsub_v1

    cfg = pubsub_emulator.queue_config(ack_deadline_s=20)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(cfg.project, cfg.topic)
    publisher.create_topic(name=topic)
    subscriber.create_subscription(
        request={
            "name": subscriber.subscription_path(cfg.project, cfg.subscription),
            "topic": topic,
            "ack_deadline_seconds": 10,
        }
    )
    holder, other = create_job_queue(cfg), create_job_queue(cfg)
    try:
        holder.publish("job-1", {})
        lease = holder.receive(timeout_s=10)
        assert lease is not None
        # Past the subscription's 10 s, within the lease's 20 s: still the holder's.
        assert other.receive(timeout_s=14) is None
        lease.ack()
    finally:
        holder.close()
        other.close()
        subscriber.close()
        publisher.stop()


def test_pubsub_that_does_not_answer_is_one_clear_error_not_ten_silent_minutes(monkeypatch):
    """The client's own retries wait 10 minutes in silence and end in a traceback; the
    queue gives up after SETUP_TIMEOUT_S and names the endpoint."""
    import socket
    import time

    import cloud_trainer.queue.pubsub as pubsub_mod
    from cloud_trainer.config import PubSubQueue
    from edge_agent.errors import BoothError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", dead)
    monkeypatch.setattr(pubsub_mod, "SETUP_TIMEOUT_S", 2.0)
    t0 = time.monotonic()
    with pytest.raises(BoothError, match=f"Pub/Sub at {dead} did not answer for 2 s") as e:
        create_job_queue(PubSubQueue(project="p", topic="t", subscription="s"))
    assert "PUBSUB_EMULATOR_HOST" in str(e.value)
    assert time.monotonic() - t0 < 30
