"""Bugs the fuzz tests found and that are not fixed yet, recognised by where they raise.

Each one has a strict-xfail reproducer in the test file that found it; the
properties skip an example that hits one of these (so a known bug does not hide
a new one). When a bug is fixed, its reproducer XPASSes and fails the run:
delete the reproducer's xfail mark and the predicate here.
"""

from __future__ import annotations

import os
import traceback


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(err.__traceback__)


def pyyaml_crash(err: BaseException) -> bool:
    """PyYAML's constructors raise ValueError/IndexError for a bad explicit tag (``!!int``,
    ``!!int x``) or a number past Python's 4300-digit limit, and RecursionError for deep
    nesting; ``read_yaml`` and ``corrections.parse`` only catch ``yaml.YAMLError``."""
    if isinstance(err, RecursionError):
        return True
    tail = os.path.join("yaml", "constructor.py")
    return isinstance(err, ValueError | IndexError | TypeError) and any(
        f.filename.endswith(tail) for f in _frames(err)
    )


def parse_size_crash(err: BaseException) -> bool:
    """edge_agent/config.py ``_parse_size`` lets int()'s TypeError (None, a list) and
    OverflowError (infinity) escape pydantic, which only converts ValueError."""
    return isinstance(err, TypeError | OverflowError) and any(
        f.name == "_parse_size" for f in _frames(err)
    )


def correction_joint_crash(err: BaseException) -> bool:
    """cloud_trainer/corrections.py ``_joint`` tests ``value in sk.INDEX``: a list or a mapping
    as the joint (``joint: [a]``) is unhashable, a TypeError."""
    return isinstance(err, TypeError) and any(f.name == "_joint" for f in _frames(err))


def mail_address_crash(err: BaseException) -> bool:
    """cloud_trainer/mail.py ``address`` catches ValueError/IndexError, but the email package
    raises ``HeaderParseError`` for a local part like ``:`` or ``a"b`` that the front desk
    accepts; the outbox then retries it as a temporary failure instead of bouncing it."""
    import email.errors

    return isinstance(err, email.errors.HeaderParseError) and any(
        f.name == "address" for f in _frames(err)
    )


def config_crash(err: BaseException) -> bool:
    return pyyaml_crash(err) or parse_size_crash(err)
