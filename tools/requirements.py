"""Print pyproject.toml's requirements (core plus extras), one per line, for ``pip -r``.

The GPU worker image keeps its base image's CUDA TensorFlow and installs everything
else the project needs from this list, so the image and pyproject cannot drift::

    python tools/requirements.py --extra cloud --without 'tensorflow*'
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def requirement_name(requirement: str) -> str:
    """The distribution name a requirement line starts with (``psycopg[binary]>=3`` -> psycopg)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1).lower()


def requirements(pyproject: Path, extras: list[str], without: list[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"no such extra: {', '.join(unknown)} (have {', '.join(optional)})")
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += optional[extra]
    return [
        line
        for line in lines
        if not any(fnmatch.fnmatch(requirement_name(line), pat.lower()) for pat in without)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra", action="append", default=[], help="an optional-dependencies group")
    p.add_argument(
        "--without", action="append", default=[], metavar="GLOB", help="leave these names out"
    )
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = p.parse_args(argv)
    try:
        lines = requirements(args.pyproject, args.extra, args.without)
    except (OSError, ValueError, KeyError) as e:
        print(f"requirements: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
