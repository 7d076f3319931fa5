"""The one entry point the CLI uses to get events: synthetic traffic or a recorded log."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from livectr.core.config import Config
from livectr.core.events import Item
from livectr.simulators.records import BadRecord, SourceRecord
from livectr.simulators.replay import ReplayInputError, check_replay_inputs, load_replay
from livectr.simulators.synthetic import GroundTruth, SyntheticTraffic


@dataclass
class Source:
    """An event stream in event-time order (bad records included) and what is known about it.

    ``truth`` is the synthetic ground truth (complete once ``events`` is exhausted), None for
    recorded logs.
    """

    events: Iterator[SourceRecord]
    truth: GroundTruth | None
    description: str


def check_source(log: Path | None, items: Path | None) -> None:
    """What :func:`open_source` would refuse, checked up front; raises :class:`ReplayInputError`."""
    if log is None:
        if items is not None:
            raise ReplayInputError("--items only makes sense with a log to replay (--log)")
        return
    check_replay_inputs(Path(log), Path(items) if items is not None else None)


def open_source(cfg: Config, log: Path | None = None, items: Path | None = None) -> Source:
    """Synthetic traffic from ``cfg.simulator``, or the replay of ``log`` (with its ``items`` file)."""
    if log is None:
        if items is not None:
            raise ReplayInputError("--items only makes sense with a log to replay (--log)")
        sim = cfg.simulator
        traffic = SyntheticTraffic(sim)
        desc = (
            f"synthetic traffic: {sim.events:,} impressions+clicks, {sim.users:,} users, "
            f"{sim.items:,} items ({sim.new_item_fraction:.0%} born during the run), seed {sim.seed}"
        )
        return Source(events=iter(traffic), truth=traffic.truth, description=desc)
    records, counts = load_replay(Path(log), Path(items) if items is not None else None)
    desc = (
        f"replay of {log}: {counts['impressions']:,} impressions, {counts['clicks']:,} clicks, "
        f"{counts['items']:,} items, {counts['bad_records']:,} bad records"
    )
    return Source(events=iter(records), truth=None, description=desc)


def leading_items(events: Iterator[SourceRecord]) -> Iterator[Item]:
    """The catalogue: the item records before the first impression or click.

    ``livectr run`` publishes these ahead of the traffic and lets the semantic teacher encode
    them first, as a deployment's cache is warm for the existing catalogue; items born later
    still go through the asynchronous miss-and-fill path.
    """
    for rec in events:
        if type(rec) is Item:
            yield rec
        elif type(rec) is not BadRecord:  # a malformed row is dead-lettered by the traffic run, not here
            return
