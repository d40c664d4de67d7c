"""``booth agent --config FILE``: run one camera's edge agent.

With ``--take-seconds S`` it runs one take locally, prints a summary and exits
(0 if the take is complete, 1 if it finished with errors, 2 if it could not
start). Without it, the agent runs until interrupted: it probes the camera,
logs its status periodically, serves it over HTTP when ``status_port`` is set,
and waits for the control channel to start takes. A camera silent mid-take for
``capture.stall_restart_s`` ends the process with exit code 3, for its
supervisor to restart it (the stuck read holds the device until then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_RESTART = 3  # a camera stuck mid-read: restart me
STUCK_EXIT_S = 15.0  # the longest a stuck shutdown may take before the process just exits


EXAMPLES = [
    ("booth agent --config board.yaml", "film when the tablet says Start, upload to the cloud"),
    ("booth agent --config board.yaml --offline", "check the camera and pose: status only"),
    ("booth agent --config board.yaml --take-seconds 5 --json", "one local take, no cloud"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, type=Path, help="booth YAML (its agent: section)")
    p.add_argument("--camera-id", help="override agent.camera_id")
    p.add_argument(
        "--take-seconds", type=float, help="run one take of this length locally, then exit"
    )
    p.add_argument("--session", help="session id for --take-seconds (default: local-<time>)")
    p.add_argument("--out-dir", type=Path, help="override agent.capture.out_dir")
    p.add_argument("--status-port", type=int, help="override agent.status_port (0: off)")
    p.add_argument("--json", action="store_true", help="print the take summary as JSON")
    p.add_argument(
        "--offline", action="store_true", help="no uplink or control: report status only"
    )
    p.add_argument(
        "--prerender-seconds",
        type=float,
        default=0.0,
        help="synthetic camera: render a take of this length at start-up, before Start is pressed",
    )


def _print_summary(summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    g = summary.granted
    c = summary.counters
    p = summary.pose
    print(f"take {summary.session_id}/{summary.camera_id}: {summary.directory}")
    print(
        f"  camera granted {g.get('width')}x{g.get('height')} at {g.get('fps')} fps; "
        f"captured {summary.frames} frames at {summary.fps_captured} fps"
    )
    print(
        f"  written {summary.frames_written} in {len(summary.segments)} segments; "
        f"dropped: capture {c['capture_dropped']}, segment {c['segment_dropped']}, "
        f"pose {c['pose_dropped']}; corrupt {c['corrupt_frames']}"
    )
    print(
        f"  pose ({p.get('backend')}): live {p.get('live')} at {p.get('live_fps')} fps, "
        f"catch-up {p.get('catch_up')}, coverage {p.get('coverage')}"
    )
    for w in summary.warnings:
        print(f"  warning: {w}")
    for e in summary.errors:
        print(f"  error: {e}")


def run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent
    from edge_agent.capture.sources import create_source
    from edge_agent.config import load_agent_config
    from edge_agent.connected import check_token, run_connected
    from edge_agent.errors import BadInput

    cfg = load_agent_config(args.config)
    if args.take_seconds is None and not args.offline:
        check_token(cfg)
    if args.camera_id:
        cfg.camera_id = args.camera_id
    if args.out_dir:
        cfg.capture.out_dir = args.out_dir
    if args.take_seconds is not None and args.take_seconds <= 0:
        raise BadInput(f"--take-seconds must be positive, got {args.take_seconds}")

    agent = Agent(cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        take = agent.current_take
        if take is not None:
            take.stop()

    # The stuck read may also block the shutdown; the spool is durable, so then just go.
    hard_exit = threading.Timer(STUCK_EXIT_S, lambda: os._exit(EXIT_RESTART))
    hard_exit.daemon = True

    def restart_when_stuck() -> None:
        # A camera stuck mid-read: stop like on SIGTERM, exit 3 for the supervisor
        # (compose: restart: always) to start a fresh process that can open the device.
        agent.needs_restart.wait()
        log.critical("%s", agent.restart_reason)
        stop.set()
        hard_exit.start()

    threading.Thread(target=restart_when_stuck, name="stall-watch", daemon=True).start()

    # SIGTERM (docker stop) ends the take cleanly; handlers can only be set on the main thread.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_signal) if main else None
    try:
        # Raises (one line, exit 2) when the pose backend cannot be built: see Agent.check_pose.
        agent.start(status_port=args.status_port)
        if args.take_seconds is not None:
            session = args.session or time.strftime("local-%Y%m%d-%H%M%S")
            take = agent.start_take(session, args.take_seconds)
            while (summary := take.wait(1.0)) is None:
                if stop.is_set():
                    return EXIT_RESTART if agent.needs_restart.is_set() else 1
            _print_summary(summary, args.json)
            return 0 if summary.ok else 1
        if args.offline:
            log.info(
                "agent %s/%s running offline: status only (Ctrl-C to stop)",
                cfg.booth_id,
                cfg.camera_id,
            )
            while not stop.wait(1.0):
                pass
            return EXIT_RESTART if agent.needs_restart.is_set() else 0
        if args.prerender_seconds and cfg.source.type == "synthetic":
            # A synthetic camera renders its take up front; do it now, not when Start is pressed.
            threading.Thread(
                target=lambda: create_source(
                    cfg.source, clock=agent.clock, seconds=args.prerender_seconds
                ).open(),
                name="prerender",
                daemon=True,
            ).start()
        asyncio.run(run_connected(agent, cfg, stop))
        return EXIT_RESTART if agent.needs_restart.is_set() else 0
    finally:
        agent.close(timeout=STUCK_EXIT_S / 2 if agent.needs_restart.is_set() else 30.0)
        hard_exit.cancel()  # shut down in time: the return code says the rest
        if main:
            signal.signal(signal.SIGTERM, previous)
