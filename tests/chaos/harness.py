"""The chaos suite's shared topology, faults and invariant checks.

A ``ChaosBooth`` is the demo's topology (``cloud_trainer.demo.DemoBooth``): the
real ``booth serve``, ``booth worker`` and one ``booth agent`` per synthetic
camera, as subprocesses on loopback at tiny sizes. Around it the harness puts
what the faults need:

- a ``LinkProxy`` between the agents and serve's gRPC port (uplink and control
  stream both go through it), which can black-hole the link like a Wi-Fi drop;
- a real SMTP server (aiosmtpd, ``tests/cloud_trainer/smtp_capture.py``) on a
  fixed port, so it can be down for a while and come back;
- a SQLite job queue with short leases (or Pub/Sub on the emulator), so a killed
  worker's job goes to another worker within seconds;
- fixed serve ports (``Processes.restart``), so a restarted serve is found again.

Each scenario in ``SCENARIOS`` drives one session through the staff API,
injects one fault, and returns its observations; ``ChaosBooth.verdict`` then
checks the invariants on that session:

1. every captured frame is stored exactly once: the agent's recording
   (``capture.out_dir/<session>/<camera>/`` MP4 segments, whose packets are the
   camera's JPEG bytes) against what ingest stored (sha256 per seq, read back
   from the shards through the repository's frame index);
2. the session ends ``delivered`` or ``failed(reason)``, never stuck;
3. exactly one email per delivered session (per Message-ID; raw SMTP
   transmissions are reported too);
4. no orphaned blobs, rows or spool files after the session is deleted.

Used by ``tests/chaos/test_chaos_*.py`` and ``bench/chaos.py``. Waits poll
observable state (the API, the database, files, process exit) with deadlines;
the only fixed durations are the faults' own (how long the link is down).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import mailbox
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tests", ROOT / "tests" / "cloud_trainer"):
    if str(_p) not in sys.path:  # bench/chaos.py imports this file directly
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402
from transport_helpers import LinkProxy  # noqa: E402

from cloud_trainer.demo import DemoBooth, DemoFailed, DemoPlan, StaffClient  # noqa: E402
from cloud_trainer.ingest.shards import decode_shard  # noqa: E402

log = logging.getLogger(__name__)

TERMINAL_EMAIL = ("sent", "failed", "bounced")
# The sender's lease on an email it is sending: SmtpMail.timeout_s * 4 + deliver._LEASE_MARGIN_S.
MAIL_TIMEOUT_S = 2.0
MAIL_LEASE_S = MAIL_TIMEOUT_S * 4 + 60.0
# SQLite job leases: a killed worker's job is visible again after this long.
VISIBILITY_TIMEOUT_S = 8.0
# booth.upload_deadline_s for the scenario whose camera never comes back.
UPLOAD_DEADLINE_S = 10.0


class ChaosFailure(AssertionError):
    """A scenario could not even set up its fault (the system did not get there)."""


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; ChaosFailure after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ChaosFailure(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_plan(workdir: Path, **overrides: Any) -> DemoPlan:
    """The e2e test's tiny booth, with a take long enough to be interrupted mid-way."""
    fields: dict[str, Any] = {
        "workdir": workdir,
        "cameras": 2,
        "take_s": 4.0,
        "fps": 20.0,
        "size": (160, 120),
        "train_size_px": 32,
        # Loading the take and building the model took up to 12 s on a slow host: the job
        # then failed as "budget too short" before any step (double_start, the first).
        "budget_s": 20.0,
        "batch": 4,
        "base_budget_s": 15.0,
        "base_attendees": "2..3",
        "countdown_s": 1,
        "segment_s": 1.0,
        "timeout_s": 600.0,
        # The harness compares each board's recording with what the cloud stored, after
        # the upload; by default a board removes it then (edge_agent.retention).
        "agent_overrides": {"capture": {"keep_uploaded_takes": True}},
    }
    fields.update(overrides)
    return DemoPlan(**fields)


# ---- results ---------------------------------------------------------------------------------


@dataclass
class FrameCheck:
    camera: str
    captured: int = 0  # frames the agent's recording holds (or its take's frame count)
    stored: int = 0  # frame index rows
    lost: int = 0  # captured, but not stored (or stored with other bytes)
    duplicated: int = 0  # stored more than once
    unverified: int = 0  # stored frames the recording cannot vouch for (e.g. a torn last segment)
    recording_complete: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    scenario: str
    session_id: str = ""
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    final_state: str = ""
    failure_reason: str | None = None
    stuck: bool = False
    frames: list[FrameCheck] = field(default_factory=list)
    emails_received: int = 0  # distinct Message-IDs for this attendee
    smtp_transmissions: int = 0  # raw deliveries (a resend in the residual window repeats one)
    orphans_after_delete: list[str] = field(default_factory=list)
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def frames_lost(self) -> int:
        return sum(f.lost for f in self.frames)

    @property
    def frames_duplicated(self) -> int:
        return sum(f.duplicated for f in self.frames)

    @property
    def emails_duplicated(self) -> int:
        return max(0, self.emails_received - 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "session_id": self.session_id,
            "passed": self.passed,
            "problems": self.problems,
            "final_state": self.final_state,
            "failure_reason": self.failure_reason,
            "stuck": self.stuck,
            "frames_lost": self.frames_lost,
            "frames_duplicated": self.frames_duplicated,
            "frames": [f.__dict__ for f in self.frames],
            "emails_received": self.emails_received,
            "emails_duplicated": self.emails_duplicated,
            "smtp_transmissions": self.smtp_transmissions,
            "orphans_after_delete": self.orphans_after_delete[:20],
            "seconds": round(self.seconds, 1),
            "details": self.details,
        }

    def explain(self) -> str:
        return f"{self.scenario}: " + ("; ".join(self.problems) or "ok")


