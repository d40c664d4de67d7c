"""Start on the tablet: which cameras film the take, and what staff are told about the rest.

A camera left in the session that never films would hold it in "capturing" until its
upload deadline (30 minutes by default), with nothing on the tablet to say why.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import transport_helpers as th

from cloud_trainer.config import SqliteDatabase
from cloud_trainer.front_desk import Conflict, FrontDesk, NoCameras
from cloud_trainer.repository import Repository


def agent(camera: str, *, online: bool = True, state: str = "idle", session: str = "") -> dict:
    return {"camera_id": camera, "online": online, "state": state, "session_id": session}


class Booth:
    """The control plane: the agents it knows, and how each answers a StartTake."""

    def __init__(self, agents: list[dict], refuse: dict[str, str] | None = None):
        self.agents, self.refuse = agents, refuse or {}
        self.started: list[str] = []

    def online_agents(self, booth_id: str) -> list[dict]:
        return self.agents

    async def start_take(self, booth_id: str, session_id: str, duration_s: float) -> list[dict]:
        answers = []
        for a in self.agents:
            if not a["online"]:
                continue  # an offline agent gets no command
            refused = a["camera_id"] in self.refuse or a["state"] == "capturing"
            if not refused:
                self.started.append(a["camera_id"])
            answers.append(
                {
                    "camera_id": a["camera_id"],
                    "delivered": True,
                    "acked": True,
                    "state": "capturing",
                    "session_id": a["session_id"] if refused else session_id,
                    "error": self.refuse.get(a["camera_id"], ""),
                }
            )
        return answers

    async def stop_take(self, booth_id: str, session_id: str) -> list[str]:
        self.stopped = session_id
        return sorted(a["camera_id"] for a in self.agents if a["online"])


@pytest.fixture
def repo(tmp_path: Path):
    r = Repository.from_config(SqliteDatabase(path=tmp_path / "booth.db"))
    yield r
    r.close()


def desk(repo: Repository, booth: Booth) -> FrontDesk:
    return FrontDesk(
        repo, booth_id=th.BOOTH, take_s=5.0, cameras=lambda: ["cam0", "cam1"], control=booth
    )


async def test_an_offline_camera_is_left_out_of_the_take_and_staff_are_told(repo):
    booth = Booth([agent("cam0"), agent("cam1", online=False, state="offline")])
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    await desk(repo, booth).start(sid)
    s = repo.get_session(sid)
    assert s["state"] == "capturing" and s["cameras"] == ["cam0"]
    assert s["progress"]["message"] == "not filming: cam1 is offline"
    assert "not filming: cam1 is offline" in repo.session_events(sid)[-1]["detail"]


async def test_a_camera_still_filming_another_session_is_left_out(repo):
    booth = Booth([agent("cam0"), agent("cam1", state="capturing", session="s-before")])
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    await desk(repo, booth).start(sid)
    assert repo.get_session(sid)["cameras"] == ["cam0"]
    assert booth.started == ["cam0"]


async def test_a_camera_that_refuses_the_start_is_dropped_from_the_take(repo):
    booth = Booth([agent("cam0"), agent("cam1")], refuse={"cam1": "camera /dev/video0 is gone"})
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    await desk(repo, booth).start(sid)
    s = repo.get_session(sid)
    assert s["cameras"] == ["cam0"]
    assert "cam1 refused the start: camera /dev/video0 is gone" in s["progress"]["message"]


async def test_when_no_camera_starts_the_session_fails_with_the_reasons(repo):
    booth = Booth([agent("cam0")], refuse={"cam0": "camera /dev/video0 is gone"})
    sid = th.new_session(repo, cameras=("cam0",))
    with pytest.raises(NoCameras, match="cam0 refused the start"):
        await desk(repo, booth).start(sid)
    s = repo.get_session(sid)
    assert s["state"] == "failed" and "camera /dev/video0 is gone" in s["failure_reason"]


async def test_start_with_every_camera_offline_is_refused_and_says_which(repo):
    booth = Booth([agent("cam0", online=False, state="offline")])
    sid = th.new_session(repo, cameras=("cam0",))
    with pytest.raises(NoCameras, match="cam0 is offline"):
        await desk(repo, booth).start(sid)
    assert repo.get_session(sid)["state"] == "created"  # Start can be pressed again


class SlowBooth(Booth):
    """Cameras answer a start once they film, after the countdown: here, when released."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def start_take(self, booth_id: str, session_id: str, duration_s: float) -> list[dict]:
        await self.release.wait()
        return await super().start_take(booth_id, session_id, duration_s)


async def test_the_tablets_start_returns_before_the_cameras_answer(repo):
    """The tablet must load in time to show the countdown, which the answers come after."""
    booth = SlowBooth([agent("cam0"), agent("cam1")], refuse={"cam1": "no camera"})
    front = desk(repo, booth)
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    assert await asyncio.wait_for(front.start(sid, wait=False), 5) == []
    assert repo.get_session(sid)["state"] == "capturing"
    booth.release.set()
    await asyncio.wait_for(asyncio.gather(*front._starting), 5)
    assert repo.get_session(sid)["cameras"] == ["cam0"]  # the refusal still counts


async def test_a_background_start_that_fails_fails_the_session_and_nothing_else(repo):
    booth = SlowBooth([agent("cam0")], refuse={"cam0": "no camera"})
    front = desk(repo, booth)
    sid = th.new_session(repo, cameras=("cam0",))
    await front.start(sid, wait=False)
    booth.release.set()
    await asyncio.wait_for(asyncio.gather(*front._starting), 5)  # raises nothing
    s = repo.get_session(sid)
    assert s["state"] == "failed" and "cam0 refused the start: no camera" in s["failure_reason"]


async def test_staff_can_end_a_running_take_early_and_only_a_running_one(repo):
    booth = Booth([agent("cam0"), agent("cam1", online=False, state="offline")])
    front = desk(repo, booth)
    sid = th.new_session(repo, cameras=("cam0",))
    with pytest.raises(Conflict, match="no take to stop: the session is created"):
        await front.stop(sid)
    await front.start(sid)
    assert await front.stop(sid) == ["cam0"] and booth.stopped == sid


class StuckBusyBooth(Booth):
    """A camera still filming another take does not answer this start in time."""

    async def start_take(self, booth_id, session_id, duration_s):
        answers = await super().start_take(booth_id, session_id, duration_s)
        for a in answers:
            if a["camera_id"] == "cam1":
                a.update(acked=False, error="no report within 5 s")
        return answers


async def test_a_busy_camera_that_does_not_answer_is_not_in_the_take(repo):
    booth = StuckBusyBooth([agent("cam0"), agent("cam1", state="capturing", session="s-before")])
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    await desk(repo, booth).start(sid)
    assert repo.get_session(sid)["cameras"] == ["cam0"]


async def test_the_tablet_says_a_busy_camera_sat_out_because_it_films_another_session(repo):
    booth = Booth([agent("cam0"), agent("cam1", state="capturing", session="s-before")])
    sid = th.new_session(repo, cameras=("cam0", "cam1"))
    await desk(repo, booth).start(sid)
    s = repo.get_session(sid)
    assert "cam1 is still filming another session" in s["progress"]["message"]
