"""Learner throughput: decode → tensorise → forward/backward/step, without Kafka.

``python bench/learner_speed.py [--examples N] [--batch-size B] [--semantics on|off]
[--word-buckets N]`` encodes a
synthetic stream as ``ExampleBatch`` records (as the join writes them) and times the learner
consuming them, reporting wall-clock and process-CPU examples/s (CPU time is the fairer figure
on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

# The synthetic example generator is a test helper (tests/toyworld.py), not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toyworld import ToyWorld  # noqa: E402

from livectr.core.config import Config, from_env
from livectr.core.events import ExampleBatch, decode_example, encode_example
from livectr.learner.online import OnlineLearner


def measure(
    cfg: Config, examples: int = 80_000, records_of: int = 100, seed: int = 1, words: bool = True
) -> dict[str, float]:
    """Examples/s of one pass over ``examples`` synthetic examples (after a warm-up pass); with
    ``words`` each example carries its item's 8 words (used when ``learner.word_buckets`` > 0)."""
    world = ToyWorld(users=5000, items=2000, sem_dim=cfg.semantic.reduced_dim, seed=seed)
    data = world.examples(examples, words=words)
    raws = [encode_example(ExampleBatch(data[k : k + records_of])) for k in range(0, len(data), records_of)]
    learner = OnlineLearner(cfg)
    size = cfg.learner.batch_size

    def one_pass() -> None:
        buf: list = []
        for raw in raws:
            buf.extend(decode_example(raw).examples)
            while len(buf) >= size:
                learner.learn_batch(buf[:size])
                buf = buf[size:]
        if buf:
            learner.learn_batch(buf)

    one_pass()
    wall, cpu = time.perf_counter(), time.process_time()
    one_pass()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "examples": examples,
        "batch_size": size,
        "semantics": cfg.semantic.enabled,
        "word_buckets": cfg.learner.word_buckets,
        "threads": cfg.learner.threads,
        "device": str(learner.device),
        "wall_examples_per_s": examples / wall,
        "cpu_examples_per_s": examples / cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=80_000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--semantics", choices=["on", "off"], default="on")
    parser.add_argument(
        "--word-buckets", type=int, default=None, help="learner.word_buckets (default: the config's, env included)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the same-run run without word weights")
    args = parser.parse_args()
    cfg = from_env()
    if args.word_buckets is not None:
        cfg.learner.word_buckets = args.word_buckets
    cfg.semantic.enabled = args.semantics == "on"
    if args.batch_size:
        cfg.learner.batch_size = args.batch_size
    result = measure(cfg, args.examples)
    if not args.no_baseline and cfg.learner.word_buckets:
        # The same stream without the user × word weights, in the same run (a shared machine's
        # load moves absolute figures; the ratio is what tells the features' cost).
        base = copy.deepcopy(cfg)
        base.learner.word_buckets = 0
        without = measure(base, args.examples)
        result["without_words_cpu_examples_per_s"] = without["cpu_examples_per_s"]
        result["without_words_wall_examples_per_s"] = without["wall_examples_per_s"]
        result["cpu_ratio_vs_without_words"] = result["cpu_examples_per_s"] / without["cpu_examples_per_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
