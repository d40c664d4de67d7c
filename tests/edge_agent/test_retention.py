"""The board's copy of a take: removed once uploaded (by default) or once deleted."""

from __future__ import annotations

import pytest

from edge_agent.errors import BadInput
from edge_agent.retention import discard_recording, take_directory


def _record(out_dir, session, camera):
    d = take_directory(out_dir, session, camera)
    d.mkdir(parents=True)
    (d / "seg_00000.mp4").write_bytes(b"\0" * 64)
    (d / "take.json").write_text("{}")
    return d


def test_discarding_removes_the_take_and_its_session_directory_once_empty(tmp_path):
    a = _record(tmp_path, "s1", "cam0")
    b = _record(tmp_path, "s1", "cam1")
    assert discard_recording(tmp_path, "s1", "cam0", why="uploaded")
    assert not a.exists() and b.exists()  # the other camera's take is not touched
    assert discard_recording(tmp_path, "s1", "cam1", why="uploaded")
    assert not (tmp_path / "s1").exists()
    assert not discard_recording(tmp_path, "s1", "cam1", why="uploaded")  # nothing left


@pytest.mark.parametrize("session", ["..", "../etc", "a/b", ""])
def test_ids_that_would_leave_the_takes_directory_are_refused(tmp_path, session):
    with pytest.raises(BadInput):
        discard_recording(tmp_path, session, "cam0", why="deleted")
