"""Correction files: round-trip, validation that names the line, and what applying does."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_trainer import corrections
from edge_agent import skeleton as sk
from edge_agent.errors import BadInput

N = 60


def _poses(n: int = N) -> np.ndarray:
    p = np.zeros((n, sk.NUM_JOINTS, 3), dtype=np.float32)
    p[:, :, 0] = np.arange(n)[:, None] * 2.0 + 100
    p[:, :, 1] = np.arange(sk.NUM_JOINTS)[None, :] * 10.0
    p[:, :, 2] = 1.0
    return p


def test_round_trip_through_yaml():
    text = """
- {frame: 12, joint: left_wrist, x: 301.5, y: 122}
- frame: 3
  joint: nose
  x: 10
  y: 20
  score: 0.5
- interpolate: [40, 44]
- drop: [0, 1]
- drop: [58, 59]
"""
    c = corrections.parse(text, N)
    assert len(c) == 5
    assert c.overrides[0] == corrections.Override(12, "left_wrist", 301.5, 122.0)
    assert c.overrides[1].score == 0.5
    again = corrections.parse(c.to_yaml(), N)
    assert sorted(again.overrides, key=lambda o: o.frame) == sorted(
        c.overrides, key=lambda o: o.frame
    )
    assert sorted(again.spans, key=lambda s: s.first) == sorted(c.spans, key=lambda s: s.first)
    assert corrections.parse(again.to_yaml(), N).to_yaml() == c.to_yaml()


def test_invalid_file_names_each_bad_line():
    text = (
        "# corrections\n"  # 1
        "- {frame: 12, joint: left_wrist, x: 1, y: 2}\n"  # 2
        "- {frame: 400, joint: nose, x: 1, y: 2}\n"  # 3: frame out of range
        "- {frame: 5, joint: left_wirst, x: 1, y: 2}\n"  # 4: unknown joint
        "- interpolate: [10, 70]\n"  # 5: out of range
        "- drop: [9, 3]\n"  # 6: backwards
        "- {frame: 7, joint: nose, x: one, y: 2}\n"  # 7: not a number
        "- explode: [1, 2]\n"  # 8: unknown correction
    )
    with pytest.raises(BadInput) as e:
        corrections.parse(text, N, source="fix.yaml")
    msg = str(e.value)
    assert "fix.yaml line 3: frame 400 is out of range" in msg
    assert "fix.yaml line 4: unknown joint 'left_wirst' (did you mean left_wrist?)" in msg
    assert "fix.yaml line 5: interpolate last frame 70 is out of range" in msg
    assert "fix.yaml line 6: drop range [9, 3] runs backwards" in msg
    assert "fix.yaml line 7: x must be a number" in msg
    assert "fix.yaml line 8: unknown correction" in msg
    assert "line 2" not in msg


def test_conflicts_and_malformed_files_are_refused_with_their_line():
    with pytest.raises(BadInput, match=r"line 2: frame 41 is overridden but also in interpolate"):
        corrections.parse("- interpolate: [40, 44]\n- {frame: 41, joint: nose, x: 1, y: 1}\n", N)
    with pytest.raises(BadInput, match=r"line 2: nose of frame 1 is already set on line 1"):
        corrections.parse(
            "- {frame: 1, joint: nose, x: 1, y: 1}\n- {frame: 1, joint: nose, x: 2, y: 2}\n", N
        )
    # Overlapping or touching interpolations: the result would depend on their order.
    with pytest.raises(BadInput, match=r"line 1: interpolate \[4, 6\] overlaps or touches"):
        corrections.parse("- interpolate: [4, 6]\n- interpolate: [2, 4]\n", N)
    with pytest.raises(BadInput, match=r"line 2: .*write them as one range \[5, 8\]"):
        corrections.parse("- interpolate: [5, 5]\n- interpolate: [6, 8]\n", N)
    assert corrections.parse("- interpolate: [2, 4]\n- interpolate: [6, 8]\n", N)  # apart
    with pytest.raises(BadInput, match=r"line 1: the drops remove every frame"):
        corrections.parse(f"- drop: [0, {N - 1}]\n", N)
    with pytest.raises(BadInput, match=r"line 2: malformed YAML"):
        corrections.parse("- {frame: 1\n- drop: [1, 2]\n", N)
    with pytest.raises(BadInput, match="contains no corrections"):
        corrections.parse("# nothing\n", N)
    with pytest.raises(BadInput, match="expected a list"):
        corrections.parse("frame: 1\n", N)


def test_apply_overrides_interpolates_and_drops():
    poses = _poses()
    poses[41:44, 9] = (999.0, 999.0, 0.9)  # a glitch in the left wrist
    c = corrections.parse(
        "- interpolate: [41, 43]\n- {frame: 12, joint: left_wrist, x: 5, y: 6}\n- drop: [0, 1]\n",
        N,
    )
    out, kept = corrections.apply(poses, c)
    assert len(out) == N - 2 and kept[0] == 2 and kept[-1] == N - 1
    row = {orig: i for i, orig in enumerate(kept)}
    np.testing.assert_allclose(out[row[12], 9], (5, 6, 1))
    # Linear between frames 40 and 44.
    for f in (41, 42, 43):
        np.testing.assert_allclose(
            out[row[f], 9, :2], poses[40, 9, :2] + (f - 40) * np.array([2, 0])
        )
    assert (out[row[42], :, 2] == 1).all()
    mask = corrections.touched_frames(c, N)
    assert mask[[12, 41, 42, 43]].all() and mask.sum() == 4
    assert poses[41, 9, 0] == 999.0  # the input is not modified


def test_template_lists_flagged_runs_as_comments():
    flagged = np.zeros(N, dtype=bool)
    flagged[[5, 6, 7, 20]] = True
    text = corrections.template(flagged, name="salsa", version=2)
    assert "# - interpolate: [5, 7]" in text and "# - interpolate: [20, 20]" in text
    assert "booth reference correct salsa" in text
