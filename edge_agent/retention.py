"""What a board keeps of a take once the cloud holds it, or once its attendee deleted it.

A board records every take twice: MJPEG-in-MP4 segments plus poses under
``capture.out_dir/<session>/<camera>/`` (the recording), and the upload spool. The
spool empties itself as ingest acknowledges. The recording is the spool's fallback
while the take uploads; after that it is a copy of an attendee's video on a
conference-floor device, which their "delete my data" must reach too. So:

- when ingest confirms a take complete, the recording is removed, unless
  ``capture.keep_uploaded_takes`` is set (a booth that wants local copies must then
  clean them itself);
- when ingest answers that the take's session was *deleted* (the board was offline
  when the attendee deleted it), the spool's copy and the recording are removed
  whatever the setting.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from edge_agent.capture.take import check_name

log = logging.getLogger(__name__)


def take_directory(out_dir: str | Path, session_id: str, camera_id: str) -> Path:
    """The recording's directory; ids are checked, so the path cannot leave ``out_dir``."""
    return Path(out_dir) / check_name("session", session_id) / check_name("camera", camera_id)


def discard_recording(out_dir: str | Path, session_id: str, camera_id: str, *, why: str) -> bool:
    """Remove one take's recording (and its session directory once empty); True if any was there."""
    directory = take_directory(out_dir, session_id, camera_id)
    if not directory.exists():
        return False
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():  # a file we may not delete: say so rather than pretend
        log.error("take %s/%s: could not remove %s (%s)", session_id, camera_id, directory, why)
        return False
    with contextlib.suppress(OSError):  # only when no other camera's take is left in it
        directory.parent.rmdir()
    log.info("take %s/%s: local recording removed (%s)", session_id, camera_id, why)
    return True
