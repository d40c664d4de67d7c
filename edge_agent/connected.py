"""The agent connected to its booth: uplink (spool + ingest stream) and control stream.

``run_connected`` is what ``booth agent`` runs on a board: every take the agent
captures is spooled and uploaded (``stream.stream_agent_takes``), and the
cloud's StartTake/StopTake commands drive the agent (``control.AgentRunner``),
starting every camera of the booth on the same booth-clock instant.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from edge_agent import __version__
from edge_agent.config import PLACEHOLDER_SECRETS, AgentConfig, ConfigError
from protos import booth_pb2

log = logging.getLogger(__name__)


def check_token(cfg: AgentConfig) -> None:
    """Refuse to start with the placeholder token: it would be refused by ingest anyway."""
    if cfg.uplink.token.strip().lower() in PLACEHOLDER_SECRETS:
        raise ConfigError(
            "refusing to start: agent.uplink.token is still a placeholder; "
            "make one with `booth ingest --new-token CAMERA`"
        )


def capabilities(cfg: AgentConfig, running: str | None = None) -> booth_pb2.Capabilities:
    """What this board offers; ``running`` is the pose backend start-up actually built.

    An EdgeTPU that failed to load is not offered: the board runs the CPU model then.
    """
    w, h = getattr(cfg.source, "size", (0, 0))
    if running:
        backends = [running]
    else:
        backends = [cfg.pose.type] + (
            ["cpu"] if cfg.pose.type == "edgetpu" and cfg.pose.fallback_to_cpu else []
        )
    return booth_pb2.Capabilities(
        pose_backends=backends,
        max_width=w,
        max_height=h,
        max_fps=float(getattr(cfg.source, "fps", 0.0)),
        edgetpu_count=len(cfg.pose.devices) if "edgetpu" in backends else 0,
    )


async def run_connected(agent, cfg: AgentConfig, stop: threading.Event) -> None:
    from edge_agent.control import AgentRunner, ControlClient
    from edge_agent.stream import RecordingArchive, Streamer, stream_agent_takes

    streamer = Streamer(
        cfg.uplink,
        booth_id=cfg.booth_id,
        camera_id=cfg.camera_id,
        software_version=__version__,
        archive=RecordingArchive(
            cfg.capture.out_dir,
            keep_uploaded=cfg.capture.keep_uploaded_takes,
            pose_factory=agent.pose_factory,
            smoothing=cfg.smoothing,
        ),
    )
    stream_agent_takes(agent, streamer)
    control = ControlClient(
        cfg.uplink,
        booth_id=cfg.booth_id,
        camera_id=cfg.camera_id,
        runner=AgentRunner(agent),
        capabilities=capabilities(cfg, running=agent.status().get("pose_backend")),
        software_version=__version__,
        streamer=streamer,
        clock=agent.clock,
    )
    # On /status: whether the cloud is reachable and how much waits to go up. Plain
    # attribute reads, safe from the status server's thread.
    agent.status_sources["cloud"] = lambda: {
        "address": cfg.uplink.address,
        "connected": control.connected.is_set(),
        "frames_acked": streamer.frames_acked,
        "spool_bytes": streamer.spool.used_bytes,
    }
    await streamer.start()
    await control.start()
    # Connected is said by the control stream once the cloud answers ("control: connected").
    log.info("agent %s/%s started; cloud at %s", cfg.booth_id, cfg.camera_id, cfg.uplink.address)
    try:
        while not stop.is_set():
            await asyncio.sleep(0.5)
    finally:
        agent.status_sources.pop("cloud", None)
        await control.stop()
        await streamer.stop()