# ---- the booth under test ----------------------------------------------------------------


@dataclass
class Topology:
    """What surrounds the demo's processes for a group of scenarios."""

    name: str = "standard"
    queue: dict[str, Any] | None = None  # booth.yaml queue section (default: SQLite, short leases)
    env: dict[str, str] = field(default_factory=dict)  # for every process (e.g. the emulator)
    spool_tmpfs_kb: int = 0  # mount each agent's spool on a tmpfs this big (root only; 0: no)


class ChaosBooth:
    """The demo topology plus the fault injectors; see the module docstring."""

    def __init__(self, parent: Path, topology: Topology | None = None, **plan: Any):
        self.topology = topology or Topology()
        workdir = parent / self.topology.name
        self.proxy = LinkProxy()
        from smtp_capture import SmtpServer

        self.smtp = SmtpServer(port=free_port())
        self.tmpfs_mounts: list[Path] = []
        queue = self.topology.queue or {
            "type": "sqlite",
            "path": str(workdir.resolve() / "queue.db"),
            "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
            "heartbeat_s": 1.0,
            "max_attempts": 3,
        }
        overrides = {
            "queue": queue,
            "trainer": {"checkpoint_every_steps": 5, "checkpoint_every_s": 10},
            "mail": {
                "type": "smtp",
                "host": "127.0.0.1",
                "port": self.smtp.port,
                "timeout_s": MAIL_TIMEOUT_S,
                # Retries every few seconds, for long enough to ride out a minute's outage.
                "backoff_initial_s": 1.0,
                "backoff_max_s": 4.0,
                "max_attempts": 40,
                "sender": "dancebooth chaos <booth@chaos.example>",
                "sent_log": str(workdir.resolve() / "mail-sent.log"),
            },
        }
        self.plan = tiny_plan(
            workdir,
            config_overrides=overrides,
            uplink_address=self.proxy.address,
            env=dict(self.topology.env),
            **plan,
        )
        self.booth = DemoBooth(self.plan)
        self.staff: StaffClient | None = None
        self._repo = None
        self._store = None
        self._emails = 0

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.booth.dir

    def start(self) -> ChaosBooth:
        self.smtp.start()
        if self.topology.spool_tmpfs_kb:
            self._mount_spools(self.topology.spool_tmpfs_kb)
        self.booth.write_config(self.booth.base_checkpoint(progress=False))
        self.staff = self.booth.start()
        self.proxy.set_upstream(self.booth.ports["grpc"])
        self.booth.wait_for_agents(self.staff)
        return self

    def stop(self) -> None:
        self.booth.stop()
        self.proxy.close()
        self.smtp.stop()
        for m in self.tmpfs_mounts:
            subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
        if self._repo is not None:
            self._repo.close()

    def _mount_spools(self, size_kb: int) -> None:
        for camera in self.booth.tokens:
            spool = self.dir / "edge" / camera / "spool"
            spool.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(spool)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise ChaosFailure(f"cannot mount a tmpfs spool: {r.stderr.strip()}")
            self.tmpfs_mounts.append(spool)

    def ensure_healthy(self) -> None:
        """Before a scenario: every process up, the link and SMTP up, cameras idle."""
        self.proxy.restore()
        if self.smtp._controller is None:
            self.smtp.start()
        for name, proc in list(self.booth.procs.children.items()):
            if proc.poll() is not None:
                log.warning("%s had exited (%s); restarting it", name, proc.returncode)
                self.restart(name)
        assert self.staff is not None
        wait_for(
            lambda: (
                all(a["online"] and a["state"] == "idle" for a in self.staff.get("/api/agents"))
                and len(self.staff.get("/api/agents")) >= self.plan.cameras
            ),
            180,
            "every camera online and idle",
            poll_s=0.5,
        )

    # ---- processes ---------------------------------------------------------------------

    def kill9(self, name: str) -> None:
        self.booth.procs.kill(name, signal.SIGKILL)

    def restart(self, name: str, env: dict[str, str] | None = None) -> None:
        self.booth.procs.restart(name, env=env)
        if name == "serve":
            self.wait_serving()

    def reconfigure(self, section: str, restart: tuple[str, ...], **fields: Any) -> dict[str, Any]:
        """Change fields of a booth.yaml section, restart ``restart`` cleanly; returns the old values."""
        import yaml

        cfg = self.booth._cfg
        old = {k: cfg[section].get(k) for k in fields}
        cfg[section].update(fields)
        for k in [k for k, v in fields.items() if v is None]:  # None: back to the default
            del cfg[section][k]
        self.booth.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        procs = self.booth.procs
        for name in restart:
            procs.kill(name, signal.SIGTERM)  # idle: it exits at once
            procs.start(name, *procs.args[name])
            if name == "serve":
                self.wait_serving()
        return old

    def start_process(self, name: str, *args: str) -> None:
        self.booth.procs.start(name, *args)

    def wait_serving(self, timeout_s: float = 90.0) -> None:
        def up() -> bool:
            proc = self.booth.procs.children["serve"]
            if proc.poll() is not None:
                raise ChaosFailure(f"serve exited with {proc.returncode}: {self.log_tail('serve')}")
            try:
                return httpx.get(f"{self.booth.base_url}/healthz", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s, "serve to answer HTTP again")

    def log_tail(self, name: str, lines: int = 8) -> str:
        path = self.dir / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def log_count(self, name: str, needle: str) -> int:
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace").count(needle) if path.exists() else 0

    # ---- data access -------------------------------------------------------------------

    @property
    def repo(self):
        if self._repo is None:
            from cloud_trainer.config import load_config
            from cloud_trainer.repository import Repository

            self._repo = Repository.from_config(load_config(self.booth.config_path).database)
        return self._repo

    @property
    def store(self):
        if self._store is None:
            from cloud_trainer.config import load_config
            from cloud_trainer.storage import create_blob_store

            self._store = create_blob_store(load_config(self.booth.config_path).storage)
        return self._store

    def session(self, sid: str) -> dict[str, Any]:
        assert self.staff is not None
        return self.staff.get(f"/api/sessions/{sid}")

    def agents(self) -> dict[str, dict[str, Any]]:
        assert self.staff is not None
        return {a["camera_id"]: a for a in self.staff.get("/api/agents")}

    # ---- driving a session ---------------------------------------------------------------

    def new_session(self, label: str) -> tuple[str, str]:
        """A session with an attendee address of its own; returns (session id, address)."""
        assert self.staff is not None
        self._emails += 1
        addr = f"{label}-{self._emails}-{secrets.token_hex(3)}@chaos.example.org"
        s = self.staff.post(
            "/api/sessions",
            {
                "name": f"Chaos {label}",
                "email": addr,
                "consent": True,
                "reference": self.plan.reference,
            },
        )
        return s["id"], addr

    def press_start(self, sid: str) -> dict[str, Any]:
        assert self.staff is not None
        return self.staff.post(f"/api/sessions/{sid}/start")

    def stored_frames(self, sid: str) -> dict[str, int]:
        """Frames ingest has stored so far, per camera (from the takes table)."""
        return {t["camera_id"]: t["frames_stored"] for t in self.session(sid)["takes"]}

    def take_dir(self, sid: str, camera: str) -> Path:
        return self.dir / "edge" / camera / "takes" / sid / camera

    def capture_running(self, sid: str, camera: str) -> bool:
        """The camera is recording this session: segments exist, the take's index does not yet."""
        d = self.take_dir(sid, camera)
        return d.is_dir() and any(d.glob("seg_*.mp4")) and not (d / "frames.csv").exists()

    def wait_mid_take(
        self, sid: str, cameras: list[str] | None = None, min_stored: int = 5
    ) -> None:
        """Until ingest stored some frames of every camera and the cameras still capture."""
        cameras = cameras or list(self.booth.tokens)

        def mid() -> bool:
            stored = self.stored_frames(sid)
            return all(stored.get(c, 0) >= min_stored for c in cameras) and all(
                self.capture_running(sid, c) for c in cameras
            )

        wait_for(mid, 90, f"frames of {cameras} flowing mid-take", poll_s=0.05)

    def wait_terminal(self, sid: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The session once it is failed, or delivered with its email settled; None if stuck."""
        deadline = time.monotonic() + (timeout_s or self.plan.timeout_s)
        while time.monotonic() < deadline:
            try:
                view = self.session(sid)
            except (DemoFailed, httpx.HTTPError):  # serve restarting
                time.sleep(0.5)
                continue
            email = view.get("email_delivery") or {}
            if view["state"] == "failed" or (
                view["state"] == "delivered" and email.get("state") in TERMINAL_EMAIL
            ):
                return view
            time.sleep(0.5)
        return None

    # ---- email ----------------------------------------------------------------------------

    def messages_to(self, addr: str) -> list[Any]:
        smtp = [m for m in self.smtp.messages if addr in (m["To"] or "")]
        maildir = self.dir / "maildir"
        if maildir.is_dir():  # the outbox mailer, if a topology uses it
            box = mailbox.Maildir(str(maildir), create=False)
            smtp += [m for m in box if addr in (m["To"] or "")]
        return smtp

    # ---- the invariants -------------------------------------------------------------------

    def verdict(
        self,
        scenario: str,
        sid: str,
        addr: str,
        *,
        expect: str = "delivered",
        timeout_s: float | None = None,
        delete: bool = True,
        unreachable: frozenset[str] = frozenset(),
    ) -> Verdict:
        """Wait for the session's end, then check the invariants (see the module docstring).

        ``unreachable`` cameras' boards are gone for good: what they captured but never
        sent is on them, not lost by the system, so their frames are not compared.
        """
        v = Verdict(scenario=scenario, session_id=sid)
        view = self.wait_terminal(sid, timeout_s)
        if view is None:
            view = self.session(sid)
            v.stuck = True
            v.problems.append(
                f"stuck in {view['state']} (email {(view.get('email_delivery') or {}).get('state')})"
            )
        v.final_state = view["state"]
        v.failure_reason = view.get("failure_reason")
        if view["state"] == "failed" and not v.failure_reason:
            v.problems.append("failed without a reason")
        if not v.stuck and view["state"] != expect:
            v.problems.append(f"ended {view['state']} ({v.failure_reason}), expected {expect}")
        v.details["takes"] = view.get("takes")
        timeline = view.get("timeline", [])
        v.details["timeline"] = [e["state"] for e in timeline]
        # Seconds spent in each state, to see where a scenario's time went.
        v.details["state_s"] = {
            a["state"]: round(b["at"] - a["at"], 1)
            for a, b in zip(timeline, timeline[1:], strict=False)
        }

        for camera in view.get("cameras") or list(self.booth.tokens):
            if camera in unreachable:
                continue
            fc = self.check_frames(sid, camera)
            v.frames.append(fc)
            if fc.lost:
                v.problems.append(f"{camera}: {fc.lost} captured frames not stored")
            if fc.duplicated:
                v.problems.append(f"{camera}: {fc.duplicated} frames stored more than once")

        msgs = self.messages_to(addr)
        ids = Counter(m["Message-ID"] for m in msgs)
        v.smtp_transmissions = len(msgs)
        v.emails_received = len(ids)
        if view["state"] == "delivered" and v.emails_received != 1:
            v.problems.append(f"{v.emails_received} emails for one delivered session")
        if view["state"] != "delivered" and v.emails_received:
            v.problems.append(f"{v.emails_received} emails for a session that was not delivered")

        if delete:
            v.orphans_after_delete = self.delete_and_list_leftovers(sid, unreachable)
            # Shown, not checked: this harness keeps uploaded recordings to compare them.
            v.details["edge_recordings_after_delete"] = sorted(
                c for c in self.booth.tokens if self.take_dir(sid, c).exists()
            )
            if v.orphans_after_delete:
                v.problems.append(
                    f"{len(v.orphans_after_delete)} things left after delete, e.g. "
                    + ", ".join(v.orphans_after_delete[:3])
                )
        v.passed = not v.problems
        return v

    def check_frames(self, sid: str, camera: str) -> FrameCheck:
        """Recording (what the camera captured) vs. the frame index and shard bytes (what is stored)."""
        from edge_agent.capture.segments import read_segment_packets
        from edge_agent.stream import RecordingArchive

        fc = FrameCheck(camera=camera)
        rows = self.repo.frame_index(sid, camera)
        fc.stored = len(rows)
        # Copies in the shards, indexed or not (the index cannot hold a seq twice).
        copies = Counter()
        for key in self.store.list(f"sessions/{sid}/frames/{camera}/"):
            copies.update(f.seq for f in decode_shard(self.store.get(key)))
        fc.duplicated = sum(n - 1 for n in copies.values() if n > 1)
        stored: dict[int, str] = {}
        shards: dict[str, bytes] = {}
        for r in rows:
            data = shards.get(r["shard_key"])
            if data is None:
                data = shards[r["shard_key"]] = self.store.get(r["shard_key"])
            digest = hashlib.sha256(data[r["offset"] : r["offset"] + r["length"]]).hexdigest()
            if digest != r["sha256"]:
                fc.notes.append(f"seq {r['seq']}: shard bytes do not match the index hash")
                fc.lost += 1
            stored[r["seq"]] = digest

        d = self.take_dir(sid, camera)
        index = d / "frames.csv"
        if index.exists():
            with open(index, newline="") as f:
                table = list(csv.DictReader(f))
            fc.captured = len(table)
            recorded = {
                fr.seq: hashlib.sha256(fr.jpeg).hexdigest()
                for fr in RecordingArchive(d.parents[1]).frames_from(sid, camera, 0)
            }
            unrecorded = {int(r["seq"]) for r in table if int(r["segment"]) < 0}
            for seq in range(fc.captured):
                if seq not in stored:
                    fc.lost += 1
                elif seq in recorded and recorded[seq] != stored[seq]:
                    fc.lost += 1
                    fc.notes.append(f"seq {seq}: stored bytes differ from the recording")
            fc.unverified = len(unrecorded & set(stored))
            extra = set(stored) - set(range(fc.captured))
            if extra:
                fc.duplicated += len(extra)
                fc.notes.append(f"{len(extra)} stored seqs beyond the take's {fc.captured} frames")
        else:
            # The agent was killed mid-take: no index was written. Its fragmented MP4
            # segments hold every frame up to the last complete fragment, in seq order.
            fc.recording_complete = False
            recorded_list: list[str] = []
            for seg in sorted(d.glob("seg_*.mp4")):
                try:
                    for _pts, jpeg in read_segment_packets(seg):
                        recorded_list.append(hashlib.sha256(jpeg).hexdigest())
                except Exception as e:  # a torn last fragment ends that segment early
                    fc.notes.append(f"{seg.name}: readable up to a torn end ({type(e).__name__})")
            fc.captured = len(recorded_list)
            stored_set = Counter(stored.values())
            fc.lost += sum(1 for h in recorded_list if stored_set[h] == 0)
            fc.unverified = max(0, len(stored) - len(set(recorded_list) & set(stored.values())))
            fc.notes.append("recording index absent (agent killed mid-take): compared by hash")
        return fc

    def delete_and_list_leftovers(
        self, sid: str, unreachable: frozenset[str] = frozenset()
    ) -> list[str]:
        """Delete the session through the API; list what is left of it (blobs, rows, spools).

        The spools of ``unreachable`` boards are not looked at: nothing can clean a board
        that is gone.
        """
        from sqlalchemy import select

        from cloud_trainer.repository import schema

        assert self.staff is not None
        attendee = self.repo.get_session(sid).get("attendee_id")
        r = self.staff.http.delete(
            f"/api/sessions/{sid}", headers={"X-CSRF-Token": self.staff.csrf}
        )
        if r.status_code != 204:
            return [f"DELETE answered {r.status_code}: {r.text[:200]}"]
        left = [f"blob {k}" for k in self.store.list(f"sessions/{sid}/")]
        # The tombstone stays on purpose (an id and a time, no personal data): it is how a
        # board that was offline learns to drop its copy.
        keyed = [
            (t, t.c.session_id)
            for t in schema.metadata.sorted_tables
            if "session_id" in t.c and t is not schema.session_tombstones
        ]
        keyed += [
            (schema.sessions, schema.sessions.c.id),
            (schema.attendees, schema.attendees.c.id),
        ]
        with self.repo.engine.connect() as conn:
            for table, col in keyed:
                key = attendee if table is schema.attendees else sid
                n = len(conn.execute(select(col).where(col == key)).all())
                if n:
                    left.append(f"{n} {table.name} row(s)")
        for camera in set(self.booth.tokens) - unreachable:
            spool = self.dir / "edge" / camera / "spool"
            left += [f"spool {p}" for p in spool.glob(f"*{sid}*")] if spool.is_dir() else []
        return left


# ---- scenarios -------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    title: str
    run: Callable[[ChaosBooth], Verdict]
    topology: str = "standard"


def _timed(fn: Callable[[ChaosBooth], Verdict]) -> Callable[[ChaosBooth], Verdict]:
    def run(booth: ChaosBooth) -> Verdict:
        t0 = time.monotonic()
        booth.ensure_healthy()
        v = fn(booth)
        v.seconds = time.monotonic() - t0
        log.info("scenario %s: %s (%.0f s)", v.scenario, v.explain(), v.seconds)
        return v

    return run


def double_start(b: ChaosBooth) -> Verdict:
    """Start pressed on two tablets at once: exactly one 200, the other 409, one take."""
    assert b.staff is not None
    sid, addr = b.new_session("double-start")
    second = StaffClient(b.booth.base_url)
    second.login("staff", b.booth.password)
    tablets = [b.staff, second]
    barrier = threading.Barrier(len(tablets))
    codes: list[int] = [0] * len(tablets)

    def press(i: int) -> None:
        t = tablets[i]
        barrier.wait()
        r = t.http.post(f"/api/sessions/{sid}/start", json={}, headers={"X-CSRF-Token": t.csrf})
        codes[i] = r.status_code

    threads = [threading.Thread(target=press, args=(i,)) for i in range(len(tablets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    v = b.verdict("double_start", sid, addr)
    v.details["status_codes"] = sorted(codes)
    if sorted(codes) != [200, 409]:
        v.problems.append(f"two Start presses answered {sorted(codes)}, expected [200, 409]")
    starts = [e for e in v.details["timeline"] if e == "capturing"]
    if len(starts) != 1:
        v.problems.append(f"{len(starts)} captures started for one session")
    takes = v.details.get("takes") or []
    if sorted(t["camera_id"] for t in takes) != sorted(b.booth.tokens):
        v.problems.append(f"takes {[t['camera_id'] for t in takes]}: expected one per camera")
    v.passed = not v.problems
    return v


def kill_serve_mid_take(b: ChaosBooth) -> Verdict:
    """kill -9 of booth serve (ingest, control, API) mid-take; restarted on the same ports."""
    sid, addr = b.new_session("kill-serve")
    b.press_start(sid)
    b.wait_mid_take(sid)
    before = b.stored_frames(sid)
    b.kill9("serve")
    b.restart("serve")
    v = b.verdict("kill_serve_mid_take", sid, addr)
    v.details["stored_at_kill"] = before
    v.passed = not v.problems
    return v


def kill_agent_mid_take(b: ChaosBooth) -> Verdict:
    """kill -9 of one agent mid-take; restarted, it seals its spooled take and uploads it."""
    camera = sorted(b.booth.tokens)[0]
    sid, addr = b.new_session("kill-agent")
    b.press_start(sid)
    b.wait_mid_take(sid, [camera])
    b.kill9(f"agent-{camera}")
    cut_short = not (b.take_dir(sid, camera) / "frames.csv").exists()
    b.restart(f"agent-{camera}")
    v = b.verdict("kill_agent_mid_take", sid, addr)
    v.details["killed"] = camera
    v.details["take_was_cut_short"] = cut_short
    if not cut_short:
        v.problems.append("the agent finished its take before the kill: not a mid-take kill")
    v.passed = not v.problems
    return v


def agent_never_returns(b: ChaosBooth) -> Verdict:
    """kill -9 of an agent mid-take, and its board never comes back: the session fails.

    The reason must name the camera (``booth.upload_deadline_s``, shortened here), the
    other camera's frames are still stored exactly once, nobody gets an email.
    """
    camera = sorted(b.booth.tokens)[0]
    usual = b.reconfigure("booth", ("serve",), upload_deadline_s=UPLOAD_DEADLINE_S)
    try:
        b.ensure_healthy()
        sid, addr = b.new_session("agent-gone")
        b.press_start(sid)
        b.wait_mid_take(sid, [camera])
        b.kill9(f"agent-{camera}")
        # The sweep runs every 30 s after the deadline (take + grace) has passed.
        deadline_s = b.plan.take_s + UPLOAD_DEADLINE_S + 30.0 + 60.0
        v = b.verdict(
            "agent_never_returns",
            sid,
            addr,
            expect="failed",
            timeout_s=deadline_s,
            unreachable=frozenset({camera}),
        )
        if v.final_state == "failed" and camera not in (v.failure_reason or ""):
            v.problems.append(f"the reason does not name the missing camera: {v.failure_reason}")
    finally:
        b.reconfigure("booth", ("serve",), **usual)
        b.restart(f"agent-{camera}")
    # The board comes back holding the take of a session that was deleted meanwhile:
    # ingest answers "deleted", and the board drops its spool copy and its recording.
    spool = b.dir / "edge" / camera / "spool"
    try:
        wait_for(
            lambda: b.log_count(f"agent-{camera}", f"take {sid}/{camera}: its session was deleted"),
            60,
            "the board to hear that the session was deleted",
        )
        wait_for(
            lambda: not any(spool.glob(f"*{sid}*")) and not b.take_dir(sid, camera).exists(),
            30,
            "the board to drop the deleted session's take",
        )
    except ChaosFailure as e:
        v.problems.append(str(e))
    v.details["edge_spool_keeps_deleted_take"] = any(spool.glob(f"*{sid}*"))
    v.details["edge_recording_kept_after_delete"] = b.take_dir(sid, camera).exists()
    if v.details["edge_spool_keeps_deleted_take"]:
        # Clear it by hand, as ops would, so the next scenario starts from an idle board.
        name = f"agent-{camera}"
        b.booth.procs.kill(name, signal.SIGTERM)
        for stale in spool.glob(f"*{sid}*"):
            shutil.rmtree(stale)
        b.booth.procs.start(name, *b.booth.procs.args[name])
    v.passed = not v.problems
    return v


def kill_worker_mid_training(b: ChaosBooth) -> Verdict:
    """kill -9 of the worker after a checkpoint; a second worker resumes the job from it."""
    # The scenarios' tiny budget may end training before its first step; this one needs
    # a job that trains long enough to be killed after a checkpoint past step 0.
    usual = b.reconfigure("trainer", ("worker",), budget_s=45.0, checkpoint_every_steps=20)
    sid, addr = b.new_session("kill-worker")
    b.press_start(sid)

    def checkpointed() -> dict[str, Any] | None:
        job = b.repo.job_for_session(sid)
        if not job or job["state"] != "running" or job["stage"] != "training":
            return None
        saved = b.store.list(f"sessions/{sid}/checkpoints/ckpt/")
        return job if any(re.search(r"/ckpt-[1-9][0-9]*\.index$", k) for k in saved) else None

    try:
        job = wait_for(checkpointed, 300, "the job to checkpoint past step 0", poll_s=0.1)
    except ChaosFailure:
        b.reconfigure("trainer", ("worker",), **usual)
        raise
    b.kill9("worker")
    checkpoints_at_kill = sorted(
        k.rsplit("/", 1)[-1]
        for k in b.store.list(f"sessions/{sid}/checkpoints/ckpt/")
        if k.endswith(".index")
    )
    b.start_process("worker-2", "worker", "--config", str(b.booth.config_path), "--id", "worker-2")
    try:
        v = b.verdict("kill_worker_mid_training", sid, addr, delete=False)
        job = b.repo.get_job(job["id"])
        state_file = b.dir / "jobs" / sid / "checkpoints" / "state.json"
        import json

        done = (json.loads(state_file.read_text()).get("done") or {}) if state_file.exists() else {}
        v.details.update(
            checkpoints_at_kill=checkpoints_at_kill,
            attempts=job["attempts"],
            worker=job["worker"],
            resumed_from=done.get("resumed_from"),
            steps=done.get("steps"),
        )
        if job["attempts"] < 2 or job["worker"] != "worker-2":
            v.problems.append(
                f"job attempts {job['attempts']} by {job['worker']}: worker-2 never took it over"
            )
        if not done.get("resumed_from"):
            v.problems.append(
                f"worker-2 started from step {done.get('resumed_from')}, not from a checkpoint"
            )
        v.orphans_after_delete = b.delete_and_list_leftovers(sid)
        if v.orphans_after_delete:
            v.problems.append(f"left after delete: {v.orphans_after_delete[:3]}")
    finally:
        # Back to one worker, under its usual name, with the usual budget.
        b.booth.procs.kill("worker-2", signal.SIGTERM)
        del b.booth.procs.children["worker-2"]
        b.reconfigure("trainer", ("worker",), **usual)
    v.passed = not v.problems
    return v


def _kill_mailer(point: str) -> Callable[[ChaosBooth], Verdict]:
    def run(b: ChaosBooth) -> Verdict:
        from cloud_trainer.deliver import CRASH_ENV

        name = f"kill_app_while_emailing_{point}"
        b.restart("serve", env={CRASH_ENV: point})
        b.ensure_healthy()
        sid, addr = b.new_session("kill-mailer")
        b.press_start(sid)
        proc = b.booth.procs.children["serve"]
        wait_for(lambda: proc.poll() is not None, 600, "serve to die inside the SMTP send")
        accepted_before_restart = len(b.messages_to(addr))
        b.restart("serve")  # without the hook
        v = b.verdict(name, sid, addr, timeout_s=b.plan.timeout_s + MAIL_LEASE_S)
        v.details.update(
            serve_exit=proc.returncode,
            accepted_before_crash=accepted_before_restart,
            message_ids=[m["Message-ID"] for m in b.messages_to(addr)],
        )
        if proc.returncode != -signal.SIGKILL:
            v.problems.append(f"serve exited {proc.returncode}, not killed by the hook")
        if accepted_before_restart != 1:
            v.problems.append(f"{accepted_before_restart} emails accepted before the crash")
        if point == "after_sent_log" and v.smtp_transmissions != 1:
            v.problems.append(f"{v.smtp_transmissions} SMTP transmissions (sent-log said sent)")
        v.passed = not v.problems
        return v

    return run


def _cut_link(seconds: float, name: str, *, stale: bool) -> Callable[[ChaosBooth], Verdict]:
    """Black-hole the link mid-take for ``seconds``.

    A short drop resumes on the same TCP connections. After a long one (``stale``)
    the connections are dead when the link returns (an access point or NAT that lost
    their state answers with a reset), so the agents must reconnect and resume from
    the server's acked seq.
    """

    def run(b: ChaosBooth) -> Verdict:
        sid, addr = b.new_session("link-cut")
        b.press_start(sid)
        b.wait_mid_take(sid)
        before = b.stored_frames(sid)
        conns = b.proxy.connections
        b.proxy.cut()
        # The outage itself: its length is the fault, not a wait for a condition.
        time.sleep(seconds)
        during = b.stored_frames(sid)
        if stale:
            b.proxy.reset()
        b.proxy.restore()
        v = b.verdict(name, sid, addr)
        v.details.update(
            cut_s=seconds,
            stored_at_cut=before,
            stored_at_restore=during,
            new_connections=b.proxy.connections - conns,
        )
        v.passed = not v.problems
        return v

    return run


def full_spool_disk(b: ChaosBooth) -> Verdict:
    """The spool's disk fills up mid-take; the missing frames are read back from the MP4s.

    The link is black-holed (so nothing drains the spool) and each agent's spool
    filesystem is filled to within a few frames. Once every agent says its take is
    behind, the link comes back, the rest of the disk stays full: the status must say
    ``upload_behind``, the spool drains as acks arrive, and the frames that found no
    room are read back from the recording into the room the drain frees.
    """
    if not b.tmpfs_mounts:
        raise ChaosFailure("this topology has no tmpfs spool")
    cameras = list(b.booth.tokens)
    behind_logged = {c: b.log_count(f"agent-{c}", "is behind from frame") for c in cameras}
    sid, addr = b.new_session("full-spool")
    fillers = []
    b.press_start(sid)
    b.wait_mid_take(sid, min_stored=1)
    b.proxy.cut()
    try:
        for spool in b.tmpfs_mounts:
            filler = spool / "filler.bin"
            st = os.statvfs(spool)
            with open(filler, "wb") as f, contextlib.suppress(OSError):
                f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - 16 * 1024))
            fillers.append(filler)
        wait_for(
            lambda: all(
                b.log_count(f"agent-{c}", "is behind from frame") > behind_logged[c]
                for c in cameras
            ),
            60,
            "every agent to say its take is behind (spool disk full)",
        )
    finally:
        b.proxy.restore()
    saw_behind = False
    with contextlib.suppress(ChaosFailure):
        saw_behind = bool(
            wait_for(
                lambda: any(a.get("upload_behind") for a in b.agents().values()),
                30,
                "the tablet to show upload_behind",
                poll_s=0.1,
            )
        )
    v = b.verdict("full_spool_disk", sid, addr)
    for f in fillers:
        f.unlink(missing_ok=True)
    v.details["saw_upload_behind"] = saw_behind
    v.details["caught_up_from_recording"] = {
        c: b.log_count(f"agent-{c}", "caught up from its recording") for c in cameras
    }
    v.details["poses_read_back"] = {
        c: b.log_count(f"agent-{c}", "poses caught up from the recording") for c in cameras
    }
    if not saw_behind:
        v.problems.append("the status never said the upload was behind")
    v.passed = not v.problems
    return v


def smtp_down(b: ChaosBooth) -> Verdict:
    """The SMTP relay is down when the email is due; it comes back later; one email arrives."""
    sid, addr = b.new_session("smtp-down")
    b.smtp.stop()
    try:
        b.press_start(sid)

        def retried() -> bool:
            e = b.session(sid).get("email_delivery") or {}
            return (e.get("attempts") or 0) >= 2 and e.get("state") not in TERMINAL_EMAIL

        wait_for(retried, b.plan.timeout_s, "the email to be retried while SMTP is down", 0.5)
        attempts_while_down = (b.session(sid).get("email_delivery") or {}).get("attempts")
    finally:
        b.smtp.start()
    v = b.verdict("smtp_down", sid, addr)
    v.details["attempts_while_down"] = attempts_while_down
    v.passed = not v.problems
    return v


def pubsub_redelivery(b: ChaosBooth) -> Verdict:
    """A finished job is published again on Pub/Sub: nothing runs twice, no second email."""
    from cloud_trainer.config import PubSubQueue
    from cloud_trainer.queue import create_job_queue

    sid, addr = b.new_session("redeliver")
    b.press_start(sid)
    v = b.verdict("pubsub_redelivery", sid, addr, delete=False)
    job = b.repo.job_for_session(sid)
    if job is None:
        v.problems.append("no job row")
        return v
    acked_before = b.log_count("worker", "job already ended")
    # This process publishes too: to the booth's emulator (the client reads the variable).
    saved = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ.update(b.topology.env)
    try:
        queue = create_job_queue(PubSubQueue(**b.topology.queue))
        try:
            for _ in range(2):  # a duplicate publish, and the redelivery of it
                queue.publish(job["id"], {"session_id": sid})
        finally:
            queue.close()
    finally:
        if saved is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = saved
    wait_for(
        lambda: b.log_count("worker", "job already ended") >= acked_before + 2,
        120,
        "the worker to acknowledge both redeliveries",
    )
    after = b.repo.get_job(job["id"])
    view = b.session(sid)
    msgs = b.messages_to(addr)
    v.details.update(attempts_before=job["attempts"], attempts_after=after["attempts"])
    if after["attempts"] != job["attempts"] or after["state"] != job["state"]:
        v.problems.append(f"the job ran again: {job['attempts']} -> {after['attempts']} attempts")
    if view["state"] != "delivered":
        v.problems.append(f"the session moved to {view['state']}")
    if len({m["Message-ID"] for m in msgs}) != 1 or len(msgs) != 1:
        v.problems.append(f"{len(msgs)} emails after the redelivery")
    v.emails_received = len({m["Message-ID"] for m in msgs})
    v.orphans_after_delete = b.delete_and_list_leftovers(sid)
    if v.orphans_after_delete:
        v.problems.append(f"left after delete: {v.orphans_after_delete[:3]}")
    v.passed = not v.problems
    return v


def _scenarios(long_cut_s: float) -> dict[str, Scenario]:
    items = [
        Scenario("double_start", "Start pressed on two tablets at once", double_start),
        Scenario(
            "kill_agent_mid_take",
            "kill -9 of an agent mid-take",
            kill_agent_mid_take,
        ),
        Scenario(
            "agent_never_returns",
            "kill -9 of an agent mid-take, never restarted",
            agent_never_returns,
        ),
        Scenario("smtp_down", "SMTP down for a while", smtp_down),
        Scenario(
            "kill_serve_mid_take",
            "kill -9 of the ingest server mid-take",
            kill_serve_mid_take,
        ),
        Scenario(
            "kill_worker_mid_training",
            "kill -9 of the worker mid-training",
            kill_worker_mid_training,
        ),
        Scenario(
            "kill_app_while_emailing_after_sent_log",
            "kill -9 of the app while it sends email (after the sent-log)",
            _kill_mailer("after_sent_log"),
        ),
        Scenario(
            "kill_app_while_emailing_after_accept",
            "kill -9 of the app while it sends email (before the sent-log)",
            _kill_mailer("after_accept"),
        ),
        Scenario(
            "link_cut_5s",
            "network cut agent-ingest for 5 s",
            _cut_link(5.0, "link_cut_5s", stale=False),
        ),
        Scenario(
            f"link_cut_{long_cut_s:g}s",
            f"network cut agent-ingest for {long_cut_s:g} s",
            _cut_link(long_cut_s, f"link_cut_{long_cut_s:g}s", stale=True),
        ),
        Scenario(
            "full_spool_disk", "the agent's spool disk fills up", full_spool_disk, topology="tmpfs"
        ),
        Scenario(
            "pubsub_redelivery",
            "Pub/Sub redelivery of a finished job",
            pubsub_redelivery,
            topology="pubsub",
        ),
    ]
    return {s.name: Scenario(s.name, s.title, _timed(s.run), s.topology) for s in items}


LONG_CUT_ENV = "CHAOS_LONG_CUT_S"


def scenarios(long_cut_s: float | None = None) -> dict[str, Scenario]:
    if long_cut_s is None:
        long_cut_s = float(os.environ.get(LONG_CUT_ENV, "60"))
    return _scenarios(long_cut_s)


def topology(name: str, pubsub_host: str | None = None) -> Topology:
    if name == "standard":
        return Topology()
    if name == "tmpfs":
        return Topology(name="tmpfs", spool_tmpfs_kb=4096)
    if name == "pubsub":
        if pubsub_host is None:
            raise ChaosFailure("the pubsub topology needs the Pub/Sub emulator")
        suffix = secrets.token_hex(4)
        return Topology(
            name="pubsub",
            queue={
                "type": "pubsub",
                "project": "dancebooth-chaos",
                "topic": f"jobs-{suffix}",
                "subscription": f"workers-{suffix}",
                "ack_deadline_s": 10,
                "max_attempts": 3,
            },
            env={"PUBSUB_EMULATOR_HOST": pubsub_host},
        )
    raise ValueError(f"unknown topology {name!r}")
