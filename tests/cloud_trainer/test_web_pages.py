"""What the pages' HTML itself promises people with screen readers, and the attendee page's
words agreeing with the attendee's email. How the pages behave and look in a browser is
in tests/e2e/test_page_access.py."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import transport_helpers as th
from staff_app import StaffApp, build_app, delivered_session, log_in, staff_settings

from cloud_trainer import deliver, links


@pytest.fixture
def booth(tmp_path) -> Iterator[StaffApp]:
    settings = staff_settings(tmp_path)
    # Not UTC: the page must give the booth's zone, as the email does.
    settings.booth.timezone = "Europe/Berlin"
    built = build_app(settings)
    yield built
    built.repo.close()


def tag(html: str, element_id: str) -> str:
    """The opening tag of the element with ``element_id``."""
    found = re.search(rf'<[a-z]+ [^>]*id="{element_id}"[^>]*>', html)
    assert found, f"no #{element_id} in the page"
    return found.group(0)


def test_the_attendee_page_says_when_the_link_ends_as_the_email_does(client, booth):
    """A date alone ("Here until 27 December") reads as "all of that day"; the email gives
    the time and zone, and the page must not promise more than it."""
    _, token = delivered_session(booth.repo, booth.store)
    ends = links.visit(booth.repo, token).link_expires_at
    email = deliver.compose(
        name="Ada",
        booth="b",
        dance="d",
        base_url="http://x",
        token=token,
        expires_at=ends,
        expiry_days=30,
        tz="Europe/Berlin",
    )
    page = client.get(f"/v/{token}").text
    expiry = re.search(r'<p class="muted" id="expiry">(.*?)</p>', page, re.S).group(1)
    said = re.search(r"until (\d{1,2} \w+ \d{4}, \d\d:\d\d \(Europe/Berlin\))", expiry)
    assert said, expiry
    assert f"until {said.group(1)}." in email["body_text"]


def test_the_attendee_video_has_a_name(client, booth):
    _, token = delivered_session(booth.repo, booth.store)
    assert 'aria-label="Your dance video"' in tag(client.get(f"/v/{token}").text, "video")


def test_a_failure_is_an_alert_and_the_resend_field_has_a_visible_label(client, booth):
    log_in(client)
    sid = th.new_session(booth.repo, booth_id=booth.settings.booth.id)
    booth.repo.fail(sid, "cam0 stopped sending frames")
    page = client.get(f"/sessions/{sid}").text
    assert 'role="alert"' in tag(page, "failure")
    label = re.search(r'<label for="resend-email"[^>]*>([^<]+)</label>', page)
    assert label and "sr-only" not in label.group(0), label
    assert label.group(1) == "Corrected email (optional)"
