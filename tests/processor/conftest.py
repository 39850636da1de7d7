"""Fixtures of the processor's outage tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tally.settings import Settings
from tests.processor.scratch_pg import ScratchPostgres, scratch_postgres


@pytest.fixture
def scratch_pg(settings: Settings) -> Iterator[ScratchPostgres]:
    """A PostgreSQL of the test's own, which it may stop and start."""
    with scratch_postgres(settings) as pg:
        yield pg
