"""The one CLI: ``booth <command> ...``.

Each command is a module with ``add_arguments(parser)`` and ``run(args) -> int``.
Modules import their heavy dependencies (TensorFlow, FastAPI) inside ``run`` so
that ``booth --help`` and ``booth agent`` stay fast on a board that has neither.
Errors meant for people (BoothError, ConfigError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from edge_agent.config import ConfigError
from edge_agent.errors import BoothError

# name -> (module, one-line help). Order is the order of `booth --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cloud_trainer.commands.demo", "run the whole booth end to end on this machine"),
    "serve": (
        "cloud_trainer.commands.serve",
        "run the cloud service (web app, API, ingest, control)",
    ),
    "worker": ("cloud_trainer.commands.worker", "take training jobs from the queue"),
    "agent": ("edge_agent.commands.agent", "run one camera's edge agent"),
    "ingest": ("cloud_trainer.commands.ingest", "run the gRPC ingest and control server alone"),
    "synth": ("edge_agent.commands.synth", "render a synthetic take with ground truth"),
    "pretrain": ("cloud_trainer.commands.pretrain", "build a base checkpoint from many takes"),
    "reference": ("cloud_trainer.commands.reference", "manage reference dances"),
    "staff": ("cloud_trainer.commands.staff", "manage staff logins"),
    "config": ("cloud_trainer.commands.config", "print or validate a booth config"),
}


# `booth --help`'s epilog: the order in which one meets the commands. A module may have
# its own EXAMPLES, shown under its --help. tests/test_cli.py parses every one of them.
EXAMPLES: list[tuple[str, str]] = [
    ("booth demo", "the whole booth end to end on this machine"),
    ("booth config example > booth.yaml", "a commented config to edit"),
    ("booth config validate booth.yaml", "check it: bad keys, secrets still placeholders"),
    ("booth serve --config booth.yaml", "the cloud service: tablet pages, ingest, control"),
    ("booth worker --config booth.yaml", "a training worker (one per accelerator)"),
    ("booth agent --config board.yaml", "one camera, on its board"),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def examples_epilog(examples: list[tuple[str, str]]) -> str | None:
    if not examples:
        return None
    width = max(len(cmd) for cmd, _ in examples)
    if width + max(len(what) for _, what in examples) > 76:
        # Too wide for one terminal line each: the command, then what it does below it.
        return "examples:\n" + "\n".join(f"  {cmd}\n      {what}" for cmd, what in examples)
    return "examples:\n" + "\n".join(f"  {cmd:<{width}}  {what}" for cmd, what in examples)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="booth",
        description="dancebooth: do-as-I-do motion transfer booth",
        epilog=examples_epilog(EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: debug logging from the booth; -vv: from the libraries it uses too",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue  # not built yet in this checkout
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=examples_epilog(getattr(module, "EXAMPLES", [])),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# The booth file a command without --config reads (compose sets it in the containers).
CONFIG_ENV = "BOOTH_CONFIG"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if getattr(args, "config", "unset") is None and os.environ.get(CONFIG_ENV):
        # In a container `booth staff logout ...` then acts on the booth's own database,
        # not on the embedded defaults.
        args.config = Path(os.environ[CONFIG_ENV])
    try:
        return int(args._run(args) or 0)
    except (BoothError, ConfigError) as e:
        print(f"booth {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"booth {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        reason = database_unreachable(e)
        if reason is None:
            raise
        # Exit 1, not 2: the database may come back, and a supervisor restarts us.
        print(f"booth {args.command}: {reason}", file=sys.stderr)
        return 1


# The booth's own loggers: -v turns on their debug lines without gRPC's, urllib3's, ...
OWN_LOGGERS = ("cloud_trainer", "edge_agent")


# What every LogRecord carries; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class FieldsFormatter(logging.Formatter):
    """The usual line, then the record's ``extra=`` fields as ``key=value``.

    The code logs the ids that tie a line to a session, a job or a camera as fields
    (``log.info("job failed", extra={"session_id": ...})``); a plain format string drops
    them, and the line no longer says which session failed.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={_field(v)}" for k, v in fields.items())


def _field(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if isinstance(value, str) and (not text or any(c.isspace() or c in '"=' for c in text)):
        text = json.dumps(text)
    return text


def configure_logging(verbose: int) -> None:
    """INFO from the booth's own loggers and warnings from the libraries' by default (an
    HTTP client's line per request would bury the demo's progress); -v: DEBUG from the
    booth's own; -vv: DEBUG from every logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING, handlers=[handler]
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def database_unreachable(e: BaseException) -> str | None:
    """One line for a database that cannot be reached or refuses the login, else None."""
    exc = sys.modules.get("sqlalchemy.exc")  # not on an edge board
    if exc is None or not isinstance(e, exc.OperationalError | exc.InterfaceError):
        return None
    detail = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
    return (
        f"the database cannot be reached or refused the login ({detail}); check database.url, "
        "and that the database is up"
    )


if __name__ == "__main__":
    sys.exit(main())
