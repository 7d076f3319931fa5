"""Replay of a recorded impression/click log (CSV or JSONL, optionally gzipped).

Format (one record per line; CSV with a header row, or one JSON object per line):

* events file: ``ts`` (unix seconds), ``type`` (``impression`` | ``click``), ``impression_id``;
  impressions also need ``user_id`` and ``item_id``; every further column is a context feature.
  CSV values stay strings (an empty cell means "absent"); JSONL keeps JSON scalars as they are
  (``null`` means absent).
* items file: ``item_id``, ``text``, optional ``ts``; further columns become attributes.

Why everything is loaded and sorted in memory: a log exported from a warehouse is rarely in
event-time order, and the join needs event time to be (nearly) monotone per partition; a stable
sort by (ts, items first, impressions before clicks) also guarantees that an item's description
goes out before the first impression that shows it. A row that cannot become a valid event is
never dropped silently: it comes out as a :class:`~livectr.simulators.records.BadRecord` with its
original line bytes and the reason, and the publisher dead-letters it.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from livectr.core.events import MAX_EVENT_BYTES, MAX_TS, Click, ContextValue, Impression, Item, time_problem
from livectr.simulators.records import BadRecord, SourceRecord

EVENT_COLUMNS = frozenset({"ts", "type", "impression_id", "user_id", "item_id"})
ITEM_COLUMNS = frozenset({"ts", "item_id", "text"})
_KIND_RANK = {Item: 0, Impression: 1, Click: 2}
_json = msgspec.json.Decoder()


class RowError(ValueError):
    """A row that cannot become an event; the message is the dead-letter reason."""


class ReplayInputError(ValueError):
    """A log or items file that cannot be replayed at all (missing, unreadable, wrong columns).

    Unlike a :class:`RowError`, which dead-letters one row, this stops the command before
    anything starts: the message is one line naming the file and the problem.
    """


#: What reading a damaged file raises (a corrupt or truncated .gz: BadGzipFile, EOFError, zlib.error).
UNREADABLE = (OSError, EOFError, UnicodeError, zlib.error)

#: Columns a file must have (CSV header; JSONL: keys seen in its first records).
REQUIRED_EVENT_COLUMNS = ("ts", "type", "impression_id", "user_id", "item_id")
REQUIRED_ITEM_COLUMNS = ("item_id", "text")
#: JSONL records looked at by :func:`check_replay_file` (the rest is checked row by row).
_PROBE_RECORDS = 1000


def _open_text(path: Path) -> io.TextIOBase:
    """Text stream of ``path``, gunzipped when it ends in ``.gz``; bad bytes are kept (replaced)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return True
    if name.endswith((".csv", ".tsv")):
        return False
    raise ValueError(f"cannot tell the format of {path}: use a .csv or .jsonl name (optionally .gz)")


def read_rows(path: Path) -> Iterator[tuple[dict[str, Any] | None, bytes, str]]:
    """``(row, original_bytes, error)`` for every record of a CSV or JSONL file.

    ``row`` is None (and ``error`` says why) when the line is not even a record: invalid JSON,
    a JSON value that is not an object, or a CSV row with more cells than the header.
    """
    with _open_text(path) as fh:
        if _is_jsonl(path):
            yield from _jsonl_rows(fh)
        else:
            yield from _csv_rows(fh, delimiter="\t" if ".tsv" in path.suffixes else ",")


def _jsonl_rows(fh: Iterable[str]) -> Iterator[tuple[dict[str, Any] | None, bytes, str]]:
    for line in fh:
        raw = line.rstrip("\r\n")
        if not raw.strip():
            continue
        try:
            value = _json.decode(raw)
        except msgspec.DecodeError as exc:
            yield None, raw.encode(), f"malformed JSON: {exc}"
            continue
        if isinstance(value, dict):
            yield value, raw.encode(), ""
        else:
            yield None, raw.encode(), "malformed JSON: a line must be one JSON object"


class _LineTap:
    """Line iterator that remembers the raw lines the csv reader consumed for the current row."""

    def __init__(self, fh: Iterable[str]) -> None:
        self._it = iter(fh)
        self.taken: list[str] = []

    def __iter__(self) -> _LineTap:
        return self

    def __next__(self) -> str:
        line = next(self._it)
        self.taken.append(line)
        return line

    def pop(self) -> bytes:
        raw = "".join(self.taken).rstrip("\r\n").encode()
        self.taken.clear()
        return raw


