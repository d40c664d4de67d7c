"""The agent checks its pose backend at start-up: it refuses to start without pose, says why.

``booth agent`` runs as a real process here (the entry point the board's container
runs). No Coral exists on this machine, so its delegate really fails to load; the
in-process tests that need a board *with* a Coral fake only ``load_delegate``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, CaptureConfig, CpuPose, EdgeTpuPose, SyntheticSource
from edge_agent.errors import BadInput, DeviceError
from edge_agent.pose import litert

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
# Long enough for a slow CI box to import and start; an agent that does not refuse
# runs until killed, so this bounds the test rather than making it pass.
PROCESS_TIMEOUT_S = 60


def _yaml(tmp_path: Path, model: Path, *, fallback: bool, extra: str = "") -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "agent:\n"
        "  source: {type: synthetic, size: 160x120, fps: 30}\n"
        "  pose:\n"
        "    type: edgetpu\n"
        f"    model: {model}\n"
        f"    fallback_to_cpu: {str(fallback).lower()}\n"
        f"    cpu: {{type: cpu, models_dir: {MODELS}, threads: 1}}\n"
        f"  capture: {{out_dir: {tmp_path / 'takes'}, min_free_disk_mb: 0}}\n"
        "  uplink:\n"
        "    address: 127.0.0.1:1\n"
        "    token: a-real-looking-token-for-this-test\n"
        f"    spool_dir: {tmp_path / 'spool'}\n" + extra
    )
    return cfg


def _booth_agent(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cloud_trainer.cli", "agent", "--config", str(cfg), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int | None, str]:
    """Exit code and stderr; None as the code if the agent kept running (it is then killed)."""
    try:
        _, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err


@pytest.mark.parametrize("mode", [["--offline"], [], ["--take-seconds", "1"]])
def test_booth_agent_refuses_to_start_without_the_edgetpu_model_when_fallback_is_off(
    tmp_path, mode
):
    model = tmp_path / "opt-models" / "movenet_thunder_edgetpu.tflite"
    code, err = _finish(_booth_agent(_yaml(tmp_path, model, fallback=False), *mode))
    assert code is not None, f"the agent started without pose; stderr:\n{err}"
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("booth agent:")]
    assert line.startswith("booth agent: cannot start pose backend edgetpu: ")
    assert f"EdgeTPU model file {model} not found" in line and "pose.model" in line
    assert not (tmp_path / "takes").exists() or not any((tmp_path / "takes").iterdir())


def test_booth_agent_refuses_to_start_when_the_edgetpu_does_not_load_and_fallback_is_off(
    tmp_path,
):
    # A readable TFLite file passes the model check; the delegate is what fails here.
    cfg = _yaml(tmp_path, MODELS / "pose_detection.tflite", fallback=False)
    code, err = _finish(_booth_agent(cfg, "--offline"))
    assert code == 2, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("booth agent:")]
    assert "cannot start pose backend edgetpu: EdgeTPU usb:0: cannot load delegate" in line
    assert "libedgetpu.so.1" in line


def _http_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except (urllib.error.URLError, ConnectionError):
        return None


def test_booth_agent_with_fallback_starts_on_cpu_and_its_status_says_why(tmp_path, get_free_port):
    port = get_free_port()
    model = tmp_path / "movenet_thunder_edgetpu.tflite"
    cfg = _yaml(tmp_path, model, fallback=True, extra=f"  status_port: {port}\n")
    proc = _booth_agent(cfg, "--offline")
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        status = None
        # Polls a process starting up (not a sleep to win a race): the port opens when it is up.
        while status is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            status = _http_json(f"http://127.0.0.1:{port}/status")
            if status is None:
                time.sleep(0.05)
        assert status is not None, "the agent never served its status"
        assert status["pose_backend"] == "cpu"
        (warning,) = [w for w in status["warnings"] if "edgetpu unavailable" in w]
        assert "running the cpu backend" in warning and f"{model} not found" in warning
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
        assert code == 0, err
        assert f"{model} not found" in err  # the log says it too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _agent_config(tmp_path: Path, pose) -> AgentConfig:
    return AgentConfig(
        source=SyntheticSource(size=(160, 120), fps=30),
        pose=pose,
        capture=CaptureConfig(out_dir=tmp_path / "takes", segment_s=0.25, min_free_disk_mb=0),
    )


def test_agent_on_a_board_with_a_coral_but_no_model_runs_cpu_pose_in_its_takes(
    tmp_path, monkeypatch
):
    loaded: list[str] = []

    def coral(library: str, options: dict[str, str]) -> object:  # the only fake: the device
        loaded.append(options["device"])
        return object()

    monkeypatch.setattr(litert, "load_delegate", coral)
    model = tmp_path / "movenet_thunder_edgetpu.tflite"
    pose = EdgeTpuPose(model=model, fallback_to_cpu=True, cpu=CpuPose(models_dir=MODELS, threads=1))
    agent = Agent(_agent_config(tmp_path, pose), status_interval_s=60).start()
    try:
        status = agent.status()
        assert status["pose_backend"] == "cpu" and status["state"] == "idle"
        assert any(f"{model} not found" in w for w in status["warnings"])
        summary = agent.start_take("s-1", 0.5).wait(60)
        assert summary.pose["backend"] == "cpu" and summary.pose["coverage"] == 1.0
        # Each take says so too: the Coral may have gone since the agent started.
        assert any("running the cpu backend" in w for w in summary.warnings)
    finally:
        agent.close()
    assert loaded == [], "no delegate is loaded for a model that is not there"


def test_when_the_cpu_fallback_cannot_start_either_both_causes_are_named(tmp_path):
    pose = EdgeTpuPose(
        model=tmp_path / "movenet_edgetpu.tflite",
        fallback_to_cpu=True,
        cpu=CpuPose(models_dir=tmp_path / "no-models"),
    )
    agent = Agent(_agent_config(tmp_path, pose))
    with pytest.raises(BadInput) as refused:
        agent.start()
    message = str(refused.value)
    assert "edgetpu unavailable (" in message and "movenet_edgetpu.tflite" in message
    assert "the cpu fallback cannot start either: model file" in message


def test_agent_start_refuses_a_cpu_backend_whose_models_are_missing(tmp_path):
    agent = Agent(_agent_config(tmp_path, CpuPose(models_dir=tmp_path / "no-models")))
    with pytest.raises(BadInput, match="cannot start pose backend cpu: model file .* not found"):
        agent.start()


def test_agent_start_refuses_with_the_delegate_cause_when_fallback_is_off(tmp_path):
    pose = EdgeTpuPose(model=MODELS / "pose_detection.tflite", fallback_to_cpu=False)
    agent = Agent(_agent_config(tmp_path, pose))
    with pytest.raises(DeviceError, match="EdgeTPU usb:0: cannot load delegate libedgetpu.so.1"):
        agent.start()


def test_a_board_registers_the_pose_backend_it_runs_not_the_one_it_was_told_to_try(tmp_path):
    from edge_agent.connected import capabilities

    cfg = _agent_config(tmp_path, EdgeTpuPose(devices=["usb:0", "usb:1"]))
    fell_back = capabilities(cfg, running="cpu")
    assert list(fell_back.pose_backends) == ["cpu"] and fell_back.edgetpu_count == 0
    coral = capabilities(cfg, running="edgetpu")
    assert list(coral.pose_backends) == ["edgetpu"] and coral.edgetpu_count == 2
    unknown = capabilities(cfg)  # not started yet: what the config allows
    assert list(unknown.pose_backends) == ["edgetpu", "cpu"]
    assert (unknown.max_width, unknown.max_height, unknown.max_fps) == (160, 120, 30.0)
