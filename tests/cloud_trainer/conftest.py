"""Fixtures the web app's test files share (each defines its own ``booth``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client(booth) -> Iterator[TestClient]:
    """A TestClient on the module's ``booth`` app (a module may define its own)."""
    with TestClient(booth.app) as c:
        yield c
