"""The booth clock: this board's monotonic clock plus an offset measured against the cloud.

Several agents (one per camera) form a booth. Their capture timestamps must be
comparable, so each stamps frames with ``time.monotonic_ns() + offset_ns``, where
the control channel measures ``offset_ns`` (NTP-style, against the ingest
server) and sets it with :meth:`BoothClock.set_offset`. Until it does, the
offset is 0 and timestamps are this board's monotonic clock.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class BoothClock:
    """``now_ns()`` on the booth's shared timeline. Safe to call from any thread."""

    def __init__(self, offset_ns: int = 0) -> None:
        self._offset_ns = int(offset_ns)
        self._lock = threading.Lock()
        self._holds = 0
        self._pending: int | None = None

    @property
    def offset_ns(self) -> int:
        return self._offset_ns

    def set_offset(self, offset_ns: int) -> None:
        """Adopt a newly measured offset: for the next timestamp, or once no take captures.

        A step in the middle of a take would make its timestamps jump (backwards, or
        forwards past the take's end), so while one is held the new offset waits.
        """
        with self._lock:
            if self._holds:
                self._pending = int(offset_ns)
                return
            old, self._offset_ns = self._offset_ns, int(offset_ns)
        if old != self._offset_ns:
            log.info("booth clock offset set: %d ns (was %d ns)", self._offset_ns, old)

    def hold(self) -> None:
        """A take starts capturing: keep the offset as it is until ``release``."""
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        """A take stopped capturing; the last offset measured meanwhile takes effect."""
        with self._lock:
            self._holds = max(0, self._holds - 1)
            pending = self._pending if not self._holds else None
            if pending is not None:
                self._pending = None
        if pending is not None:
            self.set_offset(pending)

    def now_ns(self) -> int:
        # A plain attribute read: an int assignment is atomic under the GIL, so no lock here.
        return time.monotonic_ns() + self._offset_ns

    def from_monotonic_ns(self, monotonic_ns: int) -> int:
        """Map a CLOCK_MONOTONIC timestamp (e.g. a V4L2 buffer's) onto the booth clock."""
        return monotonic_ns + self._offset_ns
