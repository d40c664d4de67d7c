"""A training job whose worker is SIGKILLed mid-training is picked up again from its checkpoint.

On ``sqlite`` the job comes back when its lease expires; on ``pubsub`` (Google's
emulator) when its ack deadline passes and Pub/Sub redelivers it. The first worker
is a real process (``job_runner.py``) killed with SIGKILL once it has mirrored a
checkpoint to the blob store; the second worker is this test, on another work
directory (another machine), reading the checkpoint back from the store.

Tiny on purpose: 64 px, a 3-second take at 8 fps, a checkpoint every 2 steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_trainer.queue import create_job_queue
from cloud_trainer.storage.local import LocalBlobStore
from cloud_trainer.train import JobSpec, train_job

sys.path.insert(0, str(Path(__file__).parent))
from job_runner import job_config, job_take  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Leases long enough that a loaded machine's late heartbeat does not hand the job out
# while its worker lives, short enough that a dead worker's job is back in seconds.
LEASE_S = 4
# The first worker: importing TensorFlow, building the model and tracing the step.
FIRST_CHECKPOINT_WAIT_S = 240.0
PAYLOAD = {
    "session_id": "sess-kill",
    "attendee": 3,
    "dance": 7,
    "seconds": 3,
    "fps": 8,
    "size_px": 64,
    # Far more steps than the first worker lives for: it is killed mid-training.
    "max_steps": 400,
    "checkpoint_every_steps": 2,
}


def _short_leases(queue_config):
    if queue_config.type == "sqlite":
        return queue_config.model_copy(
            update={"visibility_timeout_s": float(LEASE_S), "heartbeat_s": 1.0}
        )
    return queue_config.model_copy(update={"ack_deadline_s": LEASE_S})


def _checkpoint_step(store: LocalBlobStore) -> int | None:
    """Step of the latest checkpoint the store's ``checkpoint`` index points at."""
    key = f"sessions/{PAYLOAD['session_id']}/checkpoints/ckpt/checkpoint"
    if not store.exists(key):
        return None
    m = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', store.get(key).decode())
    return int(m.group(1)) if m else None


def _start_worker(queue_config, tmp_path: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("job_runner.py")),
                queue_config.model_dump_json(),
                str(tmp_path / "machine-a"),
                str(tmp_path / "blobs"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ.copy(),  # PUBSUB_EMULATOR_HOST, when the emulator runs
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_job_killed_mid_training_is_picked_up_again_and_resumes_from_its_checkpoint(
    queue_config, tmp_path: Path
) -> None:
    cfg = _short_leases(queue_config)
    worker_log = tmp_path / "worker-a.log"
    queue = create_job_queue(cfg)
    store = LocalBlobStore(tmp_path / "blobs")
    queue.publish("job-kill", PAYLOAD)
    worker = _start_worker(cfg, tmp_path, worker_log)
    try:
        deadline = time.monotonic() + FIRST_CHECKPOINT_WAIT_S
        while (_checkpoint_step(store) or 0) < 2:
            assert worker.poll() is None, f"worker exited early:\n{worker_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no checkpoint after {FIRST_CHECKPOINT_WAIT_S:.0f} s:\n"
                f"{worker_log.read_text()[-3000:]}"
            )
            time.sleep(0.2)
        # The job is leased: while its worker lives, nobody else gets it.
        assert queue.receive(timeout_s=1.0) is None
        _kill(worker)
    finally:
        if worker.poll() is None:
            _kill(worker)
    assert worker.returncode == -signal.SIGKILL
    assert "leased job-kill attempt 1" in worker_log.read_text()
    killed_at = _checkpoint_step(store)
    assert killed_at is not None and killed_at < PAYLOAD["max_steps"]
    assert not store.exists(f"sessions/{PAYLOAD['session_id']}/model/generator.json")

    # The dead worker stopped extending its lease: the job comes back, as attempt 2.
    lease = queue.receive(timeout_s=LEASE_S * 5)
    assert lease is not None, "the killed worker's job was never delivered again"
    assert (lease.job_id, lease.attempt) == ("job-kill", 2)
    payload = {**lease.payload, "max_steps": killed_at + 2}
    seen = []
    with lease.keep_alive():
        result = train_job(
            JobSpec(payload["session_id"], [job_take(payload)], job_id=lease.job_id),
            job_config(payload, tmp_path / "machine-b"),
            store,
            seen.append,
            models_dir=None,
        )
    lease.ack()
    assert result.resumed_from == killed_at > 0
    assert result.steps == killed_at + 2 and result.stopped == "max_steps"
    assert min(p.step for p in seen if p.stage == "training") >= killed_at
    state = json.loads(store.get(f"sessions/{PAYLOAD['session_id']}/checkpoints/state.json"))
    assert state["done"]["steps"] == killed_at + 2
    assert queue.receive(timeout_s=1.0) is None
    queue.close()
