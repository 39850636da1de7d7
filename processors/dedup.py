"""Duplicates inside one batch: keep the first record per dedup key (tenant, source, id).

Duplicates across batches, restarts and consumers are caught by the dedup claim in PostgreSQL;
this only keeps a batch from claiming one key twice and counting it twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from sinks.base import Record


def first_per_key(records: Iterable[Record]) -> list[Record]:
    unique: dict[tuple[str, str, str], Record] = {}
    for record in records:
        e = record.envelope
        unique.setdefault((e.tenant, e.source, e.id), record)
    return list(unique.values())
