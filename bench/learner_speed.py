"""Learner throughput: decode → tensorise → forward/backward/step, without Kafka.

``python bench/learner_speed.py [--examples N] [--batch-size B] [--semantics on|off]
[--word-buckets N]`` encodes a
synthetic stream as ``ExampleBatch`` records (as the join writes them) and times the learner
consuming them, reporting wall-clock and process-CPU examples/s (CPU time is the fairer figure
on a shared machine): the median of ``--passes`` passes, and with word weights on, the same
stream's learner without them timed in alternate passes and the ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# The synthetic example generator is a test helper (tests/toyworld.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toyworld import ToyWorld  # noqa: E402

from livectr.core.config import Config, from_env
from livectr.core.events import ExampleBatch, decode_example, encode_example
from livectr.learner.online import OnlineLearner


class Timed:
    """One learner over one encoded stream, timed pass by pass (a warm-up pass first)."""

    def __init__(self, cfg: Config, raws: list[bytes]) -> None:
        self.cfg, self.raws = cfg, raws
        self.learner = OnlineLearner(cfg)
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.one_pass()

    def one_pass(self) -> None:
        size, buf = self.cfg.learner.batch_size, []
        for raw in self.raws:
            buf.extend(decode_example(raw).examples)
            while len(buf) >= size:
                self.learner.learn_batch(buf[:size])
                buf = buf[size:]
        if buf:
            self.learner.learn_batch(buf)

    def timed_pass(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.one_pass()
        self.walls.append(time.perf_counter() - wall)
        self.cpus.append(time.process_time() - cpu)


def encoded_stream(cfg: Config, examples: int, records_of: int = 100, seed: int = 1, words: bool = True) -> list[bytes]:
    """``examples`` synthetic examples as ``ExampleBatch`` records of ``records_of``; with ``words``
    each example carries its item's 8 words (used when ``learner.word_buckets`` > 0)."""
    world = ToyWorld(users=5000, items=2000, sem_dim=cfg.semantic.reduced_dim, seed=seed)
    data = world.examples(examples, words=words)
    return [encode_example(ExampleBatch(data[k : k + records_of])) for k in range(0, len(data), records_of)]


def measure(cfg: Config, examples: int = 80_000, baseline: Config | None = None, passes: int = 3) -> dict[str, Any]:
    """Examples/s of ``cfg``'s learner over ``examples`` synthetic examples: the median of
    ``passes`` timed passes (after a warm-up pass). With ``baseline``, a second learner on the
    same stream is timed in alternate passes (so both see the same machine load) and the ratio
    of their medians is reported."""
    raws = encoded_stream(cfg, examples)
    runs = [Timed(cfg, raws)] + ([Timed(baseline, raws)] if baseline is not None else [])
    for _ in range(passes):
        for run in runs:
            run.timed_pass()
    main = runs[0]
    result: dict[str, Any] = {
        "examples": examples,
        "batch_size": cfg.learner.batch_size,
        "semantics": cfg.semantic.enabled,
        "word_buckets": cfg.learner.word_buckets,
        "threads": cfg.learner.threads,
        "device": str(main.learner.device),
        "passes": passes,
        "wall_examples_per_s": examples / statistics.median(main.walls),
        "cpu_examples_per_s": examples / statistics.median(main.cpus),
    }
    if baseline is not None:
        base = runs[1]
        result["without_words_cpu_examples_per_s"] = examples / statistics.median(base.cpus)
        result["without_words_wall_examples_per_s"] = examples / statistics.median(base.walls)
        result["cpu_ratio_vs_without_words"] = statistics.median(base.cpus) / statistics.median(main.cpus)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=80_000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--semantics", choices=["on", "off"], default="on")
    parser.add_argument(
        "--word-buckets", type=int, default=None, help="learner.word_buckets (default: the config's, env included)"
    )
    parser.add_argument("--passes", type=int, default=3, help="timed passes per learner (the median is reported)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the same-run run without word weights")
    args = parser.parse_args()
    cfg = from_env()
    if args.word_buckets is not None:
        cfg.learner.word_buckets = args.word_buckets
    cfg.semantic.enabled = args.semantics == "on"
    if args.batch_size:
        cfg.learner.batch_size = args.batch_size
    base = None
    if not args.no_baseline and cfg.learner.word_buckets:
        # The same stream without the user × word weights, timed in alternate passes (a shared
        # machine's load moves absolute figures; the ratio is what tells the features' cost).
        base = copy.deepcopy(cfg)
        base.learner.word_buckets = 0
    print(json.dumps(measure(cfg, args.examples, base, args.passes), indent=2))


if __name__ == "__main__":
    main()
