"""Event-time alignment of the examples stream: the join sources merged by decision time.

Why: each join source (input partition) writes its examples in the order their labels were
decided, but the learner reads several examples partitions, and in a replay one of them can
be a whole fetch — seconds to minutes of event time — ahead of another. Trained in arrival
order, the model would then hold labels decided *after* an impression when it scores that
impression's score request (see :data:`~livectr.core.events.KIND_SCORE_REQUEST`), which would make
the serving AUC a leak rather than a measurement. So the learner merges the sources by
decision time, like a stream processor aligning watermarks across inputs:

* an example is released once every *live* source has delivered something at or past its
  decision time (the horizon is the minimum, over live sources, of the latest decision time
  each has delivered); released examples leave sorted by decision time;
* a source that has delivered its end marker stops counting; so does one with nothing
  buffered that has sent no record for ``idle_s`` wall seconds (a quiet partition must not
  stall the model) — its later records are released as they come;
* sources are the record keys the join writes (the partition when a producer wrote none); the
  learner announces the ones it expects (:meth:`EventTimeMerge.expect`, one per impressions
  partition) when the first record arrives, so a join worker that starts a little later still
  holds the others back — for ``idle_s``; a source nobody announced cannot.

The merge also knows which records are fully released, so the learner's snapshots can store
offsets that cover only trained examples (plus how many examples of a partly released record
were already trained, to skip them on resume) while examples wait here.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter

from livectr.core.events import KIND_DEFER_OBSERVED, KIND_FAKE_NEGATIVE, KIND_SCORE_REQUEST, Example

Source = bytes
_DECIDED_AT_IMPRESSION = frozenset((KIND_SCORE_REQUEST, KIND_FAKE_NEGATIVE))
_TIME, _EXAMPLE, _RECORD = itemgetter(0), itemgetter(1), itemgetter(2, 3)


@dataclass
class _SourceQueue:
    """What one source has delivered and not yet released: (decision time, example, partition, offset)."""

    items: deque[tuple[float, Example, int, int]] = field(default_factory=deque)
    latest: float = -math.inf
    last_record: float = 0.0
    ended: bool = False


class EventTimeMerge:
    """Merge of the examples of several join sources by decision time (see the module docstring)."""

    def __init__(self, window_s: float, idle_s: float, wait_s: float = 0.0) -> None:
        self.window_s = window_s
        #: The ``defer`` policy's waiting window (when its observed negatives are decided).
        self.wait_s = wait_s
        self.idle_s = idle_s
        self._sources: dict[Source, _SourceQueue] = {}
        #: Per partition, records not yet completely released: offset → [examples, released].
        self._open: dict[int, dict[int, list[int]]] = {}
        self._next: dict[int, int] = {}
        self._per_partition: dict[int, int] = {}

    def __len__(self) -> int:
        return sum(len(q.items) for q in self._sources.values())

    def add(self, source: Source, partition: int, offset: int, examples: list[Example], now: float) -> None:
        """Queue the examples of record ``offset`` of ``partition``, written by join source ``source``."""
        q = self._sources.get(source)
        if q is None:
            q = self._sources[source] = _SourceQueue()
        q.last_record = now
        q.ended = False
        self._next[partition] = offset + 1
        if not examples:
            return
        self._open.setdefault(partition, {})[offset] = [len(examples), 0]
        self._per_partition[partition] = self._per_partition.get(partition, 0) + len(examples)
        window, wait, at_once = self.window_s, self.wait_s, _DECIDED_AT_IMPRESSION
        # livectr.core.events.decision_time, inlined as a comprehension: this runs once per example.
        times = [
            ex.ts
            if ex.kind in at_once
            else (ex.ts + (ex.click_delay if ex.click_delay > 0.0 else 0.0))
            if ex.label
            else ex.ts + (wait if ex.kind == KIND_DEFER_OBSERVED else window)
            for ex in examples
        ]
        q.items.extend(zip(times, examples, repeat(partition), repeat(offset)))
        q.latest = max(q.latest, max(times))

    def expect(self, source: Source, now: float) -> None:
        """Hold releases back for ``source`` (until it delivers, ends, or stays quiet ``idle_s``)."""
        if source not in self._sources:
            self._sources[source] = _SourceQueue(last_record=now)

    def end(self, source: Source) -> None:
        """``source`` delivered everything it will (its end marker): it no longer holds others back."""
        q = self._sources.get(source)
        if q is None:
            q = self._sources[source] = _SourceQueue()
        q.ended = True

    def note_record(self, partition: int, offset: int) -> None:
        """A record that carries no examples (an end marker, a dead letter) was handled."""
        self._next[partition] = offset + 1

    def horizon(self, now: float) -> float:
        """Decision time up to which every live source has delivered."""
        h = math.inf
        for q in self._sources.values():
            if q.ended or (not q.items and now - q.last_record >= self.idle_s):
                continue
            h = min(h, q.latest)
        return h

    def release(self, now: float) -> list[Example]:
        """Examples every live source has passed, sorted by decision time."""
        return self._take(self.horizon(now))

    def flush(self) -> list[Example]:
        """Everything held, sorted by decision time (end of a bounded run)."""
        return self._take(math.inf)

    def _take(self, h: float) -> list[Example]:
        out: list[tuple[float, Example, int, int]] = []
        for q in self._sources.values():
            items = q.items
            while items and items[0][0] <= h:
                out.append(items.popleft())
        if not out:
            return []
        out.sort(key=_TIME)
        for (partition, offset), n in Counter(map(_RECORD, out)).items():
            self._released(partition, offset, n)
        return list(map(_EXAMPLE, out))

    def _released(self, partition: int, offset: int, n: int) -> None:
        records = self._open[partition]
        counts = records[offset]
        counts[1] += n
        self._per_partition[partition] -= n
        if counts[1] == counts[0] and next(iter(records)) == offset:
            while records:
                first = next(iter(records))
                total, done = records[first]
                if done < total:
                    break
                del records[first]

    def buffered(self, partition: int) -> int:
        """Examples of ``partition`` waiting here."""
        return self._per_partition.get(partition, 0)

    def safe_offsets(self) -> dict[int, int]:
        """Per partition, the offset to resume from so that no waiting example is lost."""
        out = dict(self._next)
        for partition, records in self._open.items():
            if records:
                out[partition] = next(iter(records))
        return out

    def partly_released(self) -> list[tuple[int, int, int]]:
        """(partition, offset, examples already released) of records at or after the safe offsets.

        A resumed learner re-reads these records and must skip that many examples of each (they
        are in the snapshot's weights already).
        """
        return [
            (partition, offset, done)
            for partition, records in self._open.items()
            for offset, (_, done) in records.items()
            if done
        ]
