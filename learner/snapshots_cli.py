"""``livectr snapshots list | show | diff | rollback``: inspect published snapshots and roll back.

Why a separate module: the CLI wants summaries (sizes, headline metrics, tensor deltas) that
neither the learner nor the scorer needs; the one write, :func:`snapshot.rollback`, lives with
the pointer-swap code it reuses. Each ``*_report`` returns plain JSON-able data (``--json``);
each ``format_*`` turns it into the human table.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path
from typing import Any

import torch

from livectr.core.config import Config
from livectr.learner import snapshot as snap
from livectr.learner.updates import publish_rollback

#: Manifest metrics shown by ``list`` and compared first by ``diff``.
HEADLINE_METRICS = ("serving_auc", "serving_logloss")


def _clean(value: Any) -> Any:
    """NaN/inf → None so ``--json`` prints strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _iso(ts: Any) -> str | None:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _manifest(data_dir: Path | str, version: int) -> dict[str, Any]:
    path = snap.snapshots_dir(data_dir) / snap.version_name(version)
    if not path.is_dir():
        have = ", ".join(str(v) for v in snap.list_versions(data_dir)) or "none"
        raise FileNotFoundError(f"no snapshot version {version} under {path.parent} (versions: {have})")
    try:
        manifest = json.loads((path / snap.MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise snap.SnapshotError(path, f"{snap.MANIFEST} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict):
        raise snap.SnapshotError(path, f"{snap.MANIFEST} is not a snapshot manifest")
    return manifest


def _sizes(data_dir: Path | str, version: int) -> dict[str, int]:
    path = snap.snapshots_dir(data_dir) / snap.version_name(version)
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def list_report(data_dir: Path | str) -> dict[str, Any]:
    latest = snap.latest_version(data_dir)
    rows = []
    for v in snap.list_versions(data_dir):
        try:
            m = _manifest(data_dir, v)
        except (OSError, snap.SnapshotError):
            m = {}
        metrics = m.get("metrics") or {}
        rows.append(
            {
                "version": v,
                "created_at": _iso(m.get("created_at")),
                "examples_seen": m.get("examples_seen"),
                **{k: metrics.get(k) for k in HEADLINE_METRICS},
                "size_bytes": sum(_sizes(data_dir, v).values()),
                "latest": v == latest,
            }
        )
    return _clean({"data_dir": str(data_dir), "latest": latest, "versions": rows})


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_list(report: dict[str, Any]) -> str:
    if not report["versions"]:
        return f"no snapshots under {snap.snapshots_dir(report['data_dir'])}"
    lines = [f"  {'version':>8}  {'created_at (UTC)':<20}  {'examples':>10}  {'auc':>6}  {'logloss':>7}  {'size':>9}"]
    for r in report["versions"]:
        lines.append(
            f"{'*' if r['latest'] else ' '} {r['version']:>8}  {r['created_at'] or '-':<20}  "
            f"{_num(r['examples_seen'], 'd'):>10}  {_num(r['serving_auc'], '.4f'):>6}  "
            f"{_num(r['serving_logloss'], '.4f'):>7}  {_human(r['size_bytes']):>9}"
        )
    lines.append(f"* = latest (v{report['latest']:08d})" if report["latest"] is not None else "latest: none")
    return "\n".join(lines)


def show_report(data_dir: Path | str, version: int) -> dict[str, Any]:
    manifest = _manifest(data_dir, version)
    status = snap.verify_version(data_dir, version)
    sizes = _sizes(data_dir, version)
    files = {name: {"size_bytes": sizes.get(name), "checksum": status.get(name, "ok")} for name in sizes}
    for name, st in status.items():  # missing files have no size
        files.setdefault(name, {"size_bytes": None, "checksum": st})
    return _clean(
        {
            "version": version,
            "latest": snap.latest_version(data_dir) == version,
            "manifest": manifest,
            "files": files,
            "verified": all(s == "ok" for s in status.values()),
        }
    )


def format_show(report: dict[str, Any]) -> str:
    lines = [json.dumps(report["manifest"], indent=2, sort_keys=True), "", "files:"]
    for name, f in report["files"].items():
        size = _human(f["size_bytes"]) if f["size_bytes"] is not None else "-"
        lines.append(f"  {name:<24} {size:>10}  {f['checksum'] if name != snap.MANIFEST else ''}".rstrip())
    verdict = "checksums: all verify" if report["verified"] else "checksums: FAIL (see above)"
    lines.append(verdict + ("; this is latest" if report["latest"] else ""))
    return "\n".join(lines)


def _vocab_sizes(meta: dict[str, Any]) -> dict[str, int]:
    feat = meta.get("featurizer") or {}
    # Free rows (expired ids) are null in the list.
    return {k: sum(i is not None for i in (feat.get(k) or {}).get("ids", [])) for k in ("users", "items")}


def _tensor_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], top: int) -> list[dict[str, Any]]:
    """L2 norm of ``b - a`` per shared tensor (on the overlapping slice when a table grew)."""
    out: list[dict[str, Any]] = []
    for name in sorted(set(a) & set(b)):
        ta, tb = a[name].double(), b[name].double()
        if ta.dim() != tb.dim():
            continue
        if ta.shape != tb.shape:
            common = tuple(slice(0, min(x, y)) for x, y in zip(ta.shape, tb.shape, strict=True))
            ta, tb = ta[common], tb[common]
        diff = float(torch.linalg.vector_norm(tb - ta))
        base = float(torch.linalg.vector_norm(ta))
        out.append(
            {
                "tensor": name,
                "shape": [list(a[name].shape), list(b[name].shape)],
                "l2_diff": diff,
                "relative": diff / base if base > 0 else (0.0 if diff == 0 else math.inf),
            }
        )
    out.sort(key=lambda r: r["relative"], reverse=True)
    return out[:top]


def diff_report(data_dir: Path | str, v1: int, v2: int, top: int = 10) -> dict[str, Any]:
    m1, s1 = snap.load_version(data_dir, v1, with_optimizer=False)
    m2, s2 = snap.load_version(data_dir, v2, with_optimizer=False)
    met1, met2 = m1.get("metrics") or {}, m2.get("metrics") or {}
    metrics = {}
    for k in [*HEADLINE_METRICS, *sorted(set(met1) | set(met2))]:
        if k in metrics or (k not in met1 and k not in met2):
            continue
        a, b = met1.get(k), met2.get(k)
        delta = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        metrics[k] = {"from": a, "to": b, "delta": delta}
    mc1, mc2 = m1.get("model_config") or {}, m2.get("model_config") or {}
    model_config = {k: [mc1.get(k), mc2.get(k)] for k in sorted(set(mc1) | set(mc2)) if mc1.get(k) != mc2.get(k)}
    voc1, voc2 = _vocab_sizes(s1.meta), _vocab_sizes(s2.meta)
    seen1, seen2 = int(m1.get("examples_seen", 0)), int(m2.get("examples_seen", 0))
    return _clean(
        {
            "from": v1,
            "to": v2,
            "examples_seen": {"from": seen1, "to": seen2, "delta": seen2 - seen1},
            "metrics": metrics,
            "config_hash_equal": m1.get("config_hash") == m2.get("config_hash"),
            "model_config": model_config,
            "vocab": {k: {"from": voc1[k], "to": voc2[k], "delta": voc2[k] - voc1[k]} for k in voc1},
            "tensors": _tensor_deltas(s1.tensors, s2.tensors, top),
        }
    )


def format_diff(r: dict[str, Any]) -> str:
    ex = r["examples_seen"]
    lines = [
        f"v{r['from']:08d} -> v{r['to']:08d}",
        f"examples_seen: {ex['from']} -> {ex['to']} ({ex['delta']:+d})",
        f"config_hash: {'equal' if r['config_hash_equal'] else 'DIFFERENT'}",
    ]
    for k, v in r["vocab"].items():
        lines.append(f"{k}: {v['from']} -> {v['to']} ({v['delta']:+d})")
    if r["model_config"]:
        lines.append("model_config:")
        lines += [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in r["model_config"].items()]
    else:
        lines.append("model_config: same")
    lines.append("metrics:")
    for k, m in r["metrics"].items():
        if isinstance(m["from"], (int, float)) or isinstance(m["to"], (int, float)):
            delta = f" ({m['delta']:+.4g})" if m["delta"] is not None else ""
            lines.append(f"  {k}: {_num(m['from'], '.4g')} -> {_num(m['to'], '.4g')}{delta}")
    lines.append("tensors (top by relative L2 change):")
    for t in r["tensors"]:
        grew = "" if t["shape"][0] == t["shape"][1] else f"  shape {t['shape'][0]} -> {t['shape'][1]}"
        lines.append(f"  {t['tensor']:<40} l2 {t['l2_diff']:.4g}  rel {_num(t['relative'], '.3%')}{grew}")
    return "\n".join(lines)


def rollback_report(cfg: Config, version: int, force: bool = False, wait_s: float = 30.0) -> dict[str, Any]:
    """Roll ``cfg.data_dir`` back to ``version`` and make Kafka-only scorers follow; what was done.

    * No learner running: move ``latest`` here, then (with ``cfg.kafka.bootstrap_servers``)
      republish ``version`` on the model-updates topic with the rollback marker.
    * A learner running that takes requests: it does both itself and continues from ``version``.
    * ``force`` with a learner that does not: ``latest`` only (its next snapshot supersedes it;
      nothing is sent on Kafka, where that learner is the only writer).

    Keys: ``version``, ``previous``, ``rolled_back_by`` (``cli`` | ``learner``) and
    ``published_on_kafka``. Raises :class:`~livectr.learner.snapshot.RollbackRefused`.
    """
    data_dir = cfg.data_dir
    try:
        before = snap.rollback(data_dir, version, force=force)
    except snap.LearnerRunning as exc:
        if not exc.takes_requests:
            raise
        answer = snap.request_rollback(data_dir, version, wait_s)
        return {
            "version": version,
            "previous": answer.get("previous"),
            "rolled_back_by": "learner",
            "published_on_kafka": bool(answer.get("published_on_kafka")),
        }
    running = force and snap.learner_running(data_dir)
    published = False
    if cfg.kafka.bootstrap_servers and not running:
        try:
            publish_rollback(cfg, version)
        except Exception as exc:  # the pointer moved: say so, and what did not happen
            raise snap.RollbackRefused(
                f"latest now points to v{version:08d}, but republishing it on {cfg.topics.model_updates} failed "
                f"({type(exc).__name__}: {exc}); Kafka-only scorers follow when a learner next starts"
            ) from exc
        published = True
    report = {"version": version, "previous": before, "rolled_back_by": "cli", "published_on_kafka": published}
    if running:
        report["forced_past_learner"] = True
    return report


def rollback_message(data_dir: Path | str, report: dict[str, Any]) -> str:
    version, before = report["version"], report["previous"]
    newest = max(snap.list_versions(data_dir))
    prev = f"v{before:08d}" if before is not None else "none"
    if report.get("rolled_back_by") == "learner":
        learner = (
            f"The running learner rolled back: it continues from v{version:08d}'s weights and Kafka offsets; "
            f"its next snapshot will be v{newest + 1:08d}"
        )
    else:
        learner = (
            f"A learner started now resumes from v{version:08d}'s weights and Kafka offsets; "
            f"its next snapshot will be v{newest + 1:08d}"
        )
    if report.get("published_on_kafka"):
        kafka = f"v{version:08d} republished on the model-updates topic: Kafka-only scorers serve it within seconds.\n"
    elif report.get("forced_past_learner"):
        kafka = (
            "Not sent on Kafka: a learner that takes no rollback requests is running (--force), and its "
            "next snapshot supersedes this rollback.\n"
        )
    else:
        kafka = "Not sent on Kafka (no --bootstrap-servers): Kafka-only scorers follow when a learner next starts.\n"
    return (
        f"latest: {prev} -> v{version:08d} (checksums verified). Scorers on this disk follow within their "
        f"reload interval.\n{kafka}{learner} (versions above {version} are kept, not overwritten)."
    )
