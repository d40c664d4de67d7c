"""Small, fast reproducers of bugs the chaos scenarios found (no booth processes needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import transport_helpers as th

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
