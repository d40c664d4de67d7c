"""``booth serve --config FILE``: the cloud process (web app, API, ingest, control, mail)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path


def port(text: str) -> int:
    """An argparse type: a TCP port, or 0 for any free one (as web.port and ingest.port allow).

    Checked here because the servers do not: gRPC wraps 70000 round to 4464 and binds
    that, uvicorn fails with an OverflowError traceback.
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535 (0: any free port), got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="the booth YAML file")
    p.add_argument("--http-port", type=port, help="override web.port (0: any free port)")
    p.add_argument("--grpc-port", type=port, help="override ingest.port (0: any free port)")
    p.add_argument(
        "--ready-file", type=Path, help="write the bound ports here as JSON once serving"
    )


def run(args: argparse.Namespace) -> int:
    from cloud_trainer.config import load_config
    from cloud_trainer.service import Service

    cfg = load_config(args.config)
    service = Service(cfg, http_port=args.http_port, grpc_port=args.grpc_port)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if not service.stop.is_set():
                service.stop.set()  # finish what is running, hand nothing half-done over
                return
            # Asked twice: whoever sends it wants the process gone now. What is durable
            # is in the database and the blob store, as after a SIGKILL.
            print(f"booth serve: {sig.name} again, exiting now", file=sys.stderr)
            os._exit(128 + sig)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        task = asyncio.create_task(service.run())
        while not service.ready.is_set() and not task.done():
            await asyncio.sleep(0.05)
        if service.ready.is_set():
            if args.ready_file:
                tmp = args.ready_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(service.bound))
                tmp.replace(args.ready_file)
            print(
                f"serving: http://{cfg.web.host}:{service.bound['http']}  grpc {cfg.ingest.host}:{service.bound['grpc']}",
                file=sys.stderr,
            )
        await task

    asyncio.run(main())
    return 0