def _csv_rows(fh: Iterable[str], delimiter: str) -> Iterator[tuple[dict[str, Any] | None, bytes, str]]:
    tap = _LineTap(fh)
    reader = csv.reader(tap, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return
    tap.pop()
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield None, tap.pop(), f"malformed CSV: {exc}"
            continue
        raw = tap.pop()
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header):
            yield None, raw, f"malformed CSV: {len(cells)} cells but {len(header)} columns"
            continue
        # Missing trailing cells and empty cells both mean "absent".
        yield {h: c for h, c in zip(header, cells) if c != ""}, raw, ""


def _text_field(row: dict[str, Any], name: str) -> str:
    value = row.get(name)
    if value is None or value == "":
        raise RowError(f"missing field {name!r}")
    if not isinstance(value, str):
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and _in_int64(value)):
            return str(value)
        if isinstance(value, int) and not isinstance(value, bool):
            raise RowError(f"field {name!r} is a number beyond 64 bits")
        raise RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise RowError(f"missing field {name!r}")
    return value


def _ts_field(row: dict[str, Any], default: float | None = None) -> float:
    value = row.get("ts")
    if value is None or value == "":
        if default is None:
            raise RowError("missing field 'ts'")
        return default
    if isinstance(value, bool):
        raise RowError("ts must be a number")
    try:
        ts = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON integer beyond float range
        raise RowError(f"ts {_short(value)} is not a number") from None
    problem = time_problem(ts)  # the join's own rule: what the replay accepts, the join accepts
    if problem is not None:
        raise RowError(
            problem if math.isfinite(ts) and abs(ts) < MAX_TS else f"ts {_short(value)} is not a unix time in seconds"
        )
    return ts


def _in_int64(value: int) -> bool:
    return -(2**63) <= value < 2**63


def _short(value: Any, limit: int = 40) -> str:
    """``repr`` of a cell for a reason, cut to ``limit`` characters (a cell can be huge)."""
    if isinstance(value, int) and not _in_int64(value):
        return "<integer beyond 64 bits>"  # repr of a huge int can raise (4300-digit limit)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _extra(row: dict[str, Any], known: frozenset[str]) -> dict[str, ContextValue]:
    """Remaining columns as scalar features (null dropped; nested values rejected)."""
    out: dict[str, ContextValue] = {}
    for key, value in row.items():
        if key in known or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise RowError(f"feature {_short(key)} is not finite")
        if not isinstance(value, (str, int, float, bool)):
            raise RowError(f"feature {_short(key)} must be a scalar, got {type(value).__name__}")
        if isinstance(value, int) and not _in_int64(value):
            raise RowError(f"feature {_short(key)} is an integer beyond 64 bits")
        out[str(key)] = value
    return out


def event_from_row(row: dict[str, Any]) -> Impression | Click:
    """Validate one events-file row and build its event; raises :class:`RowError`."""
    kind = row.get("type")
    if not isinstance(kind, str) or kind.strip().lower() not in ("impression", "click"):
        raise RowError(f"unknown event type {_short(kind)}")
    ts = _ts_field(row)
    impression_id = _text_field(row, "impression_id")
    if kind.strip().lower() == "click":
        return Click(impression_id=impression_id, ts=ts)
    return Impression(
        impression_id=impression_id,
        ts=ts,
        user_id=_text_field(row, "user_id"),
        item_id=_text_field(row, "item_id"),
        context=_extra(row, EVENT_COLUMNS),
    )


def item_from_row(row: dict[str, Any], default_ts: float) -> Item:
    """Validate one items-file row; ``default_ts`` when it has no ``ts``; raises :class:`RowError`."""
    return Item(
        item_id=_text_field(row, "item_id"),
        ts=_ts_field(row, default_ts),
        text=_text_field(row, "text"),
        attributes=_extra(row, ITEM_COLUMNS),
    )


def _parse(path: Path, build: Any) -> tuple[list[Any], list[BadRecord]]:
    good: list[Any] = []
    bad: list[BadRecord] = []
    try:
        for row, raw, error in read_rows(path):
            if row is None:
                bad.append(BadRecord(raw=raw, reason=f"{error} [{path.name}]"))
                continue
            if len(raw) > MAX_EVENT_BYTES:  # its event would be refused by every stage (and past ~1 MB by the broker)
                bad.append(
                    BadRecord(raw=raw, reason=f"oversized row: {len(raw)} bytes > {MAX_EVENT_BYTES} [{path.name}]")
                )
                continue
            try:
                good.append(build(row))
            except RowError as exc:
                bad.append(BadRecord(raw=raw, reason=f"invalid row: {exc} [{path.name}]"))
    except UNREADABLE as exc:  # e.g. a .gz cut short past the records the up-front check probed
        raise ReplayInputError(f"file {path} is unreadable after {len(good) + len(bad)} records: {exc}") from None
    return good, bad


