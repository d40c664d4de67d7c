"""``booth staff hash-password``: make a password hash for ``web.staff``."""

from __future__ import annotations

import argparse
import getpass
import sys

from edge_agent.errors import BadInput


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="staff_command", metavar="ACTION", required=True)
    h = sub.add_parser(
        "hash-password", help="print an argon2 hash of a password (read from stdin or a prompt)"
    )
    h.add_argument("--stdin", action="store_true", help="read the password from standard input")


def run(args: argparse.Namespace) -> int:
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
