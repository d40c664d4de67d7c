"""Errors a person can act on. The CLI prints ``str(err)`` as one line, never a traceback."""

from __future__ import annotations


class BoothError(Exception):
    """Base for every error whose message is meant for staff, attendees or ops."""


class BadInput(BoothError):
    """Input (a file, an argument, a message) that cannot be used as given."""


class DeviceError(BoothError):
    """A camera, accelerator or disk that is missing or misbehaving."""


# Ingest's trailing metadata on NOT_FOUND for a session its attendee deleted: the board
# then drops its copies instead of offering the take again (see ``edge_agent.retention``).
SESSION_STATE_KEY = "booth-session-state"
SESSION_DELETED = "deleted"
