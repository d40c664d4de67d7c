"""Project-wide rules a reader can check in seconds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_edge_agent_imports_nothing_from_cloud_trainer():
    offenders = []
    for path in (ROOT / "edge_agent").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(
                node.func, "attr", getattr(node.func, "id", "")
            ) in (
                "import_module",
                "__import__",
            ):
                names = [
                    a.value
                    for a in node.args
                    if isinstance(a, ast.Constant) and isinstance(a.value, str)
                ]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] == "cloud_trainer"
            ]
    assert offenders == []


def test_edge_agent_imports_without_tensorflow_or_cloud_packages():
    # A board has neither TensorFlow nor the cloud extras: importing every edge module must not need them.
    code = (
        "import sys, pkgutil, importlib, edge_agent\n"
        "for m in pkgutil.walk_packages(edge_agent.__path__, 'edge_agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('tensorflow', 'keras', 'fastapi', 'sqlalchemy', 'cloud_trainer') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_ruff_check_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_data_file_the_packages_use_is_installed_with_them():
    """A non-editable install (the Docker images) ships only what package-data names: the
    tablet's scripts were left out once, and with them its polling and double-tap guard."""
    import fnmatch

    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["*"]
    missing = []
    for top in ("edge_agent", "cloud_trainer", "protos"):
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc", ".pyi"):
                continue
            if "__pycache__" in path.parts:
                continue
            package = path.parent
            while not (package / "__init__.py").exists() and package != ROOT / top:
                package = package.parent
            rel = str(path.relative_to(package))
            if not any(fnmatch.fnmatch(rel, g) for g in globs):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
