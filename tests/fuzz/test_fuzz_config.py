"""Fuzzing the booth's YAML config: any file loads, or is refused with a message naming a key.

A config is the first thing an operator touches and the last thing that should
print a traceback. Properties:
- any text (random, or YAML-shaped) gives a ``BoothConfig`` or a ``ConfigError``;
- any mutation of a valid config (a value replaced, a key removed or added, a
  backend ``type`` changed) gives one or the other, and the error names the
  section that was changed;
- a secret still set to its placeholder makes ``refuse_placeholders`` (and so
  the services) refuse to start, however it is spelled.

Files that crashed the loader before are kept as regression cases.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzz_settings import fuzz_marks, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from cloud_trainer.config import (
    BoothConfig,
    load_config,
    placeholder_secrets,
    refuse_placeholders,
)
from edge_agent.config import PLACEHOLDER_SECRETS, AgentConfig, ConfigError, load_agent_config

pytestmark = fuzz_marks()

ROOT = Path(__file__).resolve().parents[2]

# ---- strategies ------------------------------------------------------------------------------

# Valid whole-file templates, one per backend of each union, so every model gets mutated.
_BASE = BoothConfig().model_dump(mode="json")
_VARIANTS: dict[str, dict[str, Any]] = {
    "storage": {"type": "gcs", "bucket": "b", "project": "p", "endpoint": None},
    "database": {"type": "postgres", "url": "postgresql+psycopg://u@h/db", "db_schema": None},
    "queue": {"type": "pubsub", "project": "p", "topic": "t", "subscription": "s"},
    "mail": {"type": "smtp", "host": "smtp.example.org", "username": "u", "password": "pw"},
}


def _templates() -> list[dict[str, Any]]:
    out = [copy.deepcopy(_BASE)]
    for section, value in _VARIANTS.items():
        t = copy.deepcopy(_BASE)
        t[section] = value
        out.append(t)
    t = copy.deepcopy(_BASE)
    t["agent"]["pose"] = {"type": "edgetpu", "devices": ["usb:0"], "cpu": {"threads": 1}}
    t["agent"]["source"] = {"type": "file", "path": "take.mp4", "rate": "max"}
    t["ingest"]["agents"] = [{"camera_id": "cam0", "token_sha256": "0" * 64}]
    t["web"]["staff"] = [
        {
            "username": "staff",
            "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        }
    ]
    out.append(t)
    return out


TEMPLATES = _templates()


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a nested dict/list, the root excluded."""
    out: list[tuple] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | _text
    | st.sampled_from(["640x480", "0x0", "-2x4", "synthetic", "gcs", "changethis", "", "  "])
)
VALUES = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=10,
)

# Fragments YAML files are made of (and that break them): structure, tags, anchors,
# env references, the real section and key names.
_KEYS = sorted({str(p[-1]) for t in TEMPLATES for p in _paths(t) if isinstance(p[-1], str)})
_TOKENS = [
    "\n",
    "  ",
    "\t",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "'",
    '"',
    "#",
    "&a ",
    "*a",
    "<<: ",
    "!!int ",
    "!!str ",
    "!!binary ",
    "!!python/object:os.system ",
    "? ",
    "|\n",
    ">-\n",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "${HOME}",
    "${NO_SUCH_BOOTH_VAR}",
    "${NO_SUCH_BOOTH_VAR:-changethis}",
    "~",
    "null",
    "yes",
    "off",
    ".inf",
    "-.inf",
    ".nan",
    "0x1F",
    "0o17",
    "1e3",
    "1_000",
    "2024-01-01",
    "640x480",
    "type",
    "synthetic",
    "gcs",
    "\x00",
    "\ufeff",
    "\u2028",
]
YAML_TEXT = st.lists(st.sampled_from(_TOKENS) | st.sampled_from(_KEYS) | _text, max_size=40).map(
    "".join
)
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=300) | YAML_TEXT


# ---- bugs this found, kept as regression cases --------------------------------------------------------------------------------


