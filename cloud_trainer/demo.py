"""``booth demo``: the whole booth on one machine, driven the way staff drive it.

It writes a config with the embedded defaults (SQLite, local blobs, the SQLite
queue, a maildir), builds the booth's base checkpoint once (cached), then
starts the real processes: ``booth serve``, one ``booth worker`` and one
``booth agent`` per synthetic camera. It logs in over HTTP, enters an attendee
with consent, picks a built-in reference dance, presses Start, and follows the
session through upload, training, rendering and email with a progress bar per
stage. At the end it prints the link, the MP4, the quality score and the email
as the attendee received it.

``DemoBooth`` is also what the end-to-end test and ``bench/e2e.py`` run, with
smaller settings.
"""

from __future__ import annotations

import contextlib
import email
import email.utils
import json
import logging
import mailbox
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloud_trainer.ingest.auth import hash_token
from edge_agent.errors import BoothError

log = logging.getLogger(__name__)

STAGES = ("capturing", "uploaded", "training", "rendering", "delivered")


@dataclass
class DemoPlan:
    workdir: Path = Path("var/demo")
    cameras: int = 2
    take_s: float = 15.0
    fps: float = 120.0
    size: tuple[int, int] = (640, 480)
    train_size_px: int = 64
    label_map: str = "skeleton"
    budget_s: float = 150.0
    batch: int = 4
    base_budget_s: float = 120.0
    base_attendees: str = "2..5"
    reference: str = "synthetic:warmup"
    attendee_seed: int = 1
    countdown_s: int = 3
    segment_s: float = 2.0
    timeout_s: float = 900.0
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    # Fault-injection seams (the chaos suite): sections merged into booth.yaml (e.g.
    # mail, queue, trainer) and into each agent's ``agent:`` section (e.g. uplink), and
    # an address the agents dial instead of serve's gRPC port (e.g. a cuttable proxy).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    agent_overrides: dict[str, Any] = field(default_factory=dict)
    uplink_address: str | None = None


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, recursively for nested dicts.

    A section whose adapter ``type`` changes is replaced, not merged: another
    adapter's keys would be refused by the strict config.
    """
    out = dict(base)
    for k, v in over.items():
        old = out.get(k)
        mergeable = (
            isinstance(v, dict)
            and isinstance(old, dict)
            and v.get("type", old.get("type")) == old.get("type")
        )
        out[k] = _merged(old, v) if mergeable else v
    return out


class DemoFailed(BoothError):
    pass


class Processes:
    """Child processes in their own process groups; all are killed on exit."""

    def __init__(self, logs: Path, plan: DemoPlan):
        self.logs = logs
        self.plan = plan
        self.children: dict[str, subprocess.Popen] = {}
        self.args: dict[str, tuple[str, ...]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **self.plan.env, **(env or {})}
        proc = subprocess.Popen(
            [self.plan.python, "-m", "cloud_trainer.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        out.close()
        self.children[name] = proc
        self.args[name] = args
        return proc

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the child's whole process group (SIGKILL: no clean-up) and reap it."""
        proc = self.children[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait()

    def restart(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``name`` again with the same arguments (killing it first if it still runs)."""
        if self.children[name].poll() is None:
            self.kill(name)
        return self.start(name, *self.args[name], env=env)

    def check(self) -> None:
        from cloud_trainer.commands.worker import RECYCLE_EXIT

        for name, proc in list(self.children.items()):
            if proc.poll() == RECYCLE_EXIT and self.args[name][:1] == ("worker",):
                # A worker that grew past its memory limit asks to be replaced, as
                # compose's restart policy would.
                self.start(name, *self.args[name])
                continue
            if proc.poll() is not None:
                tail = (
                    (self.logs / f"{name}.log")
                    .read_text(errors="replace")
                    .strip()
                    .splitlines()[-5:]
                )
                raise DemoFailed(f"{name} exited with {proc.returncode}: " + " | ".join(tail))

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class StaffClient:
    """The tablet's side of the JSON API."""

    def __init__(self, base_url: str):
        import httpx

        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        self.csrf = ""

    def login(self, username: str, password: str) -> None:
        r = self.http.post("/api/login", json={"username": username, "password": password})
        self._ok(r)
        self.csrf = r.json()["csrf_token"]

    def _ok(self, r) -> None:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            raise DemoFailed(f"{r.request.method} {r.request.url.path}: {r.status_code} {detail}")

    def post(self, path: str, body: dict | None = None) -> dict:
        r = self.http.post(path, json=body or {}, headers={"X-CSRF-Token": self.csrf})
        self._ok(r)
        return r.json()

    def get(self, path: str) -> Any:
        r = self.http.get(path)
        self._ok(r)
        return r.json()


class DemoBooth:
    def __init__(self, plan: DemoPlan):
        self.plan = plan
        self.dir = plan.workdir.resolve()
        self.procs = Processes(self.dir / "logs", plan)
        self.password = secrets.token_urlsafe(12)
        self.tokens = {f"cam{i}": secrets.token_urlsafe(24) for i in range(plan.cameras)}
        self.ports: dict[str, int] = {}
        self.config_path = self.dir / "booth.yaml"
        self.base_cached = False  # set by base_checkpoint()
        self.pretrain_s = 0.0

    # ---- set-up --------------------------------------------------------------------

    def base_checkpoint(self, progress: bool = True) -> Path:
        """The booth's base checkpoint, pretrained on other synthetic attendees (cached).

        The cache is kept per recipe (label map, size, attendees, budget, batch) beside
        the demo's directory; ``base_cached`` and ``pretrain_s`` say which this run got.
        """
        p = self.plan
        recipe = (
            f"{p.label_map}-{p.train_size_px}px-a{p.base_attendees.replace('..', '-')}"
            f"-{p.base_budget_s:g}s-b{p.batch}"
        )
        base = self.dir.parent / "demo-base" / recipe
        if (base / "base.json").exists():
            self.base_cached = True
            return base
        t0 = time.monotonic()
        args = [
            "pretrain",
            "--out",
            str(base),
            "--attendees",
            p.base_attendees,
            "--size",
            str(p.train_size_px),
            "--label-map",
            p.label_map,
            "--budget-s",
            str(p.base_budget_s),
            "--batch",
            str(p.batch),
        ]
        if not progress:
            args.append("--no-progress")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **p.env}
        r = subprocess.run([p.python, "-m", "cloud_trainer.cli", *args], env=env)
        if r.returncode != 0 or not (base / "base.json").exists():
            raise DemoFailed("pretraining the base checkpoint failed (see above)")
        self.pretrain_s = time.monotonic() - t0
        return base

    def write_config(self, base: Path | None) -> None:
        from cloud_trainer.web.security import hash_password

        p, d = self.plan, self.dir
        cfg = {
            "booth": {
                "id": "booth-1",
                "name": "dancebooth demo",
                "take_s": p.take_s,
                "countdown_s": p.countdown_s,
            },
            "models_dir": str(Path("models").resolve()),
            "ingest": {
                "host": "127.0.0.1",
                "port": 0,
                "agents": [
                    {"camera_id": c, "token_sha256": hash_token(t)} for c, t in self.tokens.items()
                ],
            },
            "storage": {"type": "local", "root": str(d / "blobs")},
            "database": {"type": "sqlite", "path": str(d / "booth.db")},
            "queue": {"type": "sqlite", "path": str(d / "queue.db"), "visibility_timeout_s": 60},
            "trainer": {
                "size_px": p.train_size_px,
                "label_map": p.label_map,
                "budget_s": p.budget_s,
                "batch": p.batch,
                "base_checkpoint": str(base) if base else None,
                "work_dir": str(d / "jobs"),
                "checkpoint_every_s": 30,
            },
            "mail": {
                "type": "outbox",
                "maildir": str(d / "maildir"),
                "sent_log": str(d / "mail-sent.log"),
            },
            "web": {
                "host": "127.0.0.1",
                "port": 0,
                "base_url": "http://127.0.0.1:0",
                "secret_key": secrets.token_urlsafe(32),
                "staff": [{"username": "staff", "password_hash": hash_password(self.password)}],
            },
        }
        cfg = _merged(cfg, p.config_overrides)
        d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self._cfg = cfg

    def _agent_config(self, camera: str, index: int) -> Path:
        p = self.plan
        agent = {
            "agent": {
                "booth_id": "booth-1",
                "camera_id": camera,
                "source": {
                    "type": "synthetic",
                    "attendee": p.attendee_seed,
                    "dance": 1,
                    "viewpoint": index,
                    "size": f"{p.size[0]}x{p.size[1]}",
                    "fps": p.fps,
                },
                "pose": {
                    "type": "cpu",
                    "models_dir": str(Path("models").resolve()),
                    "threads": 1,
                    "mode": "tracking",
                },
                "capture": {
                    "out_dir": str(self.dir / "edge" / camera / "takes"),
                    "segment_s": p.segment_s,
                },
                "uplink": {
                    "address": p.uplink_address or f"127.0.0.1:{self.ports['grpc']}",
                    "token": self.tokens[camera],
                    "spool_dir": str(self.dir / "edge" / camera / "spool"),
                },
            }
        }
        agent["agent"] = _merged(agent["agent"], p.agent_overrides)
        path = self.dir / f"agent-{camera}.yaml"
        path.write_text(yaml.safe_dump(agent, sort_keys=False))
        return path

    def start(self) -> StaffClient:
        ready = self.dir / "serve.ready"
        ready.unlink(missing_ok=True)
        self.procs.start(
            "serve", "serve", "--config", str(self.config_path), "--ready-file", str(ready)
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            self.procs.check()
            if time.monotonic() > deadline:
                raise DemoFailed("booth serve did not come up within 60 s")
            time.sleep(0.1)
        self.ports = json.loads(ready.read_text())
        # A restarted serve binds the same ports, so agents and tablets find it again.
        self.procs.args["serve"] += (
            "--http-port",
            str(self.ports["http"]),
            "--grpc-port",
            str(self.ports["grpc"]),
        )
        # The worker and the links need the real base URL now that the port is known.
        self._cfg["web"]["base_url"] = self.base_url
        self.config_path.write_text(yaml.safe_dump(self._cfg, sort_keys=False))
        self.procs.start("worker", "worker", "--config", str(self.config_path))
        for i, camera in enumerate(self.tokens):
            self.procs.start(
                f"agent-{camera}",
                "agent",
                "--config",
                str(self._agent_config(camera, i)),
                "--prerender-seconds",
                str(self.plan.take_s),
            )
        staff = StaffClient(self.base_url)
        staff.login("staff", self.password)
        return staff

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def wait_for_agents(self, staff: StaffClient, timeout_s: float = 180.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            self.procs.check()
            agents = staff.get("/api/agents")
            ready = [a for a in agents if a["online"] and a["state"] == "idle"]
            if len(ready) >= self.plan.cameras:
                return agents
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"only {len(ready)} of {self.plan.cameras} cameras came online: {agents}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        self.procs.stop()

    # ---- the run ---------------------------------------------------------------------

    def run_session(self, staff: StaffClient, progress: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        p = self.plan
        s = staff.post(
            "/api/sessions",
            {
                "name": "Demo Dancer",
                "email": "dancer@example.org",
                "consent": True,
                "reference": p.reference,
            },
        )
        sid = s["id"]
        t_start = time.time()
        staff.post(f"/api/sessions/{sid}/start")
        bars: dict[str, Any] = {}
        disable = not progress
        deadline = time.monotonic() + p.timeout_s
        capture_end = None
        captured = dropped = 0
        view = s
        while True:
            self.procs.check()
            view = staff.get(f"/api/sessions/{sid}")
            agents = staff.get("/api/agents")
            state = view["state"]
            capture_over = time.time() > t_start + p.countdown_s + 1 and all(
                a["state"] != "capturing" for a in agents if a["online"]
            )
            if capture_end is None and capture_over:
                capture_end = time.time()
                captured = sum(int(a.get("frames_captured") or 0) for a in agents)
                dropped = sum(int(a.get("capture_dropped") or 0) for a in agents)
            self._update_bars(bars, view, disable, tqdm)
            if state == "failed":
                raise DemoFailed(f"the session failed: {view['failure_reason']}")
            delivery = view.get("email_delivery") or {}
            if state == "delivered" and delivery.get("state") in ("sent", "failed", "bounced"):
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out in state {state}")
            time.sleep(0.5)
        for bar in bars.values():
            bar.close()
        t_end = time.time()
        times = {e["state"]: e["at"] for e in view["timeline"]}
        started = times.get("capturing", t_start)
        expected = sum(t["frame_count"] or 0 for t in view["takes"])
        return {
            "session_id": sid,
            "view": view,
            "seconds_total": t_end - t_start,
            "seconds_capture": (capture_end or times.get("uploaded", t_end)) - started,
            "seconds_upload": times.get("uploaded", t_end) - (capture_end or started),
            "seconds_train": times.get("rendering", t_end) - times.get("training", t_end),
            "seconds_render": times.get("delivered", t_end) - times.get("rendering", t_end),
            "seconds_email": (delivery.get("sent_at") or t_end) - times.get("delivered", t_end),
            # The agents' own counts when the take ended; else the frame counts the agents
            # declared when their streams ended (theirs too, not what the server stored).
            "frames_captured": captured or expected,
            "frames_expected": expected,
            "frames_uploaded": view["frames_uploaded"],
            "capture_dropped": dropped,
        }

    def _update_bars(self, bars: dict, view: dict, disable: bool, tqdm) -> None:
        state = view["state"]
        p = view.get("progress") or {}
        take_total = sum(int(t["frame_count"] or 0) for t in view["takes"]) or int(
            self.plan.take_s * self.plan.fps * self.plan.cameras
        )
        if state in STAGES and "upload" not in bars:
            bars["upload"] = tqdm(
                total=take_total, desc="capture+upload", unit="frame", disable=disable, leave=True
            )
        if "upload" in bars:
            bars["upload"].total = take_total
            bars["upload"].n = min(view["frames_uploaded"], take_total)
            bars["upload"].refresh()
        if state in ("training", "rendering", "delivered") and p.get("stage"):
            if "train" not in bars:
                bars["train"] = tqdm(
                    total=int(self.plan.budget_s),
                    desc="training",
                    unit="s",
                    disable=disable,
                    leave=True,
                )
            bar = bars["train"]
            elapsed = time.time() - next(
                (e["at"] for e in view["timeline"] if e["state"] == "training"), time.time()
            )
            bar.n = min(int(elapsed), bar.total)
            bar.set_postfix_str(
                f"{p.get('stage')} step {p.get('step')}"
                + (f" L1 {p['loss']:.3f}" if p.get("loss") is not None else "")
            )
        if state in ("rendering", "delivered") and "render" not in bars:
            if "train" in bars:
                bars["train"].n = bars["train"].total
                bars["train"].refresh()
            bars["render"] = tqdm(total=1, desc="rendering", disable=disable, leave=True)
        if state == "delivered":
            if "render" in bars and bars["render"].n == 0:
                bars["render"].update(1)
            if "email" not in bars:
                bars["email"] = tqdm(total=1, desc="email", disable=disable, leave=True)
            if (view.get("email_delivery") or {}).get("state") == "sent" and bars["email"].n == 0:
                bars["email"].update(1)

    def received_emails(self, to_addr: str) -> list[email.message.Message]:
        try:
            box = mailbox.Maildir(str(self.dir / "maildir"), create=False)
        except mailbox.NoSuchMailboxError:  # nothing sent yet
            return []
        return [m for m in box if to_addr in (m["To"] or "")]

    def emailed_link(self, to_addr: str) -> str | None:
        """The watch link in the newest email to ``to_addr``: where the attendee finds it
        (the booth keeps only its hash)."""
        found = None
        for msg in sorted(self.received_emails(to_addr), key=_sent_at):
            for part in msg.walk():
                if part.get_content_type() != "text/plain":
                    continue
                body = part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")
                match = re.search(r"https?://\S+/v/[A-Za-z0-9_-]+", body)
                if match:
                    found = match.group(0)
        return found


def _sent_at(msg: email.message.Message) -> float:
    try:
        return email.utils.parsedate_to_datetime(msg["Date"]).timestamp()
    except (TypeError, ValueError):
        return 0.0


def run_demo(
    plan: DemoPlan, *, keep_serving: bool = False, progress: bool = True, out=sys.stdout
) -> dict[str, Any]:
    booth = DemoBooth(plan)
    t0 = time.time()
    print(f"dancebooth demo in {booth.dir}", file=out)
    print(
        "1/3 base checkpoint (pretrained once on other synthetic attendees, then cached)", file=out
    )
    base = booth.base_checkpoint(progress=progress)
    booth.write_config(base)
    print(
        "2/3 starting the booth: booth serve, booth worker, and "
        f"{plan.cameras} agents with synthetic cameras at {plan.size[0]}x{plan.size[1]}, {plan.fps:g} fps",
        file=out,
    )
    try:
        staff = booth.start()
        booth.wait_for_agents(staff)
        print(
            f"3/3 staff at {booth.base_url}: attendee entered with consent, reference "
            f"{plan.reference}, Start pressed ({plan.take_s:g} s take)",
            file=out,
        )
        result = booth.run_session(staff, progress=progress)
        mails = booth.received_emails("dancer@example.org")
        s = staff.get(f"/api/sessions/{result['session_id']}")
        video_path = booth.dir / "blobs" / "sessions" / result["session_id"] / "video" / "final.mp4"
        result.update(
            seconds_with_setup=time.time() - t0,
            base_cached=booth.base_cached,
            seconds_pretrain=booth.pretrain_s,
            emails_received=len(mails),
            link=booth.emailed_link("dancer@example.org"),
            video_path=str(video_path),
            quality=s.get("quality") or {},
        )
        print("", file=out)
        print(f"link:     {result['link']}", file=out)
        print(f"video:    {result['video_path']}", file=out)
        q = result["quality"]
        if q:
            print(
                "quality:  "
                + ", ".join(
                    f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in sorted(q.items())
                ),
                file=out,
            )
        print(
            f"frames:   {result['frames_uploaded']} uploaded of {result['frames_expected']} captured, "
            f"{result['capture_dropped']} dropped at capture",
            file=out,
        )
        print(
            f"time:     {result['seconds_total']:.0f} s from Start to email "
            f"(capture {result['seconds_capture']:.0f}, upload {result['seconds_upload']:.0f}, "
            f"train {result['seconds_train']:.0f}, render {result['seconds_render']:.0f}, "
            f"email {result['seconds_email']:.0f})",
            file=out,
        )
        if mails:
            m = mails[-1]
            body = next(
                (
                    part.get_payload(decode=True).decode(errors="replace")
                    for part in m.walk()
                    if part.get_content_type() == "text/plain"
                ),
                "",
            )
            print(
                "\nthe email, as received (maildir " + str(booth.dir / "maildir") + "):", file=out
            )
            print(f"  From: {m['From']}\n  To: {m['To']}\n  Subject: {m['Subject']}", file=out)
            for line in body.strip().splitlines():
                print("  " + line, file=out)
        if keep_serving:
            print(
                f"\nthe booth keeps serving: open {booth.base_url}/ and log in as staff / {booth.password}"
                " (Ctrl-C to stop)",
                file=out,
            )
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    booth.procs.check()
                    time.sleep(1)
        return result
    finally:
        booth.stop()
