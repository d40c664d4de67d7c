"""The pages in a real browser for people who do not see them, zoom them or tap them.

- Live regions (what screen readers say by themselves) are written when their words
  change, not on every poll: a status said every second is noise, and an alert
  written every second is an alarm that never stops.
- White text on the buttons reaches 4.5:1, and form fields' borders 3:1.
- At 200% zoom (a 1024 px tablet is 512 CSS px wide, a 360 px phone 180) nothing runs
  off the side; links that are tapped are 44 px targets.
"""

from __future__ import annotations

import contextlib
import time

import staff_app
import transport_helpers as th
from e2e_helpers import log_in, wait_for

from cloud_trainer import deliver

# Every write to a live region (text, or its role set again), as the browser sees it:
# "id: its text". Parts screen readers skip (aria-hidden) are not spoken, so not counted.
WATCH_LIVE = """
window.liveWrites = [];
new MutationObserver((records) => {
  for (const r of records) {
    const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    const live = el.closest('[role=status],[role=alert],[role=timer],[aria-live]');
    if (!live || el.closest('[aria-hidden=true]')) continue;
    const spoken = live.cloneNode(true);
    spoken.querySelectorAll('[aria-hidden=true]').forEach((n) => n.remove());
    window.liveWrites.push(`${live.id}: ${spoken.textContent}`);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true,
                           attributes: true, attributeFilter: ['role']});
// The page's polls of its session, counted.
window.polls = 0;
const fetch0 = window.fetch;
window.fetch = (url, ...rest) => {
  if (String(url).startsWith('/api/sessions/')) window.polls += 1;
  return fetch0(url, ...rest);
};
"""

# WCAG contrast of an element's text against what is behind it (its own background, or
# the nearest ancestor's that is not transparent).
CONTRAST = """
const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
const lum = (c) => {
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
};
const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
const behind = (el) => {
  for (; el; el = el.parentElement) {
    const c = rgb(getComputedStyle(el).backgroundColor);
    if (c.length < 4 || c[3] > 0) return c;
  }
  return [255, 255, 255];
};
"""


@contextlib.contextmanager
def viewport(d, width: int, height: int = 800, zoom: float = 2):
    """The page at ``width`` CSS px, as a screen ``width * zoom`` px wide zoomed to ``zoom``."""
    d.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": zoom, "mobile": False},
    )
    try:
        yield
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def polls_pass(d, n: int) -> None:
    """Wait until the page has polled its session ``n`` more times (and drawn the last)."""
    start = d.execute_script("return window.polls")
    wait_for(lambda: d.execute_script("return window.polls") >= start + n + 1, 15, f"{n} polls")


def test_unchanged_words_are_not_said_again_on_every_poll(tablet, browser):
    """The email's state (pending here) comes with every 1 s poll: the region keeps its
    text node, and no live region is written while nothing changes."""
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    for state in ("capturing", "uploaded", "training", "rendering"):
        repo.transition(sid, state)
    d = browser
    log_in(d, tablet.base_url)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#agents svg.pose"), 15, "a first poll")
    d.execute_script(WATCH_LIVE)
    deliver.Deliverer(repo, tablet.store, tablet.settings).deliver(
        sid, video_key=f"sessions/{sid}/video/final.mp4", poster_key=f"sessions/{sid}/p.jpg"
    )
    state = d.find_element(By.ID, "email-state")
    wait_for(lambda: "pending" in state.text, 15, "the email's state")
    assert state.get_attribute("role") == "status"
    # The link that appears with the video is a 44 px target, like the one the page has.
    watch = d.find_element(By.LINK_TEXT, "Watch the video")
    assert watch.rect["height"] >= 44 and watch.rect["width"] >= 44, watch.rect
    said = d.execute_script("return window.liveWrites.slice()")
    assert said == ["announce: Session delivered.", f"email-state: {state.text}"], said

    d.execute_script("document.getElementById('email-state').firstChild.seen = true")
    polls_pass(d, 2)
    assert d.execute_script("return document.getElementById('email-state').firstChild.seen")
    assert d.execute_script("return window.liveWrites") == said


