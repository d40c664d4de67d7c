"""The training worker: one job at a time, from upload to email.

For each job the worker takes from the queue it
1. reads the session's takes from ingest's frame shards and the pose rows,
2. trains (``train.train_job``: warm start, budget, checkpoints, score, export),
3. renders the reference dance with the new generator (``render.render_session``),
4. delivers: session ``delivered`` + link + outbox email in one transaction.

It is safe to run many workers and to kill any of them. Delivery is at least
once, so every step is idempotent: a job whose session is gone (deleted) or
already ended is acknowledged and dropped, and so is a second delivery of a job
another worker runs and beats (``jobs.start_job(busy_within_s)``); a worker
whose job was claimed from under it stops like one whose lease was lost; a
restarted job resumes from its
checkpoints (``train_job``, from the blob store's mirror), and rendering and
delivery are redone only if the session has not reached ``delivered``.

A session deleted while its job runs stops the job quietly, at the next
progress report or check (after training, after rendering). The worker then
deletes ``sessions/<sid>/`` itself, after its last write: the front desk's own
deletion may have run before the worker wrote its checkpoints, plot or video.
A worker asked to stop (``stop``, set on SIGTERM) ends training after the current
step with a checkpoint in the store and hands the job back to the queue
without using up an attempt (``Lease.release``); the next worker resumes it.
The job's work directory (``trainer.work_dir/<sid>``: the attendee's frames in
the corpus, checkpoints, export) is removed whenever ``handle`` ends, except
when the lease was lost: another worker holds the job then, maybe on this host.
A worker that was killed leaves its directory; the next worker to start on that
host removes it once no job will come back for it (``sweep_work_dirs``).

Failures the attendee's data explains (an empty take, nobody in the frame, a
corrupt shard, a missing base checkpoint) fail the session with that reason and
the worker takes the next job. Anything unexpected is retried on another
attempt; the last attempt fails the session with the cause.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import InterfaceError, OperationalError

from cloud_trainer.config import BoothConfig, blob_prefix, local_checkpoint_exists
from cloud_trainer.repository import Repository, SessionNotFound
from cloud_trainer.repository.jobs import FINISHED, JobBusy, JobNotFound, JobState
from cloud_trainer.repository.sessions import known_id
from cloud_trainer.session import State
from edge_agent import skeleton as sk
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

# How often the tablet's training plot is redrawn while a job trains.
PLOT_EVERY_S = 10.0
BASE_WARN_EVERY_S = 300.0  # the "base checkpoint missing" warning, while it stays missing
# How often a running worker removes the work directories of ended jobs.
WORK_DIR_SWEEP_S = 600.0


class JobGone(Exception):
    """The session was deleted while its job ran: stop quietly."""


class LeaseLost(Exception):
    """This worker's lease ran out and another worker now holds the job: stop, touch nothing.

    Not a BoothError: the job did not fail, so it is neither failed nor acknowledged.
    """


class HeldStore:
    """The blob store as a job's worker writes it: only while the worker holds the job.

    A worker whose lease or claim was lost may still be inside a training step; its
    next checkpoint mirror would delete the files the job's new holder wrote (mirroring
    removes keys it has no local file for). Every write checks ``lost`` first and raises
    LeaseLost instead. Reads pass through.
    """

    def __init__(self, store: Any, lost: threading.Event) -> None:
        self._store = store
        self._lost = lost

    def _check(self) -> None:
        if self._lost.is_set():
            raise LeaseLost()

    def _checked(name: str) -> Any:  # builds the write methods below, in the class body
        def write(self: HeldStore, *args: Any, **kwargs: Any) -> Any:
            self._check()
            return getattr(self._store, name)(*args, **kwargs)

        write.__name__ = name
        return write

    put = _checked("put")
    put_file = _checked("put_file")
    delete = _checked("delete")
    delete_prefix = _checked("delete_prefix")
    del _checked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


# A deletion removes the session and its job row together; either lookup failing means gone.
GONE = (JobGone, SessionNotFound, JobNotFound)
# The metadata database cannot be reached (down, restarting, refusing connections): not
# the job's fault, so it must not use up one of the job's attempts.
DATABASE_DOWN = (OperationalError, InterfaceError)
DATABASE_DOWN_BACKOFF_S = 15.0


def take_from_ingest(repo: Repository, store: Any, session_id: str, camera_id: str, fps: float):
    """One camera's take, as ingest stored it: JPEG bytes from the shards, poses from the rows.

    Frames without a pose row count as "nobody detected" (all scores 0); the
    corpus builder skips them. So do lost frames (empty bytes: corrupt at capture).
    """
    from cloud_trainer.corpus import TakeData, TrainingFailed

    rows = repo.frame_index(session_id, camera_id)
    if not rows:
        raise TrainingFailed(f"camera {camera_id} stored no frames for this session")
    frames: list[bytes] = []
    shard_cache: dict[str, bytes] = {}
    for row in rows:
        # Whole shards are read once (a few MB each) and sliced, rather than one
        # ranged read per frame (ingest.shards.read_frame) thousands of times.
        data = shard_cache.get(row["shard_key"])
        if data is None:
            shard_cache.clear()
            try:
                data = store.get(row["shard_key"])
            except BoothError as e:
                raise TrainingFailed(f"camera {camera_id}: frame shard unreadable ({e})") from e
            shard_cache[row["shard_key"]] = data
        jpeg = data[row["offset"] : row["offset"] + row["length"]]
        if len(jpeg) != row["length"]:
            raise TrainingFailed(f"camera {camera_id}: frame shard {row['shard_key']} is cut short")
        frames.append(jpeg)
    seq_to_i = {row["seq"]: i for i, row in enumerate(rows)}
    poses = np.zeros((len(rows), sk.NUM_JOINTS, 3), np.float32)
    for p in repo.pose_rows(session_id, camera_id):
        i = seq_to_i.get(p["seq"])
        # A lost frame (corrupt at capture, stored empty) keeps no pose: an imputed one
        # would make the corpus look for an image that is not there.
        if i is not None and rows[i]["length"] > 0:
            keypoints = np.frombuffer(p["keypoints"], dtype="<f4")
            if keypoints.size != sk.NUM_JOINTS * 3:
                raise TrainingFailed(
                    f"camera {camera_id}: the pose of frame {p['seq']} has {keypoints.size} "
                    f"values, not {sk.NUM_JOINTS} joints x 3"
                )
            poses[i] = keypoints.reshape(sk.NUM_JOINTS, 3)
    return TakeData(
        name=f"{session_id}-{camera_id}", frames=frames, poses=poses, fps=fps, camera=camera_id
    )


def render_source(takes: list[Any], generator: Any) -> tuple[Any, Any]:
    """The take to render from, and its framing: the first the generator has a framing for,
    among those that show the attendee whole if any does.

    The corpus skips a camera's take it cannot use (too short, nobody in it, no poses
    because its agent was killed mid-take); the generator has no framing for that camera.
    The dance is scaled to the attendee from a frame with their head and feet in it; a
    camera that cuts off the feet cannot give one, where another camera may.
    """
    from cloud_trainer.normalize import shows_whole_body

    framed = [(t, f) for t in takes if (f := generator.framing(t.camera)) is not None]
    for take, framing in framed:
        if shows_whole_body(take.poses):
            return take, framing
    if framed:
        return framed[0]  # render says why it cannot scale the dance
    cameras = ", ".join(t.camera for t in takes)
    raise BoothError(f"the exported generator has no framing for any camera ({cameras})")


def rss_mb() -> int:
    """This process's resident memory, in MB (Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 2**20


