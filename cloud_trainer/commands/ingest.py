"""``booth ingest --config FILE``: run the gRPC ingest and control server alone.

``booth ingest --new-token CAMERA`` prints a fresh agent token and the
``ingest.agents`` entry (its sha256) to paste into the config; the token goes
into that agent's ``agent.uplink.token``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal

from cloud_trainer.commands.serve import port

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the booth YAML file")
    p.add_argument("--port", type=port, help="override ingest.port (0: any free port)")
    p.add_argument(
        "--new-token", metavar="CAMERA", help="print a new agent token for CAMERA and exit"
    )


def run(args: argparse.Namespace) -> int:
    from edge_agent.errors import BadInput

    if args.new_token:
        from cloud_trainer.ingest.auth import hash_token

        token = secrets.token_urlsafe(32)
        print(f"token (agent.uplink.token): {token}")
        print("ingest.agents entry:")
        print(f"  - camera_id: {args.new_token}")
        print(f"    token_sha256: {hash_token(token)}")
        return 0
    if not args.config:
        raise BadInput("--config FILE is required")
    from cloud_trainer.config import load_config

    cfg = load_config(args.config)
    asyncio.run(_serve(cfg, args.port))
    return 0


async def _serve(cfg, port: int | None) -> None:
    from cloud_trainer.dispatch import enqueue_training
    from cloud_trainer.ingest.server import serve
    from cloud_trainer.queue import create_job_queue
    from cloud_trainer.repository import Repository
    from cloud_trainer.service import pending_job_sweep

    # Alone, ingest still hands each uploaded session to the workers, as `booth serve` does.
    repo = Repository.from_config(cfg.database)
    queue = create_job_queue(cfg.queue)

    async def on_uploaded(session_id: str) -> None:
        await asyncio.to_thread(enqueue_training, repo, queue, session_id)

    server = serve(cfg, repo=repo, on_session_uploaded=on_uploaded, port=port)
    await server.start()
    log.info("ingest listening on %s:%d (booth %s)", cfg.ingest.host, server.port, cfg.booth.id)
    sweep = asyncio.create_task(pending_job_sweep(repo, queue))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("ingest stopping")
    finally:
        sweep.cancel()
        await server.stop(2.0)
        queue.close()
        repo.close()
