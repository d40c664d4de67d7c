"""Helpers for the browser tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import staff_app

from edge_agent.skeleton import NUM_JOINTS

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except (StaleElementReferenceException, NoSuchElementException):
            value = None  # the page was navigating (reloading) while we looked
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


# ---- the tablet's web app, its control plane and a log-in --------------------------------

# A standing figure: every joint seen, spread over the frame (fractions of it).
POSE = [[0.3 + 0.4 * (j % 5) / 4, 0.1 + 0.8 * j / NUM_JOINTS, 0.9] for j in range(NUM_JOINTS)]
HOSTILE = '<img src=x onerror="window.pwned=1">'


class CapturingCamera:
    """The control plane as the web app sees it, with one camera mid-take."""

    def online_agents(self, booth_id: str) -> list[dict]:
        return [
            {
                "camera_id": "cam0",
                "online": True,
                "state": "capturing",
                "session_id": "",
                "fps": 120.0,
                "frames_captured": 480,
                "capture_dropped": 0,
                "pose_dropped": 3,
                "frames_acked": 400,
                "upload_behind": True,
                "error": HOSTILE,
                "warnings": ["camera granted 60 fps; 120 were asked"],
                "live_pose": POSE,
                "last_seen": 0.0,
            }
        ]


def log_in(d, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    d.get(f"{base_url}/login")
    d.find_element(By.ID, "username").send_keys(staff_app.STAFF)
    d.find_element(By.ID, "password").send_keys(staff_app.PASSWORD)
    d.find_element(By.ID, "login").click()
    wait_for(lambda: d.find_elements(By.ID, "new-session"), 15, "the tablet home page")


class StallingProxy:
    """A TCP relay in front of the web app that can stop answering without hanging up.

    ``stall()`` holds every byte in both directions, on open connections and new
    ones alike: the server seems up (connections are accepted) but never answers,
    the failure a plain "connection refused" check misses. ``flow()`` lets bytes
    through again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()
                if self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
