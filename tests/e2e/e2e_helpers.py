"""Helpers for the browser tests."""

from __future__ import annotations

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
