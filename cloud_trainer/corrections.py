"""Hand corrections for a reference dance's poses, as a small YAML file.

The worst glitches in a rendered video come from bad poses in the *reference*,
so staff review the QA report of each reference and fix what the pose model got
wrong. A correction file is a YAML list; each item is one of::

    - {frame: 12, joint: left_wrist, x: 301.5, y: 122}   # override one keypoint
    - interpolate: [40, 44]   # replace frames 40..44 by a straight line between 39 and 45
    - drop: [0, 5]            # remove frames 0..5 from the reference

Frame numbers always refer to the version the file is applied to (what
``booth reference show`` and the QA report print), ranges are inclusive, and
the order of items does not matter: overrides are applied first, then
interpolations (anchored on the corrected neighbours), then drops. Items that
contradict each other (an override inside an interpolated or dropped range,
the same keypoint twice, interpolations that overlap or touch) are errors rather than silently resolved, because
either reading could be the one staff meant. Every error names its line.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml

from edge_agent import skeleton as sk
from edge_agent.errors import BadInput


@dataclass(frozen=True)
class Override:
    frame: int
    joint: str
    x: float
    y: float
    score: float = 1.0
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class FrameSpan:
    """An inclusive range of frames to ``interpolate`` or ``drop``."""

    kind: str  # "interpolate" | "drop"
    first: int
    last: int
    line: int = field(default=0, compare=False)


@dataclass
class Corrections:
    overrides: list[Override] = field(default_factory=list)
    spans: list[FrameSpan] = field(default_factory=list)

    @property
    def interpolations(self) -> list[FrameSpan]:
        return [s for s in self.spans if s.kind == "interpolate"]

    @property
    def drops(self) -> list[FrameSpan]:
        return [s for s in self.spans if s.kind == "drop"]

    def __len__(self) -> int:
        return len(self.overrides) + len(self.spans)

    def to_yaml(self) -> str:
        """The canonical text of these corrections; ``parse`` reads it back unchanged."""
        lines = ["# dancebooth reference corrections (booth reference correct NAME FILE)"]
        for o in sorted(self.overrides, key=lambda o: (o.frame, sk.INDEX[o.joint])):
            score = "" if o.score == 1.0 else f", score: {_num(o.score)}"
            lines.append(
                f"- {{frame: {o.frame}, joint: {o.joint}, x: {_num(o.x)}, y: {_num(o.y)}{score}}}"
            )
        for s in sorted(self.spans, key=lambda s: (s.kind, s.first, s.last)):
            lines.append(f"- {s.kind}: [{s.first}, {s.last}]")
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    if float(v).is_integer():
        return str(int(v))
    text = repr(float(v))
    # YAML 1.1 (PyYAML) reads 1e-05 as a string: exponents need a '.' in the mantissa.
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


class _Problems:
    """Collects every error of a file so staff fix them all in one pass."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str]] = []

    def add(self, node: yaml.Node | None, msg: str, line: int | None = None) -> None:
        if line is None:
            line = node.start_mark.line + 1 if node is not None else 0
        self.items.append((line, msg))

    def raise_if_any(self) -> None:
        if self.items:
            self.items.sort(key=lambda t: t[0])
            raise BadInput("\n".join(f"{self.source} line {ln}: {msg}" for ln, msg in self.items))


def _key_nodes(node: yaml.MappingNode) -> dict[Any, tuple[yaml.Node, yaml.Node]]:
    return {k.value: (k, v) for k, v in node.value}


def _int(value: Any) -> int | None:
    # bool is an int in Python; `frame: yes` is a typo, not frame 1.
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _frame(value: Any, node: yaml.Node, n_frames: int, what: str, p: _Problems) -> int | None:
    f = _int(value)
    if f is None:
        p.add(node, f"{what} must be a whole frame number, got {value!r}")
        return None
    if not 0 <= f < n_frames:
        p.add(node, f"{what} {f} is out of range: the reference has frames 0..{n_frames - 1}")
        return None
    return f