def test_a_change_of_state_is_said_once_and_a_failure_is_alerted(tablet, browser):
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    d = browser
    log_in(d, tablet.base_url)
    d.get(f"{tablet.base_url}/sessions/{sid}")
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#agents svg.pose"), 15, "a first poll")
    d.execute_script(WATCH_LIVE)
    announce = d.find_element(By.ID, "announce")
    assert announce.get_attribute("role") == "status"
    assert announce.get_attribute("textContent") == ""  # the page shows the state it opened in

    def said(text: str) -> None:
        wait_for(lambda: announce.get_attribute("textContent") == text, 15, repr(text))

    repo.transition(sid, "capturing")
    said("Session capturing.")
    repo.set_progress(sid, stage="loading", step=0, total_steps=10)
    repo.transition(sid, "uploaded")  # a poll may catch it: then it is said too
    repo.transition(sid, "training")
    said("Session training: loading.")
    # The steps, ETA and loss move on every poll: shown, not said.
    repo.set_progress(sid, stage="training", step=1, eta_s=30, loss=0.5)
    said("Session training.")
    for step in (2, 3):
        repo.set_progress(sid, step=step, eta_s=30 - step, loss=0.5 / step)
        polls_pass(d, 1)
    repo.fail(sid, "cam0 stopped sending frames")
    said("Session failed.")
    failure = d.find_element(By.ID, "failure")
    assert failure.get_attribute("role") == "alert" and failure.is_displayed()
    polls_pass(d, 2)
    writes = d.execute_script("return window.liveWrites")
    assert [w for w in writes if w != "announce: Session uploaded."] == [
        "announce: Session capturing.",
        "announce: Session training: loading.",
        "announce: Session training.",
        "failure: Failed: cam0 stopped sending frames",
        "announce: Session failed.",
    ], writes
    assert writes.count("announce: Session uploaded.") <= 1, writes


def test_the_countdown_says_each_second_once_and_fits_a_zoomed_tablet(tablet, browser):
    """3, 2, 1, Dance!: each said once (the page ticks every 200 ms), the take's seconds
    left only shown; and "Dance!" fits 512 CSS px (a 1024 px tablet at 200%)."""
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    repo.update_session(sid, take_s=3.0)
    d = browser
    log_in(d, tablet.base_url)
    with viewport(d, 512):
        d.get(f"{tablet.base_url}/sessions/{sid}")
        wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#agents svg.pose"), 15, "a poll")
        d.execute_script(WATCH_LIVE)
        repo.set_progress(sid, capture_at=time.time() + 2.5, stage="capturing")
        repo.transition(sid, "capturing")
        countdown = d.find_element(By.ID, "countdown")
        wait_for(lambda: countdown.text.startswith("Dance! "), 15, "the take")
        assert d.execute_script(
            "const c = arguments[0]; return c.scrollWidth <= c.clientWidth", countdown
        )
        wait_for(lambda: not countdown.is_displayed(), 15, "the take to end")
    writes = d.execute_script("return window.liveWrites")
    said = [w.removeprefix("countdown: ") for w in writes if w.startswith("countdown: ")]
    assert said[-1] == "Dance!" and set(said) <= {"3", "2", "1", "Dance!"}, said
    assert all(a != b for a, b in zip(said, said[1:], strict=False)), said


