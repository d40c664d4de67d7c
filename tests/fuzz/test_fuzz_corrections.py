"""Fuzzing correction files: any text parses, or is refused with BadInput naming its lines.

Staff write these files by hand. Properties:
- ``parse`` returns ``Corrections`` or raises ``BadInput`` whose problems each
  read ``SOURCE line N: ...`` with a line of the file (``contains no
  corrections`` for an empty one); never any other exception;
- what parses is valid (frames in range, known joints, finite coordinates),
  applies to a reference of that length, and survives ``to_yaml`` -> ``parse``.

Files that crashed ``parse`` before are regression cases.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import yaml
from fuzz_settings import fuzz_marks, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from cloud_trainer import corrections
from edge_agent import skeleton as sk
from edge_agent.errors import BadInput

pytestmark = fuzz_marks()

SOURCE = "fix.yaml"

# ---- strategies ------------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_frame_no = st.integers(-3, 70) | st.integers() | st.sampled_from([True, None, "3", 2.0, 1.5])
_coord = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(10**6), 10**6)
    | st.sampled_from(["one", None, True, [1]])
)
_joint = (
    st.sampled_from(list(sk.JOINTS))
    | st.sampled_from(["left_wirst", "Nose", "", None, 3, ["nose"], {"a": 1}])
    | _text
)


@st.composite
def _item(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["override", "override", "span", "junk"]))
    if kind == "override":
        item = {
            "frame": draw(_frame_no),
            "joint": draw(_joint),
            "x": draw(_coord),
            "y": draw(_coord),
        }
        if draw(st.booleans()):
            item["score"] = draw(_coord)
        for key in draw(st.lists(st.sampled_from(list(item) + ["extra"]), max_size=2)):
            if draw(st.booleans()):
                item.pop(key, None)
            else:
                item[key] = draw(_coord)
        return item
    if kind == "span":
        name = draw(st.sampled_from(["interpolate", "drop"]))
        value = draw(
            st.lists(_frame_no, min_size=0, max_size=3) | st.tuples(_frame_no, _frame_no) | _text
        )
        item = {name: list(value) if isinstance(value, tuple) else value}
        if draw(st.integers(0, 4)) == 0:
            item[draw(st.sampled_from(["drop", "interpolate", "frame", "z"]))] = [1, 2]
        return item
    return draw(
        st.none() | st.integers() | _text | st.lists(st.integers(), max_size=3) | st.just({})
    )


STRUCTURED = st.tuples(
    st.lists(_item(), max_size=8), st.sampled_from([None, True, False]), st.booleans()
).map(lambda t: yaml.safe_dump(t[0], default_flow_style=t[1], allow_unicode=t[2]))

_TOKENS = [
    "\n",
    "- ",
    "  ",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "frame: ",
    "joint: ",
    "x: ",
    "y: ",
    "score: ",
    "interpolate: ",
    "drop: ",
    "nose",
    "left_wrist",
    "12",
    "-1",
    "0.5",
    "1e3",
    ".nan",
    ".inf",
    "~",
    "yes",
    "&a ",
    "*a",
    "<<: ",
    "!!int ",
    "!!binary ",
    "? ",
    "# note",
    "---\n",
    "'",
    '"',
    "\t",
    "\x00",
]
GRAMMAR = st.lists(st.sampled_from(_TOKENS) | _text, max_size=40).map("".join)
ANY_TEXT = STRUCTURED | GRAMMAR | st.text(st.characters(exclude_categories=["Cs"]), max_size=200)

# ---- bugs this found, kept as regression cases --------------------------------------------------------------------------------

# Files that once crashed parse (found by this suite): each must now be a BadInput.
ONCE_CRASHED = {
    # PyYAML's constructors: an empty or non-numeric explicit int tag.
    "empty !!int": "- {frame: !!int , joint: nose, x: 1, y: 1}\n",
    "!!int of a word": "- {frame: !!int three, joint: nose, x: 1, y: 1}\n",
    # _joint: `value in sk.INDEX` with a list or a mapping was a TypeError (unhashable).
    "a list as the joint": "- {frame: 1, joint: [nose], x: 1, y: 1}\n",
    "a mapping as the joint": "- {frame: 1, joint: {a: 1}, x: 1, y: 1}\n",
    # PyYAML's int() of a 5000-digit frame number raises ValueError, not a YAMLError.
    "5000-digit frame": "- {frame: " + "1" * 5000 + ", joint: nose, x: 1, y: 1}\n",
    # PyYAML recurses once per nesting level: RecursionError.
    "1000 nested lists": "[" * 1000,
}


@pytest.mark.parametrize("name", sorted(ONCE_CRASHED))
def test_a_file_that_once_crashed_parse_is_refused_with_bad_input(name: str) -> None:
    text = ONCE_CRASHED[name]
    with pytest.raises(BadInput) as e:
        corrections.parse(text, 60, source=SOURCE)
    _check_refusal(e.value, text)


def test_tiny_values_survive_to_yaml() -> None:
    c = corrections.parse("- {frame: 1, joint: nose, x: 0.00001, y: 1, score: 0.00001}\n", 10)
    corrections.parse(c.to_yaml(), 10)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_huge_coordinates_are_refused_not_made_infinite() -> None:
    with pytest.raises(BadInput, match="line 1: x 1e[+]39 is far outside any frame"):
        corrections.parse("- {frame: 1, joint: nose, x: 1.0e+39, y: 1}\n", 10, source=SOURCE)


# ---- properties --------------------------------------------------------------------------------

_LINE = re.compile(rf"^{re.escape(SOURCE)} line (\d+|\?): \S")


def _check_refusal(err: BadInput, text: str) -> None:
    msg = str(err)
    assert msg.startswith(SOURCE), msg
    if msg == f"{SOURCE}: contains no corrections" or msg.startswith(f"{SOURCE}: malformed YAML"):
        return  # the whole file: PyYAML gives no position for some malformed files
    n_lines = text.count("\n") + 1
    numbered = [m for line in msg.split("\n") if (m := _LINE.match(line))]
    assert numbered, f"no problem names its line: {msg!r}"
    for m in numbered:
        if m.group(1) != "?":
            assert 1 <= int(m.group(1)) <= n_lines + 1, f"line {m.group(1)} of {n_lines}: {msg!r}"


def _check_parsed(c: corrections.Corrections, n_frames: int) -> None:
    for o in c.overrides:
        assert 0 <= o.frame < n_frames and o.joint in sk.INDEX
        assert math.isfinite(o.x) and math.isfinite(o.y) and 0 < o.score <= 1
    for s in c.spans:
        assert s.kind in ("interpolate", "drop") and 0 <= s.first <= s.last < n_frames
    poses = np.random.default_rng(0).uniform(0, 640, (n_frames, sk.NUM_JOINTS, 3))
    poses = poses.astype(np.float32)
    fixed, kept = corrections.apply(poses, c)
    assert np.isfinite(fixed).all()
    dropped = set()
    for s in c.drops:
        dropped |= set(range(s.first, s.last + 1))
    assert len(fixed) == len(kept) == n_frames - len(dropped) > 0
    assert sorted(set(kept.tolist()) | dropped) == list(range(n_frames))


@fuzz_settings(share=2.0)
@given(text=ANY_TEXT, n_frames=st.integers(1, 80))
def test_any_text_parses_or_names_the_bad_lines(text: str, n_frames: int) -> None:
    try:
        c = corrections.parse(text, n_frames, source=SOURCE)
    except BadInput as e:
        _check_refusal(e, text)
        return
    _check_parsed(c, n_frames)
    again = corrections.parse(c.to_yaml(), n_frames, source=SOURCE)
    assert sorted(again.overrides, key=repr) == sorted(c.overrides, key=repr)
    assert sorted(again.spans, key=repr) == sorted(c.spans, key=repr)