# Files that once crashed the loader (found by this suite): each must now be a ConfigError.
ONCE_CRASHED = {
    # PyYAML's constructors: an empty or non-numeric explicit int tag.
    "empty !!int": b"booth:\n  countdown_s: !!int\n",
    "!!int of a word": b"booth:\n  countdown_s: !!int three\n",
    # _parse_size: int(None) raised TypeError, int(inf) OverflowError, past pydantic.
    "size with a null": b"agent:\n  source: {type: synthetic, size: [~, 480]}\n",
    "size with infinity": b"agent:\n  source: {type: v4l2, size: [.inf, 480]}\n",
    # PyYAML's int() of a 5000-digit number raises ValueError (Python's digit limit).
    "5000-digit number": b"agent:\n  status_port: " + b"1" * 5000 + b"\n",
    # PyYAML recurses once per nesting level: RecursionError.
    "1000 nested lists": b"[" * 1000,
    # A config saved as Latin-1 (a text editor's choice): UnicodeDecodeError.
    "latin-1 file": "booth:\n  name: caf\xe9\n".encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(ONCE_CRASHED))
def test_a_file_that_once_crashed_the_loader_is_a_config_error(name: str, tmp_path: Path) -> None:
    path = tmp_path / "booth.yaml"
    path.write_bytes(ONCE_CRASHED[name])
    with pytest.raises(ConfigError) as e:
        load_config(path)
    _check_error(e.value, path)


# ---- properties --------------------------------------------------------------------------------

# "key: problem". Keys are printed as written, so a key holding a line break spans lines
# (cosmetic, reported); only the first problem line is checked for its shape.
_ERROR_KEY = re.compile(r"^(<root>|.+?): \S", re.DOTALL)


def _check_error(err: ConfigError, path: Path) -> str:
    msg = str(err)
    assert msg.strip(), "an empty error message"
    head, _, problems = msg.partition("\n")
    assert head.startswith(str(path)), f"the error does not say which file: {msg!r}"
    if head.endswith(": invalid:"):
        assert _ERROR_KEY.match(problems), f"the first problem names no key: {problems!r}"
    else:
        assert not problems, f"a one-line error expected: {msg!r}"
    return msg


def _load(path: Path) -> BoothConfig | str:
    """The config, or the text of its ConfigError (any other exception fails the test)."""
    try:
        cfg = load_config(path)
    except ConfigError as e:
        return _check_error(e, path)
    assert isinstance(cfg, BoothConfig)
    return cfg


@fuzz_settings(share=1.0)
@given(text=ANY_TEXT)
def test_any_text_loads_or_is_refused_with_a_config_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "booth.yaml"
    path.write_text(text, encoding="utf-8")
    _load(path)
    try:
        agent = load_agent_config(path)
    except ConfigError as e:
        _check_error(e, path)
    else:
        assert isinstance(agent, AgentConfig)


@st.composite
def mutated_configs(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple]]:
    data = copy.deepcopy(draw(st.sampled_from(TEMPLATES)))
    touched: list[tuple] = []
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for step in path[:-1]:
            parent = parent[step]
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add_key", "type"]))
        if kind == "replace":
            parent[path[-1]] = draw(VALUES)
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "add_key" and isinstance(parent, dict):
            key = draw(st.sampled_from(_KEYS) | _text.filter(bool))
            parent[key] = draw(VALUES)
            path = (*path[:-1], key)
        elif isinstance(parent, dict) and "type" in parent:
            parent["type"] = draw(st.sampled_from(["local", "gcs", "sqlite", "smtp", "", "x"]))
        else:
            parent[path[-1]] = draw(VALUES)
        touched.append(path)
    return data, touched


@fuzz_settings(share=1.0)
@given(mutation=mutated_configs())
def test_a_mutated_config_loads_or_names_the_section_that_changed(
    mutation: tuple[dict[str, Any], list[tuple]], tmp_path: Path
) -> None:
    data, touched = mutation
    path = tmp_path / "booth.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    result = _load(path)
    if isinstance(result, str) and len(touched) == 1 and "malformed YAML" not in result:
        section = str(touched[0][0])
        assert section in result, f"the error does not name {section!r}: {result!r}"


