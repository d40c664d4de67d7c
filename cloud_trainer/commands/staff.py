"""``booth staff hash-password|logout``: staff passwords and logins.

    booth staff hash-password [--stdin]                print an argon2 hash for ``web.staff``
    booth staff logout USERNAME... [--config FILE]     end those users' logins at this booth now

Staff users live in ``web.staff`` of the booth file. Removing a user there, or giving
them a new hash, ends their logins once ``booth serve`` restarts with it (each login
remembers the hash it was made with). ``logout`` ends them at once, through the
database, for a lost tablet or before the restart.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from edge_agent.errors import BadInput

EXAMPLES = [
    ("booth staff hash-password", "a hash for web.staff (the password is prompted for)"),
    ("booth staff logout --config booth.yaml ana", "end ana's logins on every tablet now"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="staff_command", metavar="ACTION", required=True)
    h = sub.add_parser(
        "hash-password", help="print an argon2 hash of a password (read from stdin or a prompt)"
    )
    h.add_argument("--stdin", action="store_true", help="read the password from standard input")
    out = sub.add_parser("logout", help="end every login of these staff users at this booth")
    out.add_argument("usernames", nargs="+", metavar="USERNAME")
    out.add_argument("--config", help="the booth YAML file (default: embedded defaults)")


def run(args: argparse.Namespace) -> int:
    if args.staff_command == "logout":
        return _logout(args)
    return _hash_password(args)


def _hash_password(args: argparse.Namespace) -> int:
    from cloud_trainer.web.security import hash_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if password != getpass.getpass("again: "):
            raise BadInput("the two passwords differ")
    if len(password) < 8:
        raise BadInput("use at least 8 characters")
    print(hash_password(password))
    return 0


def _logout(args: argparse.Namespace) -> int:
    import time

    from cloud_trainer.config import BoothConfig, load_config
    from cloud_trainer.repository import Repository

    cfg = load_config(args.config) if args.config else BoothConfig()
    source = args.config or "the embedded defaults"
    if cfg.database.type == "sqlite" and not cfg.database.path.exists():
        # Ending no login in a database made just now would pass for success, while the
        # lost tablet stays logged in to the booth's real one.
        raise BadInput(
            f"no booth database at {cfg.database.path} (from {source}): give the booth's "
            "file with --config FILE or BOOTH_CONFIG"
        )
    known = {u.username for u in cfg.web.staff}
    repo = Repository.from_config(cfg.database)
    try:
        for username in args.usernames:
            ended = repo.revoke_staff_logins(cfg.booth.id, username, time.time())
            print(f"{username}: ended {ended} login{'' if ended == 1 else 's'}")
            if username not in known:
                print(f"note: {username} is not in web.staff of {source}", file=sys.stderr)
    finally:
        repo.close()
    return 0
