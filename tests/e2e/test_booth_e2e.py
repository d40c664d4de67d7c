"""The whole booth, end to end, the way people use it: real processes, a real browser.

``booth serve``, ``booth worker`` and two ``booth agent`` processes run with
synthetic cameras at tiny sizes and a tiny training budget. Staff use the
tablet pages in headless Chromium (Debian's chromium + chromium-driver); the
attendee opens the link, the video plays, and "delete my data" kills the link.
Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from e2e_helpers import ARTIFACTS, wait_for

from cloud_trainer.demo import DemoBooth, DemoPlan

pytestmark = pytest.mark.timeout(900)


def tiny_plan(workdir: Path) -> DemoPlan:
    return DemoPlan(
        workdir=workdir,
        cameras=2,
        take_s=2.0,
        fps=30.0,
        size=(160, 120),
        train_size_px=32,
        budget_s=25.0,
        batch=4,
        base_budget_s=15.0,
        base_attendees="2..3",
        countdown_s=1,
        segment_s=1.0,
        timeout_s=420.0,
    )


@pytest.fixture(scope="module")
def booth(tmp_path_factory):
    plan = tiny_plan(tmp_path_factory.mktemp("e2e") / "demo")
    b = DemoBooth(plan)
    b.write_config(b.base_checkpoint(progress=False))
    b.staff = b.start()
    b.wait_for_agents(b.staff)
    yield b
    b.stop()


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_staff_and_attendee_flow_in_a_real_browser(booth, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(f"{booth.base_url}/login")
    d.find_element(By.ID, "username").send_keys("staff")
    d.find_element(By.ID, "password").send_keys(booth.password)
    d.find_element(By.ID, "login").click()
    wait_for(lambda: d.find_elements(By.ID, "new-session"), 15, "the tablet home page")
    wait_for(lambda: "2 online" in d.page_source, 30, "both cameras online on the tablet")
    shot(d, "01-tablet-home")

    # Without consent nothing is created.
    d.find_element(By.ID, "name").send_keys("Grace Hopper")
    d.find_element(By.ID, "email").send_keys("grace@example.org")
    d.find_element(By.ID, "create").click()
    err = wait_for(
        lambda: (e := d.find_elements(By.ID, "error")) and e[0].text, 15, "the consent error"
    )
    assert "consent" in err
    assert booth.staff.get("/api/sessions") == []
    shot(d, "02-no-consent-refused")

    # With consent: the session page, then Start.
    d.find_element(By.ID, "consent").click()
    d.find_element(By.ID, "create").click()
    wait_for(lambda: d.find_elements(By.ID, "start"), 15, "the session page")
    d.find_element(By.ID, "start").click()
    seen = set()

    def advanced():
        state = d.find_element(By.ID, "state").text
        seen.add(state)
        if state == "training" and "training" not in {s.split(":")[0] for s in seen if ":" in s}:
            seen.add("training:shot")
            shot(d, "04-training")
        return state in ("delivered", "failed")

    wait_for(
        lambda: d.find_element(By.ID, "state").text != "created", 20, "the state to leave created"
    )
    shot(d, "03-capturing")
    wait_for(advanced, 420, "the session to be delivered")
    shot(d, "05-delivered")
    assert d.find_element(By.ID, "state").text == "delivered", d.find_element(
        By.ID, "failure-reason"
    ).text
    assert len(seen & {"capturing", "uploaded", "training", "rendering", "delivered"}) >= 3, seen

    # Staff watch it behind their login; the attendee's link is only in their email.
    watch = wait_for(
        lambda: d.find_elements(By.CSS_SELECTOR, "#link a"), 10, "the video on the tablet"
    )[0].get_attribute("href")
    assert watch.endswith("/video.mp4") and "/v/" not in watch
    assert booth.staff.http.get(watch).status_code == 200
    assert httpx.get(watch, follow_redirects=False).status_code in (303, 401)  # not public
    link = wait_for(lambda: booth.emailed_link("grace@example.org"), 60, "the email")
    assert "/v/" in link
    assert_metrics_moved(booth)  # frames ingested, training stages timed, the email sent

    # The attendee's page plays the H.264 video.
    d.get(link)
    wait_for(
        lambda: d.execute_script(
            "const v = document.getElementById('video'); return v && v.readyState >= 2 && v.duration > 0;"
        ),
        30,
        "the video to be playable",
    )
    shot(d, "06-attendee-video")

    # Delete my data: the link is dead afterwards.
    d.find_element(By.ID, "confirm").click()
    d.find_element(By.ID, "delete-my-data").click()
    wait_for(lambda: "deleted" in d.page_source, 15, "the deletion confirmation")
    shot(d, "07-deleted")
    assert httpx.get(link).status_code == 410
    assert httpx.get(link + "/video.mp4").status_code == 410


def assert_metrics_moved(booth) -> None:
    text = wait_for(
        lambda: (
            (t := httpx.get(f"{booth.base_url}/metrics").text)
            and 'booth_emails_total{state="sent"}' in t
            and t
        ),
        30,
        "the email to be counted as sent",
    )
    frames = [line for line in text.splitlines() if line.startswith("booth_frames_ingested_total{")]
    assert frames and all(float(line.rsplit(" ", 1)[1]) > 0 for line in frames), text[:2000]
    assert "booth_job_stage_seconds_total" in text