# ---- placeholder secrets --------------------------------------------------------------------------

_placeholder = st.tuples(
    st.sampled_from(sorted(PLACEHOLDER_SECRETS)),
    st.sampled_from(["", " ", "\t", "\n", "\u00a0"]),
    st.booleans(),
).map(lambda t: f"{t[1]}{t[0].upper() if t[2] else t[0]}{t[1]}")
_real_secret = st.text(st.characters(exclude_categories=["Cs", "Zs", "Cc"]), min_size=1).filter(
    lambda s: s.strip().lower() not in PLACEHOLDER_SECRETS
)


@fuzz_settings(share=1.0)
@given(
    web=_placeholder | _real_secret,
    token=_placeholder | _real_secret,
    password=_placeholder | _real_secret,
)
def test_a_placeholder_secret_refuses_to_start_however_it_is_spelled(
    web: str, token: str, password: str
) -> None:
    cfg = BoothConfig(
        web={"secret_key": web},
        agent={"uplink": {"token": token}},
        mail={"type": "smtp", "username": "booth", "password": password},
    )
    expected = {
        key
        for key, value in (
            ("web.secret_key", web),
            ("agent.uplink.token", token),
            ("mail.password", password),
        )
        if value.strip().lower() in PLACEHOLDER_SECRETS
    }
    services = ("web", "agent", "mail")
    assert set(placeholder_secrets(cfg, services=services)) == expected
    if expected:
        with pytest.raises(ConfigError, match="refusing to start") as e:
            refuse_placeholders(cfg, services)
        assert all(key in str(e.value) for key in expected)
        assert "\n" not in str(e.value)
    else:
        refuse_placeholders(cfg, services)


@fuzz_settings(share=1.0)
@given(token=_placeholder | _real_secret)
def test_the_agent_refuses_a_placeholder_uplink_token(token: str) -> None:
    from edge_agent.connected import check_token

    cfg = AgentConfig(uplink={"token": token})
    if token.strip().lower() in PLACEHOLDER_SECRETS:
        with pytest.raises(ConfigError, match="agent.uplink.token"):
            check_token(cfg)
    else:
        check_token(cfg)


@pytest.mark.parametrize("placeholder", ["changethis", "changeme"])
def test_ingest_refuses_to_start_with_a_placeholder_agent_token(
    placeholder: str, tmp_path: Path
) -> None:
    import hashlib

    from cloud_trainer.ingest.server import serve

    cfg = BoothConfig(
        ingest={
            "port": 0,
            "agents": [
                {
                    "camera_id": "cam0",
                    "token_sha256": hashlib.sha256(placeholder.encode()).hexdigest(),
                }
            ],
        },
        storage={"type": "local", "root": str(tmp_path / "blobs")},
        database={"type": "sqlite", "path": str(tmp_path / "booth.db")},
    )
    with pytest.raises(ConfigError, match="placeholder"):
        serve(cfg)


def test_a_placeholder_from_an_env_default_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "booth.yaml"
    path.write_text("web:\n  secret_key: ${NO_SUCH_BOOTH_SECRET:-changethis}\n")
    with pytest.raises(ConfigError, match="web.secret_key"):
        refuse_placeholders(load_config(path), ("web",))


def test_booth_serve_with_a_placeholder_secret_exits_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "booth.yaml"
    path.write_text(
        "web:\n  secret_key: changethis\n"
        f"database:\n  type: sqlite\n  path: {tmp_path / 'booth.db'}\n"
        f"storage:\n  type: local\n  root: {tmp_path / 'blobs'}\n"
        f"queue:\n  type: sqlite\n  path: {tmp_path / 'queue.db'}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "cloud_trainer.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert "web.secret_key" in r.stderr and "refusing to start" in r.stderr
