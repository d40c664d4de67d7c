"""The tablet's camera panel in a real browser: warnings, the live pose, agent text as text.

The web app runs for real (uvicorn on a free port) with a control plane that
reports one capturing camera, as the registry would.
"""

from __future__ import annotations

import pytest
import transport_helpers as th
from e2e_helpers import HOSTILE, POSE, log_in, wait_for

from edge_agent.skeleton import LIMB_INDEX


def test_the_camera_panel_draws_the_live_pose_and_shows_agent_text_as_text(tablet, browser):
    from selenium.webdriver.common.by import By

    sid = th.new_session(tablet.repo, booth_id=tablet.settings.booth.id)
    d = browser
    log_in(d, tablet.base_url)
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
    log_in(d, tablet.base_url)
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
