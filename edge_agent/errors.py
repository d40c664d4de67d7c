"""Errors a person can act on. The CLI prints ``str(err)`` as one line, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path


class BoothError(Exception):
    """Base for every error whose message is meant for staff, attendees or ops."""


class BadInput(BoothError):
    """Input (a file, an argument, a message) that cannot be used as given."""


class DeviceError(BoothError):
    """A camera, accelerator or disk that is missing or misbehaving."""


def make_dirs(path: str | os.PathLike[str], what: str) -> Path:
    """``mkdir -p`` for a directory the config names: DeviceError saying which and why.

    ``what`` names the setting (``storage.root``), so the one line says what to change.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        if isinstance(e, FileExistsError | NotADirectoryError):
            reason = "a file is in the way (a directory is needed)"
        raise DeviceError(f"{what} {p} cannot be used: {reason}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise DeviceError(f"{what} {p} cannot be used: not writable by this user")
    return p


# Ingest's trailing metadata on NOT_FOUND for a session its attendee deleted: the board
# then drops its copies instead of offering the take again (see ``edge_agent.retention``).
SESSION_STATE_KEY = "booth-session-state"
SESSION_DELETED = "deleted"
# ... and on PERMISSION_DENIED for a camera the session does not take (staff went on
# without it): the board drops its spooled copy and keeps the recording as uploaded.
TAKE_NOT_WANTED = "take-not-wanted"
