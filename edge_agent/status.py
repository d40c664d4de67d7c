"""The agent's status: a one-line log summary and an optional tiny HTTP endpoint.

``GET /status`` returns the agent's status snapshot as JSON; ``GET /healthz``
returns 200 when the agent can capture and 503 (with the reason) when it is in
an error state. The server is the standard library's threaded HTTP server: no
framework on the board, and nothing listens unless ``status_port`` is set.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.errors import BoothError

log = logging.getLogger(__name__)


def status_line(status: dict[str, Any]) -> str:
    """A compact one-line summary for the periodic log."""
    parts = [f"state={status.get('state')}"]
    take = status.get("take")
    if take:
        rec = take.get("recording") or {}
        pose = take.get("pose") or {}
        queue = rec.get("queue") or {}
        streams = take.get("stream") or []
        parts += [
            f"take={take.get('session')}/{take.get('camera')}",
            f"frames={take.get('frames')}",
            f"fps={take.get('fps')}",
            f"written={rec.get('written')}",
            f"capture_dropped={take.get('capture_dropped')}",
            f"segment_queue={queue.get('depth')}/{queue.get('capacity')}",
            f"segment_dropped={queue.get('dropped')}",
            f"stream_dropped={sum(s.get('dropped', 0) for s in streams)}",
            f"pose_fps={pose.get('fps')}",
            f"pose_dropped={pose.get('dropped')}",
            f"coverage={pose.get('coverage')}",
        ]
    if status.get("error"):
        parts.append(f"error={status['error']!r}")
    for w in status.get("warnings") or ():
        parts.append(f"warning={w!r}")
    return " ".join(parts)


class StatusServer:
    """Serves ``get_status()`` over HTTP on ``host:port`` (port 0: an ephemeral port)."""

    def __init__(
        self, get_status: Callable[[], dict[str, Any]], port: int, host: str = "0.0.0.0"
    ) -> None:
        get = get_status

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = self.path.split("?", 1)[0]
                if path in ("/", "/status"):
                    self._send(200, get())
                elif path == "/healthz":
                    status = get()
                    ok = status.get("state") != "error"
                    self._send(200 if ok else 503, {"ok": ok, "error": status.get("error")})
                else:
                    self._send(404, {"error": f"no such path {path}; try /status or /healthz"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("status http: " + fmt, *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except (OSError, OverflowError) as e:  # in use, not an address here, out of range
            reason = getattr(e, "strerror", None) or str(e)
            raise BoothError(
                f"the status endpoint cannot listen on {host}:{port}: {reason} "
                "(set status_port to a free port, or 0 for none)"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="status-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> StatusServer:
        self._thread.start()
        log.info("status endpoint on http://%s:%d/status", *self._server.server_address[:2])
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
