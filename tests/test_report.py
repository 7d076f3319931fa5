"""Metrics of a real run: ``/metrics`` of every long-running stage while ``livectr run`` goes, then
``livectr report`` on its data dir, rendered by headless Chromium and checked on the screenshot.

One paced ``livectr run`` (semantics on, a snapshot every 2 s) feeds every test here: it is the
costly part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from runs import REPO, livectr_run_command

from livectr.cli import main
from livectr.core.broker import EmbeddedBroker
from livectr.core.config import Config
from livectr.core.metrics_log import read_all
from livectr.report import CHARTS, chart_boxes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("join-0", "learn", "refresh")  # ports BASE, BASE+1, BASE+2


def _free_base(n: int = 3) -> int:
    """A port with the ``n - 1`` following ones free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for p in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no run of free ports")


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
    """Samples of ``/metrics`` by sample name and labels, or None while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@dataclass
class RecordedRun:
    data_dir: Path
    summary_path: Path
    scrapes: dict[str, list[dict[str, dict[tuple[tuple[str, str], ...], float]]]] = field(default_factory=dict)
    serve_port: int = 0
    scored: list[int] = field(default_factory=list)


def _score_steadily(port: int, stop: threading.Event, statuses: list[int]) -> None:
    """POST /score (50 candidates) about 20 times a second until ``stop``; the statuses seen."""
    body = json.dumps({"user_id": "u1", "items": [f"i{k}" for k in range(50)]}).encode()
    while not stop.wait(0.05):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/score", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                statuses.append(resp.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
        except OSError:
            statuses.append(0)  # not listening yet


@pytest.fixture(scope="module")
def recorded_run(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedRun]:
    """A paced ``livectr run --metrics-port BASE``, scraped twice a second while it runs."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = Config()
    cfg.kafka.bootstrap_servers = broker.bootstrap_servers
    cfg.kafka.topic_prefix = f"report-{os.getpid()}."
    cfg.kafka.partitions = 2
    cfg.data_dir = tmp / "data"
    base = _free_base(4)
    run = RecordedRun(cfg.data_dir, tmp / "summary.json", {s: [] for s in STAGES}, serve_port=base + 3)
    cmd = livectr_run_command(
        cfg,
        run.summary_path,
        *("--events", "24000", "--users", "800", "--items-count", "300", "--window-s", "60"),
        *("--speed", "8", "--snapshot-every-s", "2", "--metrics-port", str(base)),
    )
    log = open(tmp / "run.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    # A scorer on the run's data dir, scored steadily: it records its latency for the report.
    serve_cmd = [
        sys.executable, "-m", "livectr", "serve", "--data-dir", str(cfg.data_dir),
        "--bootstrap-servers", cfg.kafka.bootstrap_servers, "--topic-prefix", cfg.kafka.topic_prefix,
        "--port", str(run.serve_port),
    ]  # fmt: skip
    serve_log = open(tmp / "serve.log", "w+")
    server = subprocess.Popen(serve_cmd, stdout=serve_log, stderr=subprocess.STDOUT, cwd=REPO)
    stop_client = threading.Event()
    client = threading.Thread(target=_score_steadily, args=(run.serve_port, stop_client, run.scored), daemon=True)
    client.start()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            for i, stage in enumerate(STAGES):
                scrape = _scrape(base + i)
                if scrape is not None:
                    run.scrapes[stage].append(scrape)
            time.sleep(0.5)
        assert proc.wait(timeout=30) == 0, (log.seek(0), log.read()[-4000:])[1]
        stop_client.set()
        client.join(timeout=10)
        server.send_signal(signal.SIGINT)  # a clean stop writes the scorer's last sample
        assert server.wait(timeout=30) == 0, (serve_log.seek(0), serve_log.read()[-4000:])[1]
    finally:
        stop_client.set()
        for p in (proc, server):
            if p.poll() is None:
                p.kill()
        log.close()
        serve_log.close()
    yield run


def _values(run: RecordedRun, stage: str, name: str) -> list[float]:
    return [sum(s[name].values()) for s in run.scrapes[stage] if name in s]


def test_each_stage_serves_prometheus_metrics_that_move(recorded_run: RecordedRun) -> None:
    run = recorded_run
    for stage in STAGES:
        assert len(run.scrapes[stage]) >= 3, f"{stage}: /metrics answered {len(run.scrapes[stage])} times"
        last = run.scrapes[stage][-1]
        assert last["livectr_stage_up"] == {(("stage", stage),): 1.0}
        assert "livectr_dead_letters_total" in last
    join_names = set().union(*run.scrapes["join-0"])
    learn_names = set().union(*run.scrapes["learn"])
    assert {
        "livectr_events_consumed_total",
        "livectr_events_per_second",
        "livectr_examples_per_second",
        "livectr_consumer_lag",
        "livectr_semantic_cache_misses_total",
        "livectr_semantic_cache_miss_rate",
    } <= join_names
    assert {
        "livectr_examples_trained_total",
        "livectr_examples_per_second",
        "livectr_serving_auc",
        "livectr_serving_logloss",
        "livectr_consumer_lag",
        "livectr_snapshot_version",
        "livectr_freshness_p99_seconds",
    } <= learn_names
    # The lag is per consumed topic: the join reads impressions and clicks (and the semantic topic).
    lag_topics = {dict(labels)["topic"] for s in run.scrapes["join-0"] for labels in s.get("livectr_consumer_lag", {})}
    assert any(t.endswith("impressions") for t in lag_topics) and any(t.endswith("clicks") for t in lag_topics)
    # Values move while the run goes: counters grow, rates are seen above zero.
    for stage, counter in (
        ("join-0", "livectr_events_consumed_total"),
        ("learn", "livectr_examples_trained_total"),
        ("refresh", "livectr_texts_encoded_total"),
    ):
        values = _values(run, stage, counter)
        assert len(set(values)) >= 3 and values == sorted(values), f"{stage} {counter}: {values}"
    assert max(_values(run, "join-0", "livectr_events_per_second")) > 0
    assert max(_values(run, "learn", "livectr_examples_per_second")) > 0
    assert len(set(_values(run, "join-0", "livectr_semantic_cache_lookups_total"))) >= 3
    assert len(set(_values(run, "learn", "livectr_snapshot_version"))) >= 2
    auc = [v for v in _values(run, "learn", "livectr_serving_auc") if v == v]
    assert auc and 0.5 < auc[-1] < 1.0


def test_run_records_samples_for_the_report(recorded_run: RecordedRun) -> None:
    stages = read_all(recorded_run.data_dir)
    assert {"produce", "join-0", "learn", "refresh"} <= set(stages)
    learn = stages["learn"]
    assert len(learn) >= 5
    assert all(b["t"] >= a["t"] for a, b in zip(learn, learn[1:]))
    event_times = [s["event_time"] for s in learn if "event_time" in s]
    assert event_times == sorted(event_times) and event_times[-1] > event_times[0]
    assert any("serving_auc_recent" in s for s in learn) and any("freshness_p50_s" in s for s in learn)
    assert sum("semantic_miss_rate_recent" in s for s in stages["join-0"]) >= 3
    assert any(s.get("examples_rate", 0) > 0 for s in learn)
    # The last sample is the stage's final state (written at close, whatever the interval).
    summary = json.loads((recorded_run.data_dir / "run" / "learn.summary.json").read_text())
    assert learn[-1]["examples_trained"] == summary["examples_trained"] > 0
    # The scorer recorded its /score latency over time, and its request count at the end.
    serve = stages[f"serve-{recorded_run.serve_port}"]
    timed = [s for s in serve if "latency_p99_ms" in s]
    assert len(timed) >= 5 and all(0 < s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_max_ms"] for s in timed)
    assert serve[-1]["requests_served"] == recorded_run.scored.count(200) > 0


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _screenshot(html: Path, png: Path, height: int = 2000) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; .ci/run installs it)")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--screenshot={png}",
        f"--window-size=1200,{height}",
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]


