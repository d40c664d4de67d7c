import os
import subprocess
import sys

import pytest

from cloud_trainer.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cloud_trainer.cli", *args], capture_output=True, text=True
    )


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in ("config", "synth"):
        assert name in r.stdout


def test_unknown_command_is_one_line_error():
    r = run_cli("dance-off")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_config_example_prints_yaml(capsys):
    assert main(["config", "example"]) == 0
    assert "storage:" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["config", "validate", "/nonexistent/booth.yaml"]])
def test_bad_files_give_one_line_errors(cmd):
    r = run_cli(*cmd)
    assert r.returncode == 2
    assert "no such file" in r.stderr and "Traceback" not in r.stderr


def _validate(tmp_path, yaml_text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "booth.yaml"
    path.write_text(yaml_text)
    return run_cli("config", "validate", str(path))


def test_a_base_checkpoint_in_the_configured_bucket_may_be_named_by_its_gs_url(tmp_path):
    from cloud_trainer.config import load_config

    gcs = "storage:\n  type: gcs\n  bucket: booth-bucket\n"
    path = tmp_path / "booth.yaml"
    path.write_text(gcs + "trainer:\n  base_checkpoint: gs://booth-bucket/base/booth-1/\n")
    assert load_config(path).trainer.base_checkpoint == "blob:base/booth-1"
    # Another bucket (or scheme) is nowhere a worker reads from: said at start-up.
    r = _validate(tmp_path, gcs + "trainer:\n  base_checkpoint: gs://elsewhere/base/booth-1\n")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "read bases only from the gcs bucket 'booth-bucket'" in r.stderr
    assert "blob:<prefix>" in r.stderr


@pytest.mark.parametrize("given", ["flag", "env"])
def test_a_database_that_cannot_be_reached_is_one_line_not_a_traceback(tmp_path, given):
    from smtp_capture import free_port

    path = tmp_path / "booth.yaml"
    url = f"postgresql+psycopg://booth:wrong@127.0.0.1:{free_port()}/booth?connect_timeout=5"
    path.write_text(f"database:\n  type: postgres\n  url: {url}\n")
    if given == "flag":
        r = run_cli("staff", "logout", "ada", "--config", str(path))
    else:  # in a container: BOOTH_CONFIG names the booth's file, not the embedded defaults
        env = {**os.environ, "BOOTH_CONFIG": str(path)}
        r = subprocess.run(
            [sys.executable, "-m", "cloud_trainer.cli", "staff", "logout", "ada"],
            capture_output=True,
            text=True,
            env=env,
        )
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "the database cannot be reached or refused the login" in r.stderr
    assert "wrong" not in r.stderr  # the password in the URL
