"""The booth config is strict: every mistake names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_trainer.commands.config import EXAMPLE
from cloud_trainer.config import BoothConfig, load_config, refuse_placeholders
from edge_agent.config import ConfigError, load_agent_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "booth.yaml"
    p.write_text(text)
    return p


def test_example_config_is_valid_and_matches_defaults(tmp_path):
    cfg = load_config(write(tmp_path, EXAMPLE))
    assert cfg.model_dump() == BoothConfig().model_dump()


def test_empty_file_gives_embedded_defaults(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert (
        cfg.storage.type == "local" and cfg.queue.type == "sqlite" and cfg.database.type == "sqlite"
    )


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("agent:\n  pose:\n    type: cpu\n    thread: 2\n", "agent.pose.thread: unknown key"),
        ("trainer:\n  budget_s: -5\n", "trainer.budget_s:"),
        ("storage:\n  type: s3\n", "storage.type: unknown type 's3'"),
        ("agent:\n  source:\n    type: synthetic\n    size: 0x0\n", "agent.source.size:"),
        ("agent:\n  source:\n    type: synthetic\n    fps: -1\n", "agent.source.fps:"),
        ("web:\n  staff:\n    - username: a\n", "web.staff.0.password_hash: Field required"),
        ("nonsense: 1\n", "nonsense: unknown key"),
        (
            "agent:\n  zone:\n    polygon: [[0, 0], [640, 0], [640, 480]]\n",
            "agent.zone.polygon: points are fractions of the frame",
        ),
        (
            "agent:\n  zone:\n    floor_polygon: [[0, 0], [0.5, 0.5], [1, 1]]\n",
            "agent.zone.floor_polygon: the points enclose no area",
        ),
        # Ids name folders and keys, and PostgreSQL keeps 64 characters of them.
        ("booth:\n  id: booth one\n", "booth.id: 'booth one' cannot be an id: use up to 64"),
        (f"agent:\n  camera_id: {'c' * 65}\n", "agent.camera_id: 'ccc"),
        (
            "ingest:\n  agents:\n    - camera_id: ../cam\n      token_sha256: " + "0" * 64 + "\n",
            "ingest.agents.0.camera_id: '../cam' cannot be an id",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, yaml_text))
    assert expected in str(err.value)


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line \d+ column \d+: malformed YAML"):
        load_config(write(tmp_path, "a: 1\nb: [\n"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_agent_section_loads_alone_on_a_board(tmp_path):
    p = write(
        tmp_path, "agent:\n  camera_id: cam7\n  source:\n    type: synthetic\n    size: '320x240'\n"
    )
    cfg = load_agent_config(p)
    assert cfg.camera_id == "cam7" and cfg.source.size == (320, 240)


def test_placeholder_secret_refuses_to_start():
    cfg = BoothConfig()
    with pytest.raises(ConfigError, match="web.secret_key"):
        refuse_placeholders(cfg, ("web",))
    cfg.web.secret_key = "a-real-secret-value"
    refuse_placeholders(cfg, ("web",))


def test_cli_validate_exits_nonzero_with_one_line_per_problem(tmp_path):
    p = write(tmp_path, "trainer:\n  label_map: bodypix\n")
    r = subprocess.run(
        [sys.executable, "-m", "cloud_trainer.cli", "config", "validate", str(p)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "trainer.label_map" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "secret",
    ["abc #def", "@leading-at", "%percent", "*star", '"quoted', "a: b", "12345678", "yes", "&x"],
)
def test_a_secret_from_the_environment_arrives_exactly_as_set(tmp_path, monkeypatch, secret):
    """Not read as YAML: no comment cuts it, no character breaks the file, no type changes."""
    from cloud_trainer.config import load_config

    monkeypatch.setenv("BOOTH_SMTP_PASSWORD", secret)
    path = tmp_path / "booth.yaml"
    path.write_text(
        "mail:\n  type: smtp\n  host: smtp.example.org\n"
        "  password: ${BOOTH_SMTP_PASSWORD:-changethis}  # from cloud.env\n"
        "web:\n  port: ${BOOTH_PORT:-8001}\n"
    )
    cfg = load_config(path)
    assert cfg.mail.password == secret
    assert cfg.web.port == 8001  # a number setting still takes its digits


def test_an_unset_variable_names_the_key_that_needs_it(tmp_path, monkeypatch):
    from cloud_trainer.config import load_config

    monkeypatch.delenv("BOOTH_NOT_SET", raising=False)
    path = tmp_path / "booth.yaml"
    path.write_text(
        "# ${BOOTH_NOT_SET} in a comment is no value\nmail:\n  type: smtp\n"
        "  host: smtp.example.org\n  password: ${BOOTH_NOT_SET}\n"
    )
    with pytest.raises(
        ConfigError, match=r"mail\.password: environment variable BOOTH_NOT_SET is not set"
    ):
        load_config(path)


def test_a_misspelt_section_on_a_board_is_refused_not_ignored(tmp_path):
    from edge_agent.config import BOOTH_SECTIONS

    assert set(BoothConfig.model_fields) == BOOTH_SECTIONS
    path = tmp_path / "agent.yaml"
    path.write_text("agnet:\n  camera_id: cam1\n")
    with pytest.raises(ConfigError, match="unknown top-level key.*agnet"):
        load_agent_config(path)
    path.write_text("camera_id: cam1\nbooth_id: booth-1\n")  # the agent's keys, unindented
    with pytest.raises(ConfigError, match="put booth_id, camera_id under agent:"):
        load_agent_config(path)


def test_a_variable_set_empty_takes_the_default_as_in_the_shell(tmp_path, monkeypatch):
    """An env file's ``BOOTH_TIMEZONE=`` line means "not chosen": the default applies,
    as compose and the shell read ``${NAME:-default}``; ``${NAME}`` stays empty."""
    from cloud_trainer.config import load_config

    monkeypatch.setenv("BOOTH_TIMEZONE", "")
    monkeypatch.setenv("BOOTH_METRICS_TOKEN", "")
    path = tmp_path / "booth.yaml"
    path.write_text(
        "booth:\n  timezone: ${BOOTH_TIMEZONE:-Europe/Berlin}\n"
        'web:\n  metrics_token: "${BOOTH_METRICS_TOKEN}"\n'
    )
    cfg = load_config(path)
    assert cfg.booth.timezone == "Europe/Berlin"
    assert cfg.web.metrics_token in ("", None)
