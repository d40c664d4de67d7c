"""Bugs the fuzz tests found and that are not fixed yet, recognised by where they raise.

Each one has a strict-xfail reproducer in the test file that found it; the
properties skip an example that hits one of these (so a known bug does not hide
a new one). When a bug is fixed, its reproducer XPASSes and fails the run:
delete the reproducer's xfail mark and the predicate here.
"""

from __future__ import annotations

import traceback


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(err.__traceback__)


def mail_address_crash(err: BaseException) -> bool:
    """cloud_trainer/mail.py ``address`` catches ValueError/IndexError, but the email package
    raises ``HeaderParseError`` for a local part like ``:`` or ``a"b`` that the front desk
    accepts; the outbox then retries it as a temporary failure instead of bouncing it."""
    import email.errors

    return isinstance(err, email.errors.HeaderParseError) and any(
        f.name == "address" for f in _frames(err)
    )
