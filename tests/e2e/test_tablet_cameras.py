"""The tablet's camera panel in a real browser: warnings, the live pose, agent text as text.

The web app runs for real (uvicorn on a free port) with a control plane that
reports one capturing camera, as the registry would.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import staff_app
import transport_helpers as th
import uvicorn
from e2e_helpers import wait_for

from edge_agent.skeleton import LIMB_INDEX, NUM_JOINTS

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


@pytest.fixture
def tablet(tmp_path: Path, get_free_port):
    made = staff_app.build_app(staff_app.staff_settings(tmp_path))
    made.app = staff_app.create_app(
        made.settings,
        repo=made.repo,
        store=made.store,
        references=lambda: [],
        deliverer=None,
        control=CapturingCamera(),
    )
    port = get_free_port()
    server = uvicorn.Server(
        uvicorn.Config(made.app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the web app to listen", poll_s=0.05)
    made.base_url = f"http://127.0.0.1:{port}"
    yield made
    server.should_exit = True
    thread.join(10)
    made.repo.close()


def log_in(d, tablet) -> None:
    from selenium.webdriver.common.by import By

    d.get(f"{tablet.base_url}/login")
    d.find_element(By.ID, "username").send_keys(staff_app.STAFF)
    d.find_element(By.ID, "password").send_keys(staff_app.PASSWORD)
    d.find_element(By.ID, "login").click()
    wait_for(lambda: d.find_elements(By.ID, "new-session"), 15, "the tablet home page")


def test_the_camera_panel_draws_the_live_pose_and_shows_agent_text_as_text(tablet, browser):
    from selenium.webdriver.common.by import By

    sid = th.new_session(tablet.repo, booth_id=tablet.settings.booth.id)
    d = browser
    log_in(d, tablet)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    lines = wait_for(
        lambda: d.find_elements(By.CSS_SELECTOR, "#agents svg.pose line"), 15, "the live pose"
    )
    assert len(lines) == len(LIMB_INDEX)  # every bone of a fully seen figure
    a, b = LIMB_INDEX[0]
    assert float(lines[0].get_attribute("x1")) == pytest.approx(POSE[a][0] * 160, abs=0.01)
    assert float(lines[0].get_attribute("y2")) == pytest.approx(POSE[b][1] * 120, abs=0.01)
    panel = d.find_element(By.ID, "agents").text
    assert "camera granted 60 fps; 120 were asked" in panel and "upload behind" in panel
    assert HOSTILE in panel  # shown as the text it is ...
    assert not d.find_elements(By.CSS_SELECTOR, "#agents img")  # ... never as markup
    assert d.execute_script("return window.pwned === undefined")


def test_a_take_that_fails_while_its_page_is_open_offers_start_again(tablet, browser):
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    d = browser
    log_in(d, tablet)
    # The home page stays live: a session another tablet starts is announced.
    assert not d.find_element(By.ID, "home-new").is_displayed()
    th.new_session(repo, booth_id=tablet.settings.booth.id)
    wait_for(lambda: d.find_element(By.ID, "home-new").is_displayed(), 15, "the new-session note")
    d.get(f"{tablet.base_url}/sessions/{sid}")
    start = wait_for(lambda: d.find_elements(By.ID, "start"), 15, "the session page")[0]
    assert start.is_displayed() and start.text == "Start"
    assert not d.find_element(By.ID, "resend").is_displayed()  # nothing to resend yet
    assert not d.find_element(By.ID, "stop").is_displayed()
    repo.transition(sid, "capturing")
    wait_for(lambda: not start.is_displayed(), 15, "Start to go once the take runs")
    assert d.find_element(By.ID, "stop").is_displayed()  # the take can be ended early
    repo.fail(sid, "cam0 stopped sending frames")  # while the page is open
    wait_for(
        lambda: start.is_displayed() and start.text == "Start again", 15, "Start again to appear"
    )
    assert not d.find_element(By.ID, "stop").is_displayed()
    form = d.find_element(By.ID, "start-form")
    assert form.get_attribute("action").endswith(f"/sessions/{sid}/again")
    assert "cam0 stopped sending frames" in d.find_element(By.ID, "failure").text
