"""Rows a unit stages for module tables (UnitOfWork.stage): checked names, and the INSERTs that
write them -- inside the append statement as data-modifying CTEs, or alone when there are no
events (app/eventstore.py builds the append)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE = re.compile(r"[a-z_][a-z0-9_ ]*")


@dataclass(frozen=True)
class Staged:
    table: str
    columns: tuple[tuple[str, str], ...]  # (name, PostgreSQL type)
    rows: tuple[tuple, ...]


def stage_entry(table: str, columns: Mapping[str, str], rows: Iterable[Sequence[Any]]) -> Staged | None:
    """An entry of rows for `table` (`columns`: name -> PostgreSQL type), None if there are no
    rows. Table and column names are code, never input: checked here."""
    for name in (table, *columns):
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
    for kind in columns.values():
        if not _TYPE.fullmatch(kind):
            raise ValueError(f"not a plain SQL type name: {kind!r}")
    rows = tuple(tuple(row) for row in rows)
    return Staged(table, tuple(columns.items()), rows) if rows else None


def staged_insert(entry: Staged, first_param: int) -> str:
    """The insert of an entry's rows: one row as plain parameters, more as one array per column
    (see columns_of)."""
    names = ", ".join(f'"{name}"' for name, _ in entry.columns)
    if len(entry.rows) == 1:
        values = ", ".join(f"${first_param + i}::{kind}" for i, (_, kind) in enumerate(entry.columns))
        return f'INSERT INTO "{entry.table}" ({names}) VALUES ({values}) ON CONFLICT DO NOTHING'
    arrays = ", ".join(f"${first_param + i}::{kind}[]" for i, (_, kind) in enumerate(entry.columns))
    return f'INSERT INTO "{entry.table}" ({names}) SELECT * FROM unnest({arrays}) ON CONFLICT DO NOTHING'


def merged(entries: list[Staged]) -> list[Staged]:
    """Entries for the same table and columns as one, rows in staging order."""
    by_shape: dict[tuple, list[tuple]] = {}
    for entry in entries:
        by_shape.setdefault((entry.table, entry.columns), []).extend(entry.rows)
    return [Staged(table, columns, tuple(rows)) for (table, columns), rows in by_shape.items()]


def columns_of(entries: list[Staged]) -> list:
    """The staged rows in statement parameter order: an entry's one row as its values, more rows
    as one array per column (see staged_insert)."""
    params: list = []
    for entry in entries:
        if len(entry.rows) == 1:
            params.extend(entry.rows[0])
        else:
            params.extend([row[i] for row in entry.rows] for i in range(len(entry.columns)))
    return params

