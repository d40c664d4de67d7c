"""How long the fuzz tests run: ``FUZZ_EXAMPLES`` scales every one of them.

``make test`` leaves it unset (a short run, so the whole directory takes well
under a minute); ``make fuzz`` sets 2000. Each test asks for a share of it,
because one example of a server round trip costs far more than one example of
a pure parser.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

DEFAULT_EXAMPLES = 60


def fuzz_examples() -> int:
    try:
        return max(1, int(os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES)))
    except ValueError:
        return DEFAULT_EXAMPLES


def examples(share: float = 1.0, minimum: int = 5) -> int:
    return max(minimum, int(fuzz_examples() * share))


def fuzz_settings(share: float = 1.0, **overrides) -> settings:
    """Hypothesis settings for one fuzz test: ``share`` of ``FUZZ_EXAMPLES`` examples, no deadline.

    Deadlines are off because the machine is shared and noisy; the servers under
    test are shared across examples on purpose (they must keep serving), so the
    function-scoped-fixture health check does not apply.
    """
    return settings(
        max_examples=examples(share),
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        **overrides,
    )


def fuzz_marks() -> list[pytest.MarkDecorator]:
    """``pytestmark`` for a fuzz module: the marker, and a timeout that grows with the run
    (pytest's 600 s default is too short for the slowest tests at ``FUZZ_EXAMPLES=2000``)."""
    return [pytest.mark.fuzz, pytest.mark.timeout(max(600, fuzz_examples()))]
