"""The tablet's pages in a real browser when things go wrong around them.

- A server that accepts connections and never answers: the pages say so and
  disable the buttons whose press would only reach the browser's error page,
  then recover by themselves when it answers again.
- A take whose camera never finished uploading: the session page names the
  camera and offers to go on with the cameras that did.
"""

from __future__ import annotations

import re
import time

import pytest
import transport_helpers as th
from e2e_helpers import log_in, wait_for


@pytest.fixture
def stalling(tablet):
    """The web app behind a link that can stop answering without hanging up (``cut``)."""
    proxy = th.LinkProxy()
    proxy.set_upstream(tablet.port)
    yield proxy
    proxy.close()


def test_a_server_that_stops_answering_shows_offline_and_disables_the_buttons(
    tablet, stalling, browser
):
    from selenium.webdriver.common.by import By

    base = f"http://127.0.0.1:{stalling.port}"
    sid = th.new_session(tablet.repo, booth_id=tablet.settings.booth.id)
    d = browser
    log_in(d, base)
    d.get(f"{base}/sessions/{sid}")
    start = wait_for(lambda: d.find_elements(By.ID, "start"), 15, "the session page")[0]
    offline = d.find_element(By.ID, "offline")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#agents svg.pose"), 15, "a first poll")
    assert start.is_enabled() and not offline.is_displayed()

    stalling.cut()  # connections still open: only the 4 s timeout can tell
    wait_for(offline.is_displayed, 40, "the offline warning on the session page")
    assert not start.is_enabled()
    stalling.restore()
    wait_for(lambda: not offline.is_displayed(), 30, "the session page to come back")
    assert start.is_enabled()

    d.get(base + "/")
    create = wait_for(lambda: d.find_elements(By.ID, "create"), 15, "the home page")[0]
    agents = d.find_element(By.ID, "home-agents")
    offline = d.find_element(By.ID, "offline")
    assert create.is_enabled()
    stalling.cut()
    wait_for(offline.is_displayed, 40, "the offline warning on the home page")
    assert not create.is_enabled()
    assert "stale" in agents.get_attribute("class").split()  # the cameras grey out
    stalling.restore()
    wait_for(lambda: not offline.is_displayed(), 30, "the home page to come back")
    assert create.is_enabled() and "stale" not in agents.get_attribute("class").split()


def test_a_missing_upload_is_named_and_staff_can_go_on_without_it(tablet, browser):
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, ("cam0", "cam1"), booth_id=tablet.settings.booth.id)
    repo.transition(sid, "capturing")
    for cam in ("cam0", "cam1"):
        repo.open_take(sid, cam, fps=120.0)
    # The take (1 s) started a minute ago; cam0's upload is in, cam1's is not.
    started = time.time() - 60
    repo.update_session(sid, capture_started_at=started)
    repo.set_progress(sid, capture_at=started, stage="capturing")
    repo.mark_take_uploaded(sid, "cam0")

    d = browser
    log_in(d, tablet.base_url)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    wait = wait_for(
        lambda: [e for e in d.find_elements(By.ID, "upload-wait") if e.is_displayed()],
        15,
        "the upload-wait note",
    )[0]
    text = wait.text
    assert "Waiting for cam1 to finish uploading" in text
    assert "go on with cam0" in text and "gives up at" in text
    # The booth's 24-hour clock, as every other time on the tablet (not the tablet's locale).
    assert re.search(r"gives up at \d\d:\d\d\.", text), text
    # The take is over: Stop would do nothing, so it is not offered.
    assert not d.find_element(By.ID, "stop-form").is_displayed()
    d.find_element(By.ID, "go-on").click()
    wait_for(lambda: d.find_element(By.ID, "state").text == "uploaded", 15, "the session to go on")
    assert not d.find_element(By.ID, "upload-wait").is_displayed()
    s = repo.get_session(sid)
    assert (s["state"], s["cameras"]) == ("uploaded", ["cam0"])


def test_back_to_the_home_page_after_continue_gives_a_fresh_form(tablet, browser):
    """Chromium brings the home page back from its back/forward cache: as it was left,
    the last attendee's name and consent tick in it and its button stuck on "Creating…"
    (the form counted as sent). Staff must get a blank form that works."""
    from selenium.webdriver.common.by import By

    tablet.app.state.services.references = lambda: [
        {"name": "synthetic:warmup", "title": "Warmup", "thumbnail_url": None, "flagged": 0}
    ]
    d = browser
    log_in(d, tablet.base_url)
    consent = d.find_element(By.ID, "consent")
    # The consent box stays a touch target beside its long text.
    assert consent.rect["width"] >= 28 and consent.rect["height"] >= 28, consent.rect
    d.find_element(By.ID, "name").send_keys("Ada")
    d.find_element(By.ID, "email").send_keys("ada@example.org")
    consent.click()
    d.find_element(By.ID, "create").click()
    wait_for(lambda: "/sessions/" in d.current_url, 15, "the new session's page")
    assert len(tablet.repo.list_sessions()) == 1

    d.back()
    wait_for(lambda: d.find_elements(By.ID, "new-session"), 15, "the home page again")
    create = d.find_element(By.ID, "create")
    wait_for(create.is_enabled, 10, "Continue to be enabled")
    assert create.text == "Continue"
    assert d.find_element(By.ID, "name").get_attribute("value") == ""
    assert not d.find_element(By.ID, "consent").is_selected()
    assert d.execute_script("return document.getElementById('new-session').dataset.sent") is None