def _probe(path: Path) -> tuple[set[str], set[str], bool]:
    """Columns of ``path`` (CSV header, or keys of its first JSONL objects), the event types of its
    first records, and whether it holds anything at all."""
    columns: set[str] = set()
    types: set[str] = set()
    jsonl = _is_jsonl(path)
    any_line = False
    if not jsonl:
        with _open_text(path) as fh:
            header = next(csv.reader(fh, delimiter="\t" if ".tsv" in path.suffixes else ","), None)
        columns = {h.strip() for h in header or []}
        any_line = header is not None
    for row, _, _ in itertools.islice(read_rows(path), _PROBE_RECORDS):  # the file closes with the generator
        any_line = True
        if row is not None:
            if jsonl:
                columns.update(str(k) for k in row)
            if isinstance(row.get("type"), str):
                types.add(row["type"].strip().lower())
    return columns, types, any_line


def check_replay_file(path: Path, required: Sequence[str], what: str) -> None:
    """Raise :class:`ReplayInputError` unless ``path`` is a readable CSV/JSONL file with ``required``
    columns (``user_id`` and ``item_id`` only once its first records hold an impression)."""
    if not path.exists():
        raise ReplayInputError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise ReplayInputError(f"{what} file {path} is not a file")
    if not os.access(path, os.R_OK):
        raise ReplayInputError(f"{what} file {path} is not readable (permission denied)")
    try:
        columns, types, any_line = _probe(path)
    except ValueError as exc:  # the format cannot be told from the name
        raise ReplayInputError(f"{what} file {exc}") from None
    except UNREADABLE as exc:  # e.g. a corrupt .gz
        raise ReplayInputError(f"{what} file {path} is unreadable: {exc}") from None
    if not any_line:
        raise ReplayInputError(f"{what} file {path} is empty")
    if "type" in required and "impression" not in types:  # a clicks-only log needs no user/item
        required = [c for c in required if c not in ("user_id", "item_id")]
    missing = [c for c in required if c not in columns]
    if missing:
        have = ", ".join(sorted(columns)) or "none"
        raise ReplayInputError(f"{what} file {path} lacks the required column(s) {', '.join(missing)} (it has: {have})")


def check_replay_inputs(log: Path, items: Path | None = None) -> None:
    """Check a log and its items file before replaying them; raises :class:`ReplayInputError`."""
    check_replay_file(log, REQUIRED_EVENT_COLUMNS, "--log")
    if items is not None:
        check_replay_file(items, REQUIRED_ITEM_COLUMNS, "--items")


def load_replay(log: Path, items: Path | None = None) -> tuple[list[SourceRecord], dict[str, int]]:
    """All records of a log (and its items file) in event-time order, bad records first.

    Items go out before every impression that references them: an item whose row ``ts`` is
    later than its first impression is moved to (ts of) that impression, because a real
    catalogue knows an item's description before showing it. Items without ``ts`` get the
    log's first event time. Returns the records and counts for the source description.
    Raises :class:`ReplayInputError` when a file cannot be replayed at all.
    """
    check_replay_inputs(log, items)
    events, bad = _parse(log, event_from_row)
    first_ts = min((e.ts for e in events), default=0.0)
    item_events: list[Item] = []
    if items is not None:
        item_events, bad_items = _parse(items, lambda row: item_from_row(row, first_ts))
        bad += bad_items
        first_shown: dict[str, float] = {}
        for e in events:
            if type(e) is Impression and e.ts < first_shown.get(e.item_id, math.inf):
                first_shown[e.item_id] = e.ts
        item_events = [
            it
            if it.ts <= first_shown.get(it.item_id, math.inf)
            else msgspec.structs.replace(it, ts=first_shown[it.item_id])
            for it in item_events
        ]
    merged: list[Impression | Click | Item] = [*item_events, *events]
    # Stable: equal keys keep file order (items file before log, then line order).
    merged.sort(key=lambda e: (e.ts, _KIND_RANK[type(e)]))
    counts = {
        "impressions": sum(1 for e in events if type(e) is Impression),
        "clicks": sum(1 for e in events if type(e) is Click),
        "items": len(item_events),
        "bad_records": len(bad),
    }
    return [*bad, *merged], counts


def replay_stream(log: Path, items: Path | None = None) -> Iterator[SourceRecord]:
    """Iterator over :func:`load_replay`'s records."""
    records, _ = load_replay(log, items)
    return iter(records)
