"""Schemathesis against the web app's OpenAPI, logged in as staff: does any request crash it?

``run_api_fuzz(max_examples)`` builds the app on a throwaway SQLite database and
local blob store (or the database config given), logs in (cookie + CSRF
header), and for every operation of ``/openapi.json`` sends ``max_examples``
schema-valid and ``max_examples`` schema-violating requests. The attendee pages
also get the token of a real delivered session, so their Range handling is
reached. A status, JSON body, content type or required header that the OpenAPI
does not document for the operation counts as a schema violation
(``undocumented_statuses`` also lists the statuses by operation). It returns
counts; it never raises for what it finds::

    {"requests": 2040, "server_errors": 0, "schema_violations": 0,
     "failures": [...curl reproducers...], "statuses": {"200": ..}, ...}

Used by ``tests/fuzz/test_fuzz_api.py`` and by ``bench/chaos.py`` (as
``server_crashes_under_fuzz``). Runnable alone::

    .venv/bin/python tests/fuzz/api_fuzz.py --examples 100
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "tests"):  # when run as a script or imported by bench/
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

log = logging.getLogger(__name__)

# The checks whose verdicts count: no 5xx, and every status, body, content type and
# required header the app sends is one its OpenAPI documents for that operation.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "response_schema_conformance",
    "content_type_conformance",
    "response_headers_conformance",
)


@dataclass
class FuzzReport:
    requests: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    undocumented_statuses: collections.Counter = field(default_factory=collections.Counter)
    operations: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "server_errors": self.server_errors,
            "schema_violations": self.schema_violations,
            "failures": self.failures[:50],
            "statuses": dict(sorted(self.statuses.items())),
            "undocumented_statuses": dict(sorted(self.undocumented_statuses.items())),
            "operations": self.operations,
        }


@dataclass
class FuzzTarget:
    """The app under fuzz and what a staff member's browser holds."""

    app: Any
    repo: Any
    store: Any
    cookie: str
    csrf: str
    token: str  # a delivered session's attendee link


def _log_in(app: Any) -> tuple[str, str]:
    """(session cookie, CSRF token) of a fresh staff login."""
    from fastapi.testclient import TestClient
    from staff_app import log_in

    with TestClient(app) as client:
        csrf = log_in(client)
        return client.cookies["booth_session"], csrf


@contextlib.contextmanager
def fuzz_target(tmp_dir: Path | None = None, database: Any = None) -> Iterator[FuzzTarget]:
    """The app built by ``tests/staff_app.py`` (SQLite unless ``database`` is given), logged in."""
    from staff_app import build_app, delivered_session, staff_settings

    with contextlib.ExitStack() as stack:
        if tmp_dir is None:
            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="api-fuzz-")))
        tmp_dir.mkdir(parents=True, exist_ok=True)
        # Schema-valid logins with random passwords would lock the fuzzer's own account out.
        settings = staff_settings(tmp_dir, database, login_attempts_per_minute=10**9)
        booth = build_app(settings)
        stack.callback(booth.repo.close)
        cookie, csrf = _log_in(booth.app)
        _, token = delivered_session(booth.repo, booth.store)
        yield FuzzTarget(booth.app, booth.repo, booth.store, cookie, csrf, token)


def _checks() -> list[Callable]:
    import schemathesis.checks as core
    import schemathesis.specs.openapi.checks as openapi

    return [getattr(core, n, None) or getattr(openapi, n) for n in CHECKS]


def _one_request(
    target: FuzzTarget, op: Any, report: FuzzReport, checks: list[Callable]
) -> Callable[[Any], None]:
    """Send one generated case, count what came back, record crashes and schema violations."""
    from schemathesis.core.failures import FailureGroup

    headers = {"X-CSRF-Token": target.csrf}
    cookies = {"booth_session": target.cookie}
    documented = set(op.responses.status_codes)

    def one(case: Any) -> None:
        try:
            response = case.call(headers=headers, cookies=cookies)
        except Exception as e:  # the ASGI app raised: a crash, as a 500 would be
            report.requests += 1
            report.server_errors += 1
            report.failures.append(f"{op.method.upper()} {op.path}: raised {e!r}")
            return
        report.requests += 1
        status = response.status_code
        report.statuses[str(status)] += 1
        if str(status) not in documented:
            report.undocumented_statuses[f"{op.method.upper()} {op.path} {status}"] += 1
        if status >= 500:
            report.server_errors += 1
            report.failures.append(f"{status}: {case.as_curl_command(headers=headers)}")
        elif status == 201 and op.path == "/api/sessions":
            # Keep the database small, or listing today's sessions slows every run.
            with contextlib.suppress(Exception):
                target.repo.delete_session_rows(response.json()["id"])
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as e:  # what the checks found
            if status >= 500:
                return  # counted above, with its reproducer
            report.schema_violations += 1
            report.failures.append(f"schema: {str(e)[:600]}")

    return one


def _negatable(op: Any, fixed: dict[str, str]) -> bool:
    """Whether schemathesis can make invalid data: a body or a typed query parameter (every
    path and header parameter here is a free string, so no value of them is invalid)."""
    return bool(list(op.body)) or any(p.name not in fixed for p in op.query)


def fuzz_operations(
    target: FuzzTarget, max_examples: int, report: FuzzReport, *, seed: int | None = None
) -> None:
    """Every operation, positive then negative data; the attendee pages also with a real token."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    checks = _checks()
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in schema.get_all_operations():
        op = result.ok()
        fixed_paths: list[dict[str, str] | None] = [None]
        if op.path.startswith("/v/{token}") and op.method.upper() == "GET":
            fixed_paths.append({"token": target.token})
        for mode in modes:
            for path_parameters in fixed_paths:
                if mode == schemathesis.GenerationMode.NEGATIVE and not _negatable(
                    op, path_parameters or {}
                ):
                    continue  # nothing to make invalid: no body, every parameter fixed
                report.operations += 1
                strategy = op.as_strategy(
                    generation_mode=mode, path_parameters=path_parameters or None
                )

                run = settings(
                    max_examples=max_examples,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(given(case=strategy)(_one_request(target, op, report, checks)))
                if seed is not None:
                    run = hypothesis_seed(seed)(run)
                try:
                    run()
                except Unsatisfiable:  # schemathesis found no way to break this one
                    log.debug("no %s data for %s %s", mode.value, op.method, op.path)
                    report.operations -= 1


def run_api_fuzz(
    max_examples: int = 50,
    *,
    tmp_dir: Path | None = None,
    database: Any = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Fuzz the app; ``server_errors`` is how many requests got a 5xx (the goal is 0)."""
    report = FuzzReport()
    with fuzz_target(tmp_dir, database) as target:
        fuzz_operations(target, max_examples, report, seed=seed)
    log.info(
        "api fuzz: %d requests, %d server errors, %d schema violations",
        report.requests,
        report.server_errors,
        report.schema_violations,
    )
    return report.as_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=50, help="examples per operation and mode")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run_api_fuzz(args.examples, seed=args.seed)
    print(json.dumps(result))
    return 1 if result["server_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