def test_an_email_the_relay_refuses_is_not_called_a_bad_address(tablet, browser, tmp_path):
    """The relay refuses the booth (not the attendee's address): the session page says
    the email is being retried and why, and does not ask staff to correct the address."""
    from selenium.webdriver.common.by import By
    from smtp_capture import SmtpServer

    from cloud_trainer import deliver
    from cloud_trainer.config import SmtpMail

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    for state in ("capturing", "uploaded", "training", "rendering"):
        repo.transition(sid, state)
    deliver.Deliverer(repo, tablet.store, tablet.settings).deliver(
        sid, video_key=f"sessions/{sid}/video/final.mp4", poster_key=f"sessions/{sid}/p.jpg"
    )
    server = SmtpServer(replies={"RCPT": "554 5.7.1 Relay access denied"}).start()
    try:
        cfg = SmtpMail(port=server.port, sent_log=tmp_path / "sent.log", timeout_s=5)
        assert deliver.OutboxSender(repo, cfg).run_once().retried == 1
    finally:
        server.stop()

    d = browser
    log_in(d, tablet.base_url)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    state = wait_for(
        lambda: [e for e in d.find_elements(By.ID, "email-state") if "retrying" in e.text],
        15,
        "the email's state",
    )[0]
    assert "Relay access denied" in state.text
    assert "Correct the address" not in state.text


def test_a_mistyped_email_domain_is_caught_and_fixed_with_one_tap(tablet, browser):
    """'Did you mean ana@gmail.com?': the tapped button's answer must reach the server,
    though the page disables every button of a form as it is sent (once.js)."""
    from selenium.webdriver.common.by import By

    tablet.app.state.services.references = lambda: [
        {"name": "synthetic:warmup", "title": "Warmup", "thumbnail_url": None, "flagged": 0}
    ]
    d = browser
    log_in(d, tablet.base_url)
    d.find_element(By.ID, "name").send_keys("Ana")
    d.find_element(By.ID, "email").send_keys("ana@gmial.com")
    d.find_element(By.ID, "consent").click()
    d.find_element(By.ID, "create").click()
    wait_for(lambda: d.find_elements(By.ID, "email-suggestion"), 15, "the question")
    assert "Did you mean ana@gmail.com?" in d.find_element(By.ID, "email-suggestion").text
    assert tablet.repo.list_sessions() == []
    # What staff typed is still there, consent included: one tap answers.
    assert d.find_element(By.ID, "name").get_attribute("value") == "Ana"
    assert d.find_element(By.ID, "consent").is_selected()
    d.find_element(By.ID, "use-suggestion").click()
    wait_for(lambda: "/sessions/" in d.current_url, 15, "the new session's page")
    assert [s["email"] for s in tablet.repo.list_sessions()] == ["ana@gmail.com"]


def test_enter_after_the_question_keeps_the_address_as_typed(tablet, browser):
    """The tablet keyboard's Go key submits with the form's first button: it must keep
    what staff typed, never switch the attendee's link to another mailbox."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    tablet.app.state.services.references = lambda: [
        {"name": "synthetic:warmup", "title": "Warmup", "thumbnail_url": None, "flagged": 0}
    ]
    d = browser
    log_in(d, tablet.base_url)
    d.find_element(By.ID, "name").send_keys("Ana")
    d.find_element(By.ID, "consent").click()
    d.find_element(By.ID, "email").send_keys("ana@gmial.com" + Keys.ENTER)
    wait_for(lambda: d.find_elements(By.ID, "email-suggestion"), 15, "the question")
    d.find_element(By.ID, "email").send_keys(Keys.ENTER)
    wait_for(lambda: "/sessions/" in d.current_url, 15, "the new session's page")
    assert [s["email"] for s in tablet.repo.list_sessions()] == ["ana@gmial.com"]


def test_a_trainer_gone_quiet_is_said_instead_of_a_frozen_time_left(tablet, browser):
    """A worker killed mid-job left its last 'step 120 · about 12 min left' on the page
    for as long as the job sat there."""
    from selenium.webdriver.common.by import By
    from sqlalchemy import update

    from cloud_trainer.repository.schema import job_beats

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    for state in ("capturing", "uploaded", "training"):
        repo.transition(sid, state)
    job = repo.create_job(sid)
    repo.start_job(job, "w-dead")
    repo.set_progress(sid, stage="training", step=120, total_steps=400, eta_s=720)
    d = browser
    log_in(d, tablet.base_url)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    status = d.find_element(By.ID, "train-status")
    wait_for(lambda: "about 12 min" in status.text, 15, "the training line")
    with repo.engine.begin() as conn:
        conn.execute(update(job_beats).values(beat_at=time.time() - 300))
    wait_for(lambda: "No word from its trainer for 5 min" in status.text, 15, "the silence said")
    assert "left" not in status.text
