"""``booth worker --config FILE``: take training jobs from the queue, one at a time."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from edge_agent.errors import BadInput

log = logging.getLogger(__name__)

# EX_TEMPFAIL: the worker exited to be replaced by a fresh process, not because it failed.
RECYCLE_EXIT = 75


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the booth YAML file")
    p.add_argument("--once", action="store_true", help="handle at most one job, then exit")
    p.add_argument("--id", help="worker id shown on jobs (default: host:pid)")


def _stop_on_signals(worker) -> None:
    """SIGTERM or Ctrl-C: finish the current training step, checkpoint, hand the job back, exit.

    A second Ctrl-C quits at once (the job then comes back when its lease expires).
    """

    def stop(signum, _frame) -> None:
        if worker.stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "stopping: the current job is checkpointed and handed back to the queue"
            + (" (Ctrl-C again to quit now)" if signum == signal.SIGINT else "")
        )
        worker.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def run(args: argparse.Namespace) -> int:
    from cloud_trainer.config import load_config
    from cloud_trainer.queue import create_job_queue
    from cloud_trainer.repository import Repository
    from cloud_trainer.storage import create_blob_store
    from cloud_trainer.worker import Worker

    cfg = load_config(args.config)
    worker = Worker(
        cfg,
        Repository.from_config(cfg.database),
        create_blob_store(cfg.storage),
        create_job_queue(cfg.queue),
    )
    if args.id:
        worker.worker_id = args.id
    _stop_on_signals(worker)
    if args.once:
        missing = worker.base_checkpoint_missing()
        if missing:
            raise BadInput(missing)
        try:
            worker.sweep_work_dirs()
            worker.run_once(timeout_s=30.0)
        except Exception:  # the traceback is for the log; the lease expires and the job returns
            log.exception("job handling crashed")
            return 1
        finally:
            worker.queue.close()
        return 0
    try:
        ended = worker.run_forever()
    finally:
        worker.queue.close()
    # Its memory grew past the limit: a supervisor (compose's restart policy, systemd's
    # Restart=on-failure, `booth demo`) starts a fresh worker on this code.
    return RECYCLE_EXIT if ended == "recycle" else 0
