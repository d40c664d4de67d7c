"""The real browser the tablet tests drive: Debian's headless chromium via chromium-driver."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest
import staff_app
import uvicorn
from e2e_helpers import ARTIFACTS, CapturingCamera, wait_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (make test installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-quic",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1024,768",
    ):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="booth-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    ARTIFACTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def tablet(tmp_path: Path):
    """The web app, served for real by uvicorn on loopback, with one camera mid-take."""
    made = staff_app.build_app(staff_app.staff_settings(tmp_path))
    made.app = staff_app.create_app(
        made.settings,
        repo=made.repo,
        store=made.store,
        references=lambda: [],
        deliverer=None,
        control=CapturingCamera(),
    )
    # Bound here and handed over: no free port that something else could take meanwhile.
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(made.app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the web app to listen", poll_s=0.05)
    made.port = sock.getsockname()[1]
    made.base_url = f"http://127.0.0.1:{made.port}"
    yield made
    server.should_exit = True
    thread.join(10)
    sock.close()
    made.repo.close()