def _coloured(pixel: tuple[int, int, int]) -> bool:
    """A series colour (saturated), not text, frame or grid (greys) nor the white page."""
    return max(pixel) - min(pixel) > 60


def test_report_renders_every_plot_in_chromium(recorded_run: RecordedRun, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "livectr", "report", "--data-dir", str(recorded_run.data_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    # Self-contained: nothing to fetch (the only URL is the SVG namespace).
    assert re.findall(r"https?://[^\"' ]+", html) == ["http://www.w3.org/2000/svg"] * len(CHARTS)
    assert "<script" not in html and "<link" not in html and "<img" not in html
    png = tmp_path / "report.png"
    _screenshot(out, png)
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 2000)
    colours_seen: set[tuple[int, int, int]] = set()
    for chart, (x, y, w, h) in zip(CHARTS, chart_boxes()):
        # The plot area only (below the title and up to three legend rows, above the x ticks):
        # legend swatches are coloured too and must not count.
        area = image.crop((x + 64, y + 76, x + w - 14, y + h - 43))
        pixels = [p for p in area.get_flattened_data() if _coloured(p)]
        assert len(pixels) >= 150, f"{chart.__name__}: {len(pixels)} coloured pixels in its plot area"
        colours_seen.update(pixels)
    # Several series colours, drawn exactly (2 px lines have pure cores).
    palette = {tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")}
    assert len(palette & colours_seen) >= 3
    # The header is drawn (text is dark), and most of the page is not blank.
    header = image.crop((16, 16, 1100, 300))
    assert sum(1 for p in header.get_flattened_data() if max(p) < 100) > 2000


def test_report_without_metrics_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for data_dir in (tmp_path / "missing", tmp_path):
        assert main(["report", "--data-dir", str(data_dir)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("livectr report: ") and "livectr run --data-dir" in lines[0]
        assert not (data_dir / "report.html").exists()


def test_stage_refuses_a_busy_metrics_port(kafka_config: Config) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "livectr",
                "learn",
                "--bootstrap-servers",
                kafka_config.kafka.bootstrap_servers,
                "--data-dir",
                str(kafka_config.data_dir),
                "--metrics-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert proc.returncode != 0
    assert f"livectr learn: cannot serve /metrics on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
