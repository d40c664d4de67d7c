"""Every chaos scenario against the running booth, plus the API fuzz; one JSON object last.

Runs each scenario of ``tests/chaos/harness.py`` (real ``booth serve``, ``booth
worker`` and agents on loopback, one fault each, the invariants checked after),
grouped by topology so each topology's processes start once:

- standard: SQLite queue with short leases, SMTP capture server, a cuttable link;
- tmpfs:    the agents' spools on small tmpfs mounts (needs root), for the full disk;
- pubsub:   the job queue on Google's Pub/Sub emulator.

The baseline is a session with no fault on the standard topology, run first:
it shows the invariants hold without faults and how long a session takes.
Then ``tests/fuzz/api_fuzz.py`` fuzzes the app's OpenAPI and counts the
requests answered with a 5xx (``server_crashes_under_fuzz``).

    .venv/bin/python bench/chaos.py                      # everything (20-40 minutes)
    .venv/bin/python bench/chaos.py --only smtp_down,double_start --fuzz-examples 0

Keys: scenarios, passed, frames_lost, frames_duplicated, emails_duplicated,
sessions_stuck, server_crashes_under_fuzz (goal: passed == scenarios, others 0),
plus per-scenario details.

``emails_duplicated`` counts emails beyond one per attendee by Message-ID: distinct
messages. A second SMTP transmission of the *same* message is counted apart, in
``smtp_transmissions_repeated``, and not hidden: the scenario
``kill_app_while_emailing_after_accept`` SIGKILLs the sender after the relay accepted
the message and before its sent-log records it. No sender can know whether such a
message went out, so it sends it again with the same Message-ID (at least once,
never zero times); many mail clients show the two as one, some do not. That scenario
is expected to show exactly one repeated transmission; ``..._after_sent_log`` (the
kill after the record, issue 7's case) must show none.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "chaos", ROOT / "tests" / "fuzz"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import harness  # noqa: E402

log = logging.getLogger("bench.chaos")


def _say(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


def _root_conftest() -> Any:
    """tests/conftest.py as a module (its server helpers), without pytest collecting it."""
    spec = importlib.util.spec_from_file_location("booth_test_servers", ROOT / "tests/conftest.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def start_pubsub_emulator(log_dir: Path) -> tuple[Any, str] | str:
    """(server, host) of a fresh Pub/Sub emulator, or the reason it cannot run."""
    servers = _root_conftest()
    launcher = Path(os.environ.get(servers.PUBSUB_EMULATOR_ENV, str(servers.PUBSUB_EMULATOR)))
    if not launcher.exists():
        return f"the Pub/Sub emulator is not installed ({launcher} is absent)"
    if shutil.which("java") is None:
        return "the Pub/Sub emulator needs java, which is not on PATH"
    log_dir.mkdir(parents=True, exist_ok=True)
    server, port = servers._start_on_free_port(
        "pubsub-emulator",
        lambda port: [str(launcher), "--host=127.0.0.1", f"--port={port}"],
        servers._tcp_open,
        log_dir,
    )
    return server, f"127.0.0.1:{port}"


def failed_verdict(name: str, why: str, seconds: float = 0.0) -> harness.Verdict:
    v = harness.Verdict(scenario=name, problems=[why], seconds=seconds)
    return v


def run_topology(
    name: str, scenarios: list[harness.Scenario], parent: Path, *, baseline: bool
) -> tuple[list[harness.Verdict], harness.Verdict | None]:
    verdicts: list[harness.Verdict] = []
    base_verdict = None
    emulator = None
    pubsub_host = None
    if name == "pubsub":
        try:
            started = start_pubsub_emulator(parent / "pubsub-emulator")
        except RuntimeError as e:  # it exited or never listened
            started = f"the Pub/Sub emulator did not start: {e}"
        if isinstance(started, str):
            return [failed_verdict(s.name, f"skipped: {started}") for s in scenarios], None
        emulator, pubsub_host = started
    if name == "tmpfs" and os.geteuid() != 0:
        why = "skipped: mounting a tmpfs for the spool needs root"
        return [failed_verdict(s.name, why) for s in scenarios], None
    booth = harness.ChaosBooth(parent, harness.topology(name, pubsub_host))
    t0 = time.monotonic()
    try:
        _say(f"topology {name}: starting serve, worker and agents")
        try:
            booth.start()
        except Exception as e:  # the topology never came up: every scenario on it fails
            why = f"the {name} booth did not start: {type(e).__name__}: {e}"
            _say(why)
            return [failed_verdict(s.name, why) for s in scenarios], None
        _say(f"topology {name}: up in {time.monotonic() - t0:.0f} s")
        if baseline:
            _say("baseline: one session with no fault")
            base_verdict = _run_one(booth, "baseline", _baseline)
        for s in scenarios:
            _say(f"scenario {s.name}: {s.title}")
            verdicts.append(_run_one(booth, s.name, s.run))
    finally:
        booth.stop()
        if emulator is not None:
            emulator.stop()
    return verdicts, base_verdict


def _baseline(b: harness.ChaosBooth) -> harness.Verdict:
    b.ensure_healthy()
    t0 = time.monotonic()
    sid, addr = b.new_session("baseline")
    b.press_start(sid)
    v = b.verdict("baseline", sid, addr)
    v.seconds = time.monotonic() - t0
    return v


def _run_one(booth: harness.ChaosBooth, name: str, fn) -> harness.Verdict:
    t0 = time.monotonic()
    try:
        v = fn(booth)
    except Exception as e:  # a scenario that could not finish is a failed scenario
        log.exception("scenario %s raised", name)
        v = failed_verdict(name, f"{type(e).__name__}: {e}", time.monotonic() - t0)
    _say(
        f"  {'PASS' if v.passed else 'FAIL'} {name} in {v.seconds:.0f} s: "
        f"lost {v.frames_lost}, duplicated {v.frames_duplicated}, "
        f"emails {v.emails_received} ({v.smtp_transmissions} sent), {v.explain()}"
    )
    return v


def fuzz_crashes(examples: int, tmp: Path) -> dict[str, Any]:
    if examples <= 0:
        return {"skipped": "--fuzz-examples 0"}
    try:
        from api_fuzz import run_api_fuzz
    except ImportError as e:
        return {"skipped": f"tests/fuzz/api_fuzz.py not importable: {e}"}
    _say(f"api fuzz: {examples} examples per operation and mode")
    t0 = time.monotonic()
    try:
        result = run_api_fuzz(examples, tmp_dir=tmp / "fuzz")
    except Exception as e:  # the scenarios' results, minutes of them, still get printed
        log.exception("api fuzz raised")
        # server_errors None: unknown, not zero (the summary's key stays honest).
        return {"error": f"{type(e).__name__}: {e}", "server_errors": None}
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated scenario names (default: all)")
    p.add_argument("--long-cut-s", type=float, default=60.0, help="the long link cut (s)")
    p.add_argument("--fuzz-examples", type=int, default=25)
    p.add_argument("--workdir", type=Path, help="keep the booths' files here (default: a temp dir)")
    p.add_argument("--no-baseline", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "mail.log", "schemathesis", "hypothesis"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    all_scenarios = harness.scenarios(args.long_cut_s)
    names = args.only.split(",") if args.only else list(all_scenarios)
    unknown = [n for n in names if n not in all_scenarios]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(all_scenarios)}")
    chosen = [all_scenarios[n] for n in names]
    parent = args.workdir or Path(tempfile.mkdtemp(prefix="booth-chaos-"))
    parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    verdicts: list[harness.Verdict] = []
    baseline = None
    topologies = list(dict.fromkeys(s.topology for s in chosen))
    if "standard" in topologies:  # the baseline runs there, first
        topologies.remove("standard")
        topologies.insert(0, "standard")
    for topo in topologies:
        group = [s for s in chosen if s.topology == topo]
        got, base = run_topology(
            topo, group, parent, baseline=topo == "standard" and not args.no_baseline
        )
        verdicts += got
        baseline = baseline or base

    fuzz = fuzz_crashes(args.fuzz_examples, parent)
    result = {
        "scenarios": len(verdicts),
        "passed": sum(v.passed for v in verdicts),
        "frames_lost": sum(v.frames_lost for v in verdicts),
        "frames_duplicated": sum(v.frames_duplicated for v in verdicts),
        "emails_duplicated": sum(v.emails_duplicated for v in verdicts),
        "sessions_stuck": sum(v.stuck for v in verdicts),
        "server_crashes_under_fuzz": fuzz.get("server_errors"),
        "smtp_transmissions_repeated": sum(
            max(0, v.smtp_transmissions - v.emails_received) for v in verdicts
        ),
        "failed": [v.explain() for v in verdicts if not v.passed],
        "baseline": baseline.as_dict() if baseline else None,
        "details": [v.as_dict() for v in verdicts],
        "fuzz": {
            k: fuzz.get(k)
            for k in (
                "requests",
                "server_errors",
                "schema_violations",
                "operations",
                "seconds",
                "skipped",
                "failures",
            )
            if k in fuzz
        },
        "long_cut_s": args.long_cut_s,
        "seconds": round(time.monotonic() - t0, 1),
        "workdir": str(parent),
    }
    if not args.workdir:
        # tmpfs mounts are gone (ChaosBooth.stop); the rest is just files.
        shutil.rmtree(parent, ignore_errors=True)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    from _guard import guarded

    sys.exit(guarded(main))