def _joint(value: Any, node: yaml.Node, p: _Problems) -> str | None:
    if isinstance(value, str) and value in sk.INDEX:
        return value
    close = difflib.get_close_matches(str(value), sk.JOINTS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    names = "" if close else f"; joints are: {', '.join(sk.JOINTS)}"
    p.add(node, f"unknown joint {value!r}{hint}{names}")
    return None


# Keypoints are float32 pixels; anything this far off a frame is a typo, and beyond
# float32's range it would turn into inf in the poses.
_MAX_COORD_PX = 1e6


def _coord(value: Any, node: yaml.Node, key: str, p: _Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        p.add(node, f"{key} must be a number of pixels, got {value!r}")
        return None
    if abs(value) > _MAX_COORD_PX:
        p.add(node, f"{key} {value!r} is far outside any frame")
        return None
    return float(value)


def _parse_override(
    data: dict, node: yaml.MappingNode, n_frames: int, p: _Problems
) -> Override | None:
    keys = _key_nodes(node)
    allowed = {"frame", "joint", "x", "y", "score"}
    ok = True
    for k, (knode, _) in keys.items():
        if k not in allowed:
            p.add(
                knode, f"unknown key {k!r} in a keypoint override (keys: frame, joint, x, y, score)"
            )
            ok = False
    for k in ("joint", "x", "y"):
        if k not in data:
            p.add(node, f"keypoint override needs {k!r}")
            ok = False
    frame = _frame(data["frame"], keys["frame"][1], n_frames, "frame", p)
    joint = _joint(data["joint"], keys["joint"][1], p) if "joint" in data else None
    x = _coord(data["x"], keys["x"][1], "x", p) if "x" in data else None
    y = _coord(data["y"], keys["y"][1], "y", p) if "y" in data else None
    score = 1.0
    if "score" in data:
        s = _coord(data["score"], keys["score"][1], "score", p)
        if s is not None and not 0 < s <= 1:
            p.add(keys["score"][1], f"score must be in (0, 1], got {s}")
            s = None
        score = s if s is not None else score
        ok = ok and s is not None
    if not ok or frame is None or joint is None or x is None or y is None:
        return None
    return Override(frame, joint, x, y, score, line=node.start_mark.line + 1)


def _parse_span(
    kind: str, data: dict, node: yaml.MappingNode, n_frames: int, p: _Problems
) -> FrameSpan | None:
    keys = _key_nodes(node)
    if len(keys) != 1:
        extra = [k for k in keys if k != kind]
        p.add(keys[extra[0]][0], f"unknown key {extra[0]!r} next to {kind!r} (one action per item)")
        return None
    knode, vnode = keys[kind]
    value = data[kind]
    if not isinstance(value, list) or len(value) != 2:
        p.add(vnode, f"{kind} takes two frame numbers [first, last], got {value!r}")
        return None
    first = _frame(value[0], vnode.value[0], n_frames, f"{kind} first frame", p)
    last = _frame(value[1], vnode.value[1], n_frames, f"{kind} last frame", p)
    if first is None or last is None:
        return None
    if first > last:
        p.add(vnode, f"{kind} range [{first}, {last}] runs backwards")
        return None
    if kind == "interpolate" and first == 0 and last == n_frames - 1:
        p.add(vnode, "interpolate needs at least one good frame outside the range")
        return None
    return FrameSpan(kind, first, last, line=knode.start_mark.line + 1)


def parse(text: str, n_frames: int, *, source: str = "corrections") -> Corrections:
    """Parse and validate a correction file against a reference of ``n_frames`` frames.

    Raises BadInput listing every problem as ``SOURCE line N: ...``.
    """
    p = _Problems(source)
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except (ValueError, IndexError, TypeError, RecursionError) as e:
        # PyYAML's constructors raise these for a bad explicit tag or absurd nesting.
        raise BadInput(
            f"{source}: malformed YAML: {str(e).strip()[:200] or type(e).__name__}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadInput(
            f"{source} line {mark.line + 1 if mark else '?'}: malformed YAML: {problem}"
        ) from None
    if root is None or data is None or data == []:
        raise BadInput(f"{source}: contains no corrections")
    if not isinstance(data, list) or not isinstance(root, yaml.SequenceNode):
        raise BadInput(
            f"{source} line {root.start_mark.line + 1}: expected a list of corrections "
            "(- {frame: .., joint: .., x: .., y: ..} / - interpolate: [a, b] / - drop: [a, b])"
        )
    out = Corrections()
    for item, node in zip(data, root.value, strict=True):
        if not isinstance(item, dict) or not isinstance(node, yaml.MappingNode):
            p.add(node, f"expected a correction mapping, got {item!r}")
            continue
        if "frame" in item:
            o = _parse_override(item, node, n_frames, p)
            if o is not None:
                out.overrides.append(o)
        elif "interpolate" in item or "drop" in item:
            kind = "interpolate" if "interpolate" in item else "drop"
            s = _parse_span(kind, item, node, n_frames, p)
            if s is not None:
                out.spans.append(s)
        else:
            keys = ", ".join(map(str, item)) or "nothing"
            p.add(
                node,
                f"unknown correction with keys {keys}; expected frame/joint/x/y, interpolate or drop",
            )
    _check_conflicts(out, n_frames, p)
    p.raise_if_any()
    return out


def _check_conflicts(c: Corrections, n_frames: int, p: _Problems) -> None:
    seen: dict[tuple[int, str], int] = {}
    for o in c.overrides:
        key = (o.frame, o.joint)
        if key in seen:
            p.add(None, f"{o.joint} of frame {o.frame} is already set on line {seen[key]}", o.line)
        seen.setdefault(key, o.line)
        for s in c.spans:
            if s.first <= o.frame <= s.last:
                p.add(
                    None,
                    f"frame {o.frame} is overridden but also in {s.kind} [{s.first}, {s.last}] "
                    f"on line {s.line}",
                    o.line,
                )
    # Interpolations anchor on the frames around them, so two that overlap or touch would
    # depend on which runs first: one range says what is meant.
    spans = sorted(c.interpolations, key=lambda s: (s.first, s.last))
    for a, b in zip(spans, spans[1:], strict=False):
        if b.first <= a.last + 1:
            p.add(
                None,
                f"interpolate [{b.first}, {b.last}] overlaps or touches interpolate "
                f"[{a.first}, {a.last}] on line {a.line}; write them as one range "
                f"[{a.first}, {max(a.last, b.last)}]",
                b.line,
            )
    dropped = np.zeros(n_frames, dtype=bool)
    for s in c.drops:
        dropped[s.first : s.last + 1] = True
    if dropped.all():
        line = max(s.line for s in c.drops)
        p.add(None, "the drops remove every frame of the reference", line)


def apply(poses: np.ndarray, corrections: Corrections) -> tuple[np.ndarray, np.ndarray]:
    """Apply corrections to ``poses`` (N, 23, 3).

    Returns ``(corrected, kept)``: the corrected poses without dropped frames, and
    for each kept frame its index in ``poses``.
    """
    out = np.array(poses, dtype=np.float32, copy=True)
    n = len(out)
    for o in corrections.overrides:
        out[o.frame, sk.INDEX[o.joint]] = (o.x, o.y, o.score)
    for s in corrections.interpolations:
        before, after = s.first - 1, s.last + 1
        if before < 0:  # no frame before: hold the first good frame
            out[s.first : s.last + 1] = out[after]
        elif after >= n:
            out[s.first : s.last + 1] = out[before]
        else:
            t = (np.arange(s.first, s.last + 1) - before) / (after - before)
            a, b = out[before], out[after]
            lerp = a[None] + t[:, None, None] * (b - a)[None]
            # A joint missing at either anchor stays missing: inventing it is worse.
            lerp[:, :, 2] = np.minimum(a[:, 2], b[:, 2])[None]
            out[s.first : s.last + 1] = lerp
    keep = np.ones(n, dtype=bool)
    for s in corrections.drops:
        keep[s.first : s.last + 1] = False
    kept = np.flatnonzero(keep)
    return out[kept], kept


def touched_frames(corrections: Corrections, n_frames: int) -> np.ndarray:
    """A (n_frames,) mask of frames an override or interpolation fixed."""
    mask = np.zeros(n_frames, dtype=bool)
    for o in corrections.overrides:
        mask[o.frame] = True
    for s in corrections.interpolations:
        mask[s.first : s.last + 1] = True
    return mask


def template(flagged: np.ndarray, *, name: str, version: int) -> str:
    """A starting correction file: one commented ``interpolate`` per run of flagged frames."""
    lines = [
        f"# Corrections for reference {name!r} v{version}. Uncomment or edit, then run:",
        f"#   booth reference correct {name} THIS_FILE",
        "# Items: - {frame: N, joint: NAME, x: PX, y: PX} | - interpolate: [A, B] | - drop: [A, B]",
    ]
    idx = np.flatnonzero(np.asarray(flagged, dtype=bool))
    runs: list[tuple[int, int]] = []
    for i in idx.tolist():
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    for a, b in runs:
        lines.append(f"# - interpolate: [{a}, {b}]   # flagged by the glitch detector")
    if not runs:
        lines.append("# (the glitch detector flagged no frames)")
    return "\n".join(lines) + "\n"