def test_white_text_on_buttons_and_field_borders_can_be_seen(tablet, browser):
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    repo.fail(sid, "cam0 stopped sending frames")
    d = browser
    log_in(d, tablet.base_url)
    check = (
        CONTRAST
        + """
      return [...document.querySelectorAll('button, a.button')]
        .filter((b) => b.offsetParent && !b.disabled)
        .map((b) => [b.textContent.trim(), ratio(rgb(getComputedStyle(b).color), behind(b))]);
    """
    )
    home = dict(d.execute_script(check))
    assert home.keys() >= {"Continue", "Log out staff"}
    field = d.execute_script(
        CONTRAST + "const f = document.getElementById('name');"
        "return ratio(rgb(getComputedStyle(f).borderTopColor), behind(f.parentElement));"
    )
    assert field >= 3, field
    d.get(f"{tablet.base_url}/sessions/{sid}")
    wait_for(lambda: d.find_element(By.ID, "start").is_displayed(), 15, "Start again")
    page = dict(d.execute_script(check))
    assert page.keys() >= {"Start again", "Delete", "← All sessions"}
    low = {text: round(r, 2) for text, r in {**home, **page}.items() if r < 4.5}
    assert not low, low


def test_todays_table_wraps_names_only_and_its_links_are_targets(tablet, browser):
    from selenium.webdriver.common.by import By

    tablet.repo.create_session(
        booth_id=tablet.settings.booth.id,
        name="Maximiliane Wolfeschlegelsteinhausenbergerdorff",
        email="max@example.org",
        consent=True,
        reference_name="ref",
        take_s=1.0,
        cameras=["cam0"],
    )
    d = browser
    log_in(d, tablet.base_url)
    with viewport(d, 360, zoom=1):
        d.refresh()
        row = wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "tr[data-sid]"), 15, "a row")[0]
        cells = row.find_elements(By.TAG_NAME, "td")
        wrap = [c.value_of_css_property("white-space") for c in cells]
        assert wrap == ["nowrap", "normal", "nowrap", "nowrap"], wrap
        assert cells[1].value_of_css_property("overflow-wrap") == "anywhere"
        table = d.find_element(By.TAG_NAME, "table")
        card = table.find_element(By.XPATH, "..")
        inside = (
            card.rect["x"]
            + card.rect["width"]
            - float(card.value_of_css_property("padding-right")[:-2])
        )
        assert table.rect["x"] + table.rect["width"] <= inside, (table.rect, card.rect)
        opened = row.find_element(By.LINK_TEXT, "Open")
        assert opened.rect["height"] >= 44 and opened.rect["width"] >= 44, opened.rect


def test_a_long_failure_and_the_back_link_fit_a_zoomed_tablet(tablet, browser):
    """Failure reasons carry paths and URLs: one long word must wrap, not run off."""
    from selenium.webdriver.common.by import By

    repo = tablet.repo
    sid = th.new_session(repo, booth_id=tablet.settings.booth.id)
    repo.fail(sid, "upload-failed:gs://booth-frames/sessions/" + "0123456789abcdef" * 6)
    d = browser
    log_in(d, tablet.base_url)
    with viewport(d, 512):
        d.get(f"{tablet.base_url}/sessions/{sid}")
        failure = d.find_element(By.ID, "failure")
        assert d.execute_script(
            "const f = arguments[0]; return f.scrollWidth <= f.clientWidth", failure
        )
        back = d.find_element(By.LINK_TEXT, "← All sessions")
        assert back.rect["height"] >= 44 and back.rect["width"] >= 44, back.rect


def test_delete_my_data_fits_a_phone_at_200_percent(tablet, browser):
    """A 360 px phone zoomed to 200% is 180 CSS px wide: the confirmation box and its
    words stay inside the page."""
    from selenium.webdriver.common.by import By

    _, token = staff_app.delivered_session(tablet.repo, tablet.store)
    d = browser
    with viewport(d, 180):
        d.get(f"{tablet.base_url}/v/{token}")
        check = d.find_element(By.CSS_SELECTOR, "label.check")
        words = check.find_element(By.TAG_NAME, "span")
        assert words.rect["x"] + words.rect["width"] <= check.rect["x"] + check.rect["width"]
        assert d.execute_script(
            "const page = document.documentElement; return page.scrollWidth <= page.clientWidth"
        )
        box = d.find_element(By.ID, "confirm")
        assert box.rect["width"] >= 24  # still a box to tick