def max_rss_mb(configured: int | None) -> int:
    """The memory past which a worker is recycled (0: never), as ``worker_max_rss_mb`` says.

    Unset: 60% of what the process may use, the container's limit (cgroup v2
    ``memory.max``) when it has one, else the machine's memory.
    """
    if configured is not None:
        return configured
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * 0.6) // 2**20


class StageClock:
    """Seconds spent per stage of a job, for the ``booth_job_stage_seconds`` metric."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.seconds: dict[str, float] = {}
        self._since = time.monotonic()

    def enter(self, stage: str | None) -> None:
        if stage == self.current:
            return
        now = time.monotonic()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self.current, self._since = stage, now


@dataclass
class Worker:
    settings: BoothConfig
    repo: Repository
    store: Any
    queue: Any
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    stop: threading.Event = field(default_factory=threading.Event)
    base_poll_s: float = 15.0  # while the base checkpoint is missing
    # How long a second delivery of a running job waits for that job's worker to go quiet
    # before leaving the job to it (None: three of the busy bounds, see _claim_when_quiet).
    duplicate_wait_s: float | None = None

    def run_forever(self, poll_s: float = 2.0) -> str:
        """Take jobs until stopped; returns why it ended: "stopped" or "recycle".

        "recycle": the process grew past ``trainer.worker_max_rss_mb`` and should be
        replaced by a fresh one. TensorFlow keeps part of what each job allocated
        (traced functions, the TFLite converter; measured 100-170 MB per 64 px job), so
        a worker that runs a conference's jobs in one process would run out of memory.
        It stops between jobs, with nothing held, and its supervisor (compose's
        ``restart: unless-stopped``) starts a new one.
        """
        self.sweep_work_dirs()
        self._wait_for_base_checkpoint()
        limit_mb = max_rss_mb(self.settings.trainer.worker_max_rss_mb)
        log.info("worker ready", extra={"worker": self.worker_id, "max_rss_mb": limit_mb})
        last_sweep = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_sweep >= WORK_DIR_SWEEP_S:
                # A job this worker lost (its lease lapsed, another took it over) leaves
                # its directory, the attendee's frames among it: not only at start-up.
                last_sweep = time.monotonic()
                try:
                    self.sweep_work_dirs()
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.warning("sweeping old work directories failed", exc_info=True)
            try:
                took = self.run_once(timeout_s=poll_s)
            except Exception:  # one job's bug or outage must not end the worker
                # The lease is left as it is: unacknowledged, it expires and the job comes
                # back (or, on its last attempt, fails on the next delivery).
                log.exception("job handling crashed; taking the next job")
                self.stop.wait(poll_s)  # a broken database would otherwise spin
                took = True
            if took and limit_mb and (used := rss_mb()) > limit_mb:
                log.warning(
                    "worker memory is past its limit after a job: exiting for a fresh worker",
                    extra={"rss_mb": used, "max_rss_mb": limit_mb},
                )
                return "recycle"
        return "stopped"

    def base_checkpoint_missing(self) -> str | None:
        """Why the configured base checkpoint cannot be read (None: it can, or none is set)."""
        uri = self.settings.trainer.base_checkpoint
        if not uri:
            return None
        prefix = blob_prefix(uri)
        if prefix is not None:
            try:
                if next(iter(self.store.list(prefix + "/")), None) is not None:
                    return None
            except Exception:  # the store is unreachable: each job says so with its reason
                log.warning("base checkpoint %s not checked: the store failed", uri, exc_info=True)
                return None
            how = f"`booth pretrain --out DIR --publish {uri}` puts it there"
        elif local_checkpoint_exists(uri):
            return None
        else:
            how = "`booth pretrain --out DIR` makes one"
        return f"trainer.base_checkpoint {uri} is not there ({how})"

    def _wait_for_base_checkpoint(self) -> None:
        """Take no job before the base exists: each would train its whole budget in vain,
        or fail after the attendee danced. Sessions queue meanwhile and run once it is
        published (deploys start the workers before `booth pretrain --publish`)."""
        warned_at = None
        while (missing := self.base_checkpoint_missing()) and not self.stop.is_set():
            if warned_at is None or time.monotonic() - warned_at >= BASE_WARN_EVERY_S:
                log.warning("%s; waiting for it before taking jobs", missing)
                warned_at = time.monotonic()
            self.stop.wait(self.base_poll_s)

    def run_once(self, timeout_s: float = 2.0) -> bool:
        """Take at most one job and see it through. True if there was one."""
        lease = self.queue.receive(timeout_s=timeout_s)
        if lease is None:
            return False
        self.handle(lease)
        return True

    # ---- one job --------------------------------------------------------------------

    def handle(self, lease) -> None:
        session_id = lease.payload.get("session_id", "")
        keep_work_dir = False
        try:
            keep_work_dir = self._handle(session_id, lease)
        finally:
            if not keep_work_dir:
                self._remove_work_dir(session_id)

    def _handle(self, session_id: str, lease) -> bool:
        """One job, acknowledged or not. True if its work directory must stay (lease lost)."""
        try:
            return self._handle_attempt(session_id, lease)
        except DATABASE_DOWN as e:
            # Before the job started, or on the way out of a failed attempt: either way
            # the attempt did not fail by itself. Hand it back with its attempts intact,
            # after a pause (the next delivery would find the database down as well).
            log.warning(
                "the database cannot be reached; job handed back without using an attempt",
                extra={"job_id": lease.job_id, "error": f"{type(e).__name__}: {e}"[:300]},
            )
            self.stop.wait(min(DATABASE_DOWN_BACKOFF_S, lease.heartbeat_s))
            lease.release()
            return False

    def _handle_attempt(self, session_id: str, lease) -> bool:
        job_id = lease.job_id
        try:
            known_id(session_id)
        except SessionNotFound:
            # Not a message we publish: no attempt will ever run it, so it leaves the
            # queue now (redelivered, it would come back forever).
            log.error(
                "job message dropped: it names no session of ours",
                extra={"job_id": job_id, "payload": repr(lease.payload)[:200]},
            )
            lease.ack()
            return False
        try:
            session = self.repo.get_session(session_id)
        except SessionNotFound:
            log.info("job for a deleted session dropped", extra={"job_id": job_id})
            self._forget(session_id, job_id)  # what an earlier attempt's worker left behind
            lease.ack()
            return False
        if session["state"] in (State.DELIVERED.value, State.FAILED.value):
            log.info(
                "job already ended; acknowledged again",
                extra={"job_id": job_id, "state": session["state"]},
            )
            self._settle_job(session, job_id)
            lease.ack()
            return False
        try:
            # Before the attempts are counted: a delivery while the job's worker lives
            # (its lease lapsed under it) is a duplicate, even past the last attempt.
            self.repo.start_job(job_id, self.worker_id, busy_within_s=self._busy_within_s(lease))
        except JobBusy as e:
            if not self._claim_when_quiet(job_id, lease):
                # The job's worker lives and holds its own delivery (Pub/Sub delivers a
                # message twice now and then); should it die, the stalled-job sweep puts
                # the job back on the queue.
                if self.stop.is_set():  # stopping mid-wait: not an answer either way
                    lease.release()
                    return False
                log.warning(
                    "duplicate delivery dropped", extra={"job_id": job_id, "reason": str(e)}
                )
                if not lease.lost.is_set():
                    lease.ack()
                return False
        except JobNotFound:
            self._forget(session_id, job_id)
            lease.ack()
            return False
        except BoothError as e:  # JobFinished: a redelivery of a job that already ended
            log.info("job already ended", extra={"job_id": job_id, "reason": str(e)})
            self._settle_session(session, job_id)
            lease.ack()
            return False
        if lease.exhausted:
            self._fail(
                session_id,
                job_id,
                f"training was interrupted {lease.max_attempts} times (the worker died); giving up",
                owner=self.worker_id,
            )
            lease.ack()
            return False
        from cloud_trainer.train import Interrupted  # TensorFlow: only once a job runs

        clock = StageClock()
        try:
            with lease.keep_alive(also=lambda: self._still_ours(job_id)):
                try:
                    self._run(session, job_id, lease, clock)
                finally:
                    # Every attempt's time counts, failed and handed-back ones too: the
                    # metric is where the workers' hours go, not only the good jobs'.
                    self._record_stage_seconds(job_id, clock)
            lease.ack()
        except GONE:
            self._forget(session_id, job_id)
            lease.ack()
        except Interrupted as e:
            # This worker is stopping (SIGTERM): not a failure. The checkpoint is in the
            # store; hand the job back at once so the next worker resumes it.
            try:
                if self.repo.requeue_job(job_id, worker=self.worker_id):
                    self.repo.set_progress(
                        session_id,
                        message=f"training paused at step {e.step}: its worker stopped; "
                        "the next worker resumes from there",
                    )
            except (SessionNotFound, JobNotFound):
                self._forget(session_id, job_id)
                lease.ack()
                return False
            lease.release()
            log.info(
                "worker stopping; job handed back",
                extra={"session_id": session_id, "job_id": job_id, "step": e.step},
            )
        except LeaseLost:
            # Another worker holds the job now: failing or acknowledging it would undo theirs.
            log.warning(
                "lease lost; leaving the job to the worker that holds it",
                extra={"session_id": session_id, "job_id": job_id, "attempt": lease.attempt},
            )
            return True
        except BoothError as e:  # the take, the reference or the config explains it
            log.warning("job failed", extra={"session_id": session_id, "reason": str(e)})
            self._fail(session_id, job_id, str(e), owner=self.worker_id)
            lease.ack()
        except DATABASE_DOWN:
            raise  # _handle hands the job back: the outage is not the attempt's failure
        except Exception as e:  # a bug or a passing outage: another attempt may succeed
            # Staff read the reason on the tablet: what to do, and a reference that finds
            # the traceback in this worker's log; not the exception itself.
            ref = secrets.token_hex(4)
            log.exception(
                "job crashed (ref %s)",
                ref,
                extra={"session_id": session_id, "attempt": lease.attempt, "error": repr(e)},
            )
            reason = (
                f"processing failed on our side, {lease.attempt} time(s) (ref {ref} in the "
                "worker's log); press Start again once, and if it fails again, call the tech"
            )
            if lease.final:
                self._fail(session_id, job_id, reason, owner=self.worker_id)
                lease.ack()
            else:
                try:
                    # Not ours any more (another worker claimed it): its row is left alone.
                    self.repo.requeue_job(job_id, worker=self.worker_id)
                except JobNotFound:  # deleted meanwhile
                    self._forget(session_id, job_id)
                    lease.ack()
                    return False
                lease.nack(retry_after_s=5.0)
        return False

    def _claim_when_quiet(self, job_id: str, lease) -> bool:
        """A second delivery of a job another worker runs: wait for that worker to let go.

        On a queue with one message per job (SQLite) this delivery took the message
        from the running worker, whose next heartbeat finds it gone: that worker stops
        and its beats with it. Acknowledging here would delete the job's only message
        and leave it to nobody until the stalled-job sweep; instead this worker claims
        the job once the other is quiet, and resumes it from its last checkpoint. A
        worker still beating after the wait holds its own delivery (Pub/Sub): the job
        is left to it. True once the job is this worker's.
        """
        busy_s = self._busy_within_s(lease)
        wait_s = self.duplicate_wait_s if self.duplicate_wait_s is not None else 3 * busy_s
        deadline = time.monotonic() + wait_s
        with lease.keep_alive():
            while not self.stop.wait(min(lease.heartbeat_s, busy_s) / 2):
                if lease.lost.is_set():
                    return False
                try:
                    self.repo.start_job(job_id, self.worker_id, busy_within_s=busy_s)
                except JobBusy:
                    if time.monotonic() >= deadline:
                        return False
                    continue
                except (JobNotFound, BoothError):  # deleted, or ended meanwhile: settled
                    return False
                log.info("job taken over from a worker that went quiet", extra={"job_id": job_id})
                return True
        return False

    def _busy_within_s(self, lease) -> float:
        """A beat younger than this means the job's worker lives.

        A live worker beats every ``heartbeat_s``, so 1.5 of those tolerates a late beat.
        A dead worker's job is delivered again ``lease_s`` after its last queue heartbeat,
        when its last beat is at least ``lease_s - heartbeat_s`` old: the bound stays
        well below that, so such a redelivery is never mistaken for a duplicate.
        """
        lease_s = self.settings.queue.lease_s
        return min(1.5 * lease.heartbeat_s, 0.75 * (lease_s - lease.heartbeat_s))

    def _still_ours(self, job_id: str) -> bool:
        """Beat the job's row; False once another worker claimed it (a lost lease, then).

        The queue's lease alone cannot say that: a Pub/Sub ack deadline that lapsed under
        a live worker is extended again without complaint while a second worker runs it.
        """
        try:
            if self.repo.beat_job(job_id, self.worker_id):
                return True
        except JobNotFound:
            return True  # deleted: the job's next progress write stops it (JobGone)
        log.warning("another worker claimed the job", extra={"job_id": job_id})
        return False

    def _fail(self, session_id: str, job_id: str, reason: str, owner: str | None = None) -> None:
        # The job first: should the session's write not happen (the worker dies, the
        # database blips), the redelivery finds the job failed and _settle_session
        # carries its reason over, instead of training again. ``owner``: fail only a
        # job this worker still holds; one another worker claimed meanwhile is theirs.
        try:
            if not self.repo.fail_job(job_id, reason, worker=owner) and owner is not None:
                job = self.repo.get_job(job_id)
                if job["worker"] != owner and job["state"] == JobState.RUNNING.value:
                    log.warning(
                        "job failed here but another worker runs it now; leaving it to them",
                        extra={"job_id": job_id, "worker": job["worker"], "reason": reason},
                    )
                    return
            self.repo.fail(session_id, reason)
        except (SessionNotFound, JobNotFound):  # deleted meanwhile: nothing left to mark
            self._forget(session_id, job_id)

    # A job's row and its session's state are written one after the other, not in one
    # transaction; a worker that died (or a write that failed) between the two leaves
    # one of them behind. A redelivery of that job settles the one left behind, so the
    # attendee's page never waits on a job that ended and the stalled-job sweep does not
    # publish a finished job again and again.

    def _settle_job(self, session: dict[str, Any], job_id: str) -> None:
        """The session ended (delivered or failed): end its job's row as well if still open."""
        try:
            job = self.repo.get_job(job_id)
            if JobState(job["state"]) in FINISHED:
                return
            if session["state"] == State.DELIVERED.value:
                self.repo.finish_job(job_id)
            else:
                self.repo.fail_job(job_id, session.get("failure_reason") or "the session failed")
        except (SessionNotFound, JobNotFound):
            return
        log.warning(
            "job row settled after its session ended",
            extra={"job_id": job_id, "state": session["state"]},
        )

    def _settle_session(self, session: dict[str, Any], job_id: str) -> None:
        """The job ended: a session still waiting on it fails with the job's own reason."""
        try:
            job = self.repo.get_job(job_id)
            if job["state"] != JobState.FAILED.value:
                return  # done: its session was delivered before the job row was ended
            self.repo.fail(session["id"], job["error"] or "the job failed")
        except (SessionNotFound, JobNotFound):
            return

    def _forget(self, session_id: str, job_id: str) -> None:
        """The session was deleted: remove what this worker wrote under its prefix.

        Called after the job's last write. The front desk deletes the blobs before
        the rows, so a checkpoint, plot or video written in between would outlive it.
        """
        log.info("session deleted while its job ran", extra={"session_id": session_id})
        if not session_id:
            return
        removed = self.store.delete_prefix(f"sessions/{session_id}/")
        if removed:
            log.info(
                "removed blobs written after the deletion",
                extra={"session_id": session_id, "job_id": job_id, "blobs": removed},
            )

    def sweep_work_dirs(self) -> int:
        """Remove the work directories no job will come back for; how many.

        A worker that was SIGKILLed never reached ``handle``'s clean-up, so its
        directory (the attendee's frames among it) stays behind. One whose job is
        still queued or running is kept: that job may resume here from it.
        """
        root = Path(self.settings.trainer.work_dir)
        if not root.is_dir():
            return 0
        removed = 0
        for path in root.iterdir():
            try:
                known_id(path.name)
            except SessionNotFound:
                continue  # not a job directory of ours
            job = self.repo.job_for_session(path.name)
            if job is not None and job["state"] in ("queued", "running"):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        if removed:
            log.info("removed work directories of ended jobs", extra={"directories": removed})
        return removed

    def _remove_work_dir(self, session_id: str) -> None:
        """The job's local directory: a retry resumes from the blob store's mirror instead."""
        try:
            known_id(session_id)
        except SessionNotFound:
            return  # not one of our ids: train_job made no directory for it
        work_dir = Path(self.settings.trainer.work_dir) / session_id
        if work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)

    def _record_stage_seconds(self, job_id: str, clock: StageClock) -> None:
        clock.enter(None)
        if not clock.seconds:
            return
        try:
            self.repo.update_job_progress(job_id, stage_seconds=clock.seconds)
        except (SessionNotFound, JobNotFound):
            pass  # deleted meanwhile: its time is not kept
        except Exception as e:  # a metric: never the reason a job fails
            log.warning(
                "could not record stage seconds", extra={"job_id": job_id, "error": repr(e)}
            )

    def _run(self, session: dict[str, Any], job_id: str, lease, clock: StageClock) -> None:
        from cloud_trainer import render
        from cloud_trainer.corpus import TrainingFailed, unusable_reason
        from cloud_trainer.deliver import Deliverer
        from cloud_trainer.normalize import shows_whole_body
        from cloud_trainer.reference import ReferenceLibrary
        from cloud_trainer.train import JobSpec, Progress, train_job

        sid = session["id"]
        cfg = self.settings
        if session["state"] == State.UPLOADED.value:
            self.repo.transition(sid, State.TRAINING, detail=f"worker {self.worker_id}")
        clock.enter("loading")  # reading the takes is loading, as the trainer's corpus is
        started_at = time.monotonic()  # reading the take counts in the training budget
        last_plot = [0.0]
        progress_down = [False]  # the last progress write found the database down
        history: list[dict[str, float]] = []

        def progress(p: Progress) -> None:
            if lease.lost.is_set():
                raise LeaseLost()
            clock.enter(p.stage)
            if p.loss is not None:
                history.append({"step": p.step, "l1": p.loss, "t": p.elapsed_s})
            fields = {
                "stage": p.stage,
                "step": p.step,
                "total_steps": p.max_steps,
                "eta_s": p.eta_s,
                "loss": p.loss,
            }
            try:
                self.repo.update_job_progress(
                    job_id, stage=p.stage, step=p.step, total_steps=p.max_steps, eta_s=p.eta_s
                )
                self.repo.set_progress(sid, **fields, message=p.message)
            except (SessionNotFound, JobNotFound):
                raise JobGone() from None
            except DATABASE_DOWN as e:
                # The tablet's progress waits; the training need not (its checkpoints are
                # in the blob store, and the job's own writes come at its end).
                if not progress_down[0]:
                    log.warning(
                        "progress not recorded: the database cannot be reached; training on",
                        extra={"job_id": job_id, "error": f"{type(e).__name__}"},
                    )
                progress_down[0] = True
                return
            if progress_down[0]:
                log.info("progress recorded again", extra={"job_id": job_id})
                progress_down[0] = False
            if history and time.monotonic() - last_plot[0] > PLOT_EVERY_S:
                last_plot[0] = time.monotonic()
                self._plot(sid, history)

        takes, unusable = [], []
        # The session's cameras: staff may have gone on without one whose upload never
        # completed, whose partial take stays out.
        kept = set(session.get("cameras") or [])
        for take in self.repo.list_takes(sid):
            if kept and take["camera_id"] not in kept:
                continue
            try:
                takes.append(
                    take_from_ingest(
                        self.repo, self.store, sid, take["camera_id"], take["fps"] or 30.0
                    )
                )
            except TrainingFailed as e:  # one camera's bad take: the others may carry the job
                log.warning("take not used", extra={"session_id": sid, "reason": str(e)})
                unusable.append(str(e))
        if not takes:
            raise BoothError(
                "; ".join(unusable) if unusable else "no camera uploaded a take for this session"
            )
        # The takes the training will keep (the corpus skips the others), so that what
        # rendering needs is checked on them, before the training budget is spent.
        reasons = [unusable_reason(t) for t in takes]
        trainable = [t for t, why in zip(takes, reasons, strict=True) if why is None]
        if not trainable:
            raise BoothError("; ".join(unusable + reasons))
        if not any(shows_whole_body(t.poses) for t in trainable):
            raise BoothError(
                "no camera saw the attendee whole: the dance is scaled to them from a frame "
                "with their head and both feet in it, and no take has one (check that the "
                "cameras frame the booth from head height to the floor)"
            )
        library = ReferenceLibrary(self.store)
        try:
            reference = library.get(session["reference_name"])
        except BoothError as e:  # gone, or never there: no use training for it
            raise BoothError(f"the reference dance cannot be used: {e}") from None
        if not shows_whole_body(reference.poses):
            raise BoothError(
                f"the reference dance {reference.name} v{reference.version} never shows the "
                "dancer's head and both feet in one frame, so it cannot be fitted to the "
                "attendee: pick another reference and start again"
            )
        result = train_job(
            JobSpec(session_id=sid, takes=takes, job_id=job_id),
            cfg.trainer,
            HeldStore(self.store, lease.lost),
            progress,
            models_dir=cfg.models_dir,
            should_stop=self.stop.is_set,
            started_at=started_at,
        )
        if result.plot_path and Path(result.plot_path).exists():
            self.store.put_file(
                f"sessions/{sid}/job/progress.png", str(result.plot_path), "image/png"
            )
        self._check_not_deleted(sid, lease)
        quality = {
            k: v
            for k, v in (result.score or {}).items()
            if isinstance(v, int | float | str | bool) or v is None
        }
        self.repo.update_session(sid, quality=quality)

        clock.enter("rendering")
        if self.repo.get_session(sid)["state"] == State.TRAINING.value:
            self.repo.transition(sid, State.RENDERING)
        self.repo.set_progress(sid, stage="rendering", eta_s=None)
        generator = render.load_generator(result.export_dir, label_map=cfg.trainer.label_map)
        source, framing = render_source(takes, generator)
        keys = render.render_session(
            self.store,
            sid,
            generator,
            reference,
            source.poses,
            framing,
            library=library,
            side_by_side=cfg.render.side_by_side,
            batch=cfg.render.batch,
            crf=cfg.render.crf,
            scratch_dir=Path(cfg.trainer.work_dir) / sid,
            take_fps=source.fps,
        )
        self._check_not_deleted(sid, lease)

        clock.enter("delivering")
        Deliverer(self.repo, self.store, cfg).deliver(
            sid,
            video_key=keys["video_key"],
            poster_key=keys["poster_key"],
            side_by_side_key=keys["side_by_side_key"],
        )
        # The link itself is not kept (only its hash is): it went to the attendee by email.
        self.repo.set_progress(sid, stage="delivered", eta_s=0)
        clock.enter(None)
        self.repo.update_job_progress(job_id, stage="done")
        self.repo.finish_job(
            job_id, metrics={"score": quality, "steps": result.steps}, model_key=result.model_prefix
        )

    def _check_not_deleted(self, sid: str, lease) -> None:
        """Stop before the next stage if the session was deleted or the lease lost."""
        if lease.lost.is_set():
            raise LeaseLost()
        if self.repo.session_deleted(sid):
            raise JobGone()

    def _plot(self, sid: str, history: list[dict[str, float]]) -> None:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 2.6), dpi=100)
        ax.plot([h["step"] for h in history], [h["l1"] for h in history], color="#ff4f7b")
        ax.set_xlabel("step")
        ax.set_ylabel("L1 (lower is better)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        self.store.put(f"sessions/{sid}/job/progress.png", buf.getvalue(), "image/png")
