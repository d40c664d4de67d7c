"""A minimal training worker for kill tests: take one job from a queue and train it.

Run as a script (``python job_runner.py QUEUE_JSON WORK_DIR BLOB_DIR``) so a test can
SIGKILL it mid-training. It does what ``Worker.handle`` does around training, without
the repository and the renderer: receive a lease, keep it alive while
``train_job`` runs, acknowledge it at the end. The job's payload names a synthetic
take (``attendee``, ``dance``, ``seconds``, ``fps``, ``size_px``) and the trainer
settings (``max_steps``, ``checkpoint_every_steps``).

It prints one line per event (``leased``, ``done``), flushed, for the test's log.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pydantic import TypeAdapter  # noqa: E402

from cloud_trainer.config import QueueConfig, TrainerConfig  # noqa: E402
from cloud_trainer.corpus import TakeData  # noqa: E402
from cloud_trainer.pretrain import synth_frame_size  # noqa: E402
from cloud_trainer.queue import create_job_queue  # noqa: E402
from cloud_trainer.storage.local import LocalBlobStore  # noqa: E402
from cloud_trainer.train import JobSpec, train_job  # noqa: E402


def job_config(payload: dict, work_dir: Path) -> TrainerConfig:
    return TrainerConfig(
        size_px=payload["size_px"],
        batch=2,
        budget_s=600,
        max_steps=payload["max_steps"],
        checkpoint_every_steps=payload["checkpoint_every_steps"],
        work_dir=work_dir,
    )


def job_take(payload: dict) -> TakeData:
    return TakeData.from_synth(
        payload["attendee"],
        payload["dance"],
        seconds=payload["seconds"],
        fps=payload["fps"],
        size=synth_frame_size(payload["size_px"]),
    )


def main(argv: list[str]) -> int:
    queue_json, work_dir, blob_dir = argv
    queue = create_job_queue(TypeAdapter(QueueConfig).validate_json(queue_json))
    lease = queue.receive(timeout_s=60)
    if lease is None:
        print("no job", flush=True)
        return 1
    print(f"leased {lease.job_id} attempt {lease.attempt}", flush=True)
    payload = lease.payload
    with lease.keep_alive():
        result = train_job(
            JobSpec(payload["session_id"], [job_take(payload)], job_id=lease.job_id),
            job_config(payload, Path(work_dir)),
            LocalBlobStore(Path(blob_dir)),
            models_dir=None,
        )
    lease.ack()
    print(json.dumps({"done": result.steps, "resumed_from": result.resumed_from}), flush=True)
    queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
