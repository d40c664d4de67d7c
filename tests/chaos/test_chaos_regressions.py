"""Small, fast reproducers of bugs the chaos scenarios found (no booth processes needed)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import pytest
import transport_helpers as th
from tmpfs import mounted_tmpfs

from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.stream import Streamer


async def _until(predicate, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_an_agent_killed_after_everything_it_spooled_was_acked_still_completes_its_take(
    tmp_path: Path,
):
    # Found by kill_agent_mid_take: acked segments are deleted, so the restarted agent's
    # spool held no frame of the take and sealed it at 0 frames. Ingest, which had
    # frames 0..N-1, refused that end of take (INVALID_ARGUMENT) on every retry, and the
    # session stayed in "capturing" for ever.
    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    store = create_blob_store(cfg.storage)
    sid = th.new_session(repo)
    sent = th.frames(30)

    def streamer(address: str) -> Streamer:
        uplink = th.uplink_config(address, tmp_path / "spool")
        return Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0")

    async with th.running_server(cfg, repo=repo, store=store) as srv:
        address = f"127.0.0.1:{srv.port}"
        first = streamer(address)
        await first.start()
        take = first.open_take(sid, width=64, height=48, fps=120)
        take.add_frames(sent)
        await _until(lambda: first.frames_acked >= len(sent) and not take.segments)
        await first.stop()  # the agent dies mid-take: the take never ends

        again = streamer(address)  # the restarted agent, on the same spool directory
        (recovered,) = again.spool.takes.values()
        assert recovered.meta.sealed_on_recovery
        await again.start()
        try:
            await again.wait_uploaded(sid, timeout_s=60)
        finally:
            await again.stop()
    th.assert_exactly_once(repo, store, sid, "cam0", sent)
    (row,) = repo.list_takes(sid)
    assert row["frame_count"] == len(sent) and row["state"] == "uploaded"


def test_the_video_is_rendered_from_a_camera_the_generator_was_trained_on():
    # Found by kill_agent_mid_take and full_spool_disk: the corpus skips a camera's take
    # it cannot use (no poses: its agent was killed, or a full disk refused them), but
    # the worker rendered from the first take regardless, and failed the session with
    # "the exported generator has no framing for camera cam0".
    import numpy as np

    from cloud_trainer.corpus import TakeData
    from cloud_trainer.worker import render_source
    from edge_agent.errors import BoothError

    class Generator:  # what render.load_generator returns, as far as framing goes
        def __init__(self, cameras: set[str]):
            self.cameras = cameras

        def framing(self, camera: str):
            return {"camera": camera} if camera in self.cameras else None

    poses = np.zeros((4, 23, 3), np.float32)
    skipped = TakeData("s-cam0", [b""] * 4, poses, camera="cam0")
    used = TakeData("s-cam1", [b""] * 4, poses, camera="cam1")
    take, framing = render_source([skipped, used], Generator({"cam1"}))
    assert take is used and framing == {"camera": "cam1"}
    with pytest.raises(BoothError, match="no framing for any camera"):
        render_source([skipped], Generator(set()))


class ListArchive:
    """Stands in for the take's recording (``RecordingArchive``: MP4 segments, poses.npz)."""

    def __init__(self, frames, poses):
        self.frames, self.poses = frames, poses

    def frames_from(self, session_id: str, camera_id: str, seq: int):
        return iter([f for f in self.frames if f.seq >= seq])

    def poses_from(self, session_id: str, camera_id: str, seq: int):
        return iter([p for p in self.poses if p[0] >= seq])


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root"
)
async def test_a_full_spool_disk_puts_the_take_behind_and_the_recording_fills_the_gap(
    tmp_path: Path,
):
    # Found by full_spool_disk: ENOSPC from the spool's write escaped add_frame, killed
    # the thread feeding the spool, then failed the take's end (spooling poses and
    # take.json); the take never ended and its session stayed in "capturing" for ever.
    # Then: poses a full disk refused were lost, and the take "too short to train on".
    from edge_agent.stream import _scan_with_offsets

    cfg = th.booth_config(tmp_path)
    repo = Repository.from_config(cfg.database)
    store = create_blob_store(cfg.storage)
    sid = th.new_session(repo)
    sent = th.frames(60)
    poses = [(f.seq, [[1.0, 2.0, 0.9]] * 23, False, False) for f in sent]
    with mounted_tmpfs(tmp_path / "spool", 256):
        spool_dir = tmp_path / "spool"
        filler = spool_dir / "filler.bin"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (256 * 1024))  # fills the disk up to what the kernel allows
        filler.write_bytes(filler.read_bytes()[: -16 * 1024])  # leave room for a few frames
        uplink = th.uplink_config("127.0.0.1:1", spool_dir)
        archive = ListArchive(sent, poses)
        streamer = Streamer(uplink, booth_id=th.BOOTH, camera_id="cam0", archive=archive)
        take = streamer.open_take(sid, width=64, height=48, fps=120)
        spooled = take.add_frames(sent)
        assert 0 < spooled < len(sent)
        assert streamer.status()["upload_behind"]
        for seg in take.segments:  # no torn record: every byte of a segment parses
            ends = [end for _, end in _scan_with_offsets(seg.path)]
            assert ends[-1] == seg.path.stat().st_size == seg.size
        for seq, keypoints, _, _ in poses:  # the take's end spools its poses: no room either
            take.add_pose(seq, keypoints)
        assert take.poses_behind
        take.end(len(sent))  # must not raise on a full disk
        filler.unlink()  # ops free the disk

        async with th.running_server(cfg, repo=repo, store=store) as srv:
            streamer.cfg = th.uplink_config(f"127.0.0.1:{srv.port}", spool_dir)
            await streamer.start()
            try:
                await streamer.wait_uploaded(sid, timeout_s=60)
            finally:
                await streamer.stop()
    th.assert_exactly_once(repo, store, sid, "cam0", sent)
    assert [p["seq"] for p in repo.pose_rows(sid, "cam0")] == [f.seq for f in sent]
