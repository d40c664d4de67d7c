"""The ingest server as a real subprocess (``booth ingest``), SIGKILLed in the middle of a take."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import transport_helpers as th

from cloud_trainer.queue import create_job_queue
from cloud_trainer.repository import Repository
from cloud_trainer.storage import create_blob_store
from edge_agent.stream import Streamer

pytestmark = pytest.mark.slow


class IngestProcess:
    """``booth ingest --config FILE`` in its own process group, output in a log file."""

    def __init__(self, config: Path, log_path: Path):
        self.config, self.log_path = config, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloud_trainer.cli", "ingest", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        log.close()

    async def wait_ready(self, port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 60)
            except TimeoutError:
                raise AssertionError(f"ingest did not start:\n{self.tail()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


async def _until(predicate, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_server_killed_mid_take_and_restarted_stores_every_frame_exactly_once(
    tmp_path: Path, get_free_port
):
    port = get_free_port()
    cfg = th.booth_config(tmp_path, port=port, shard_mb=0.02, flush_interval_s=0.05)
    config = th.write_yaml_config(cfg, tmp_path / "booth.yaml")
    repo = Repository.from_config(cfg.database)
    store = create_blob_store(cfg.storage)
    sid = th.new_session(repo)
    sent = th.frames(160)

    server = IngestProcess(config, tmp_path / "ingest.log")
    server.start()
    streamer = Streamer(
        th.uplink_config(f"127.0.0.1:{port}", tmp_path / "spool"),
        booth_id=th.BOOTH,
        camera_id="cam0",
    )
    try:
        await server.wait_ready(port)
        await streamer.start()
        take = streamer.open_take(sid, width=64, height=48, fps=120)
        take.add_frames(sent[:100])
        await _until(lambda: streamer.frames_acked >= 40)
        server.kill()  # mid-take: the take has not ended, and frames are in flight
        acked_at_kill = streamer.frames_acked
        take.add_frames(sent[100:])  # capture goes on while the server is down
        take.end()
        server.start()
        await server.wait_ready(port)
        await streamer.wait_uploaded(sid, timeout_s=90)
    except BaseException:
        sys.stderr.write(server.tail())
        raise
    finally:
        await streamer.stop()
        server.kill()
    assert acked_at_kill < len(sent)
    assert streamer.reconnects >= 1
    th.assert_exactly_once(repo, store, sid, "cam0", sent)
    assert repo.get_session(sid)["state"] == "uploaded"
    # `booth ingest` alone hands the session to the workers, as `booth serve` does.
    job = repo.job_for_session(sid)
    assert job is not None and job["published_at"] is not None
    queue = create_job_queue(cfg.queue)
    lease = queue.receive(timeout_s=1)
    assert lease is not None and lease.payload == {"session_id": sid}
    queue.close()
