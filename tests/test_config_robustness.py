"""Bad configuration is one line and exit 2 before anything starts, never a traceback from a stage."""

from __future__ import annotations

import math
import time

import pytest

from livectr.cli import main
from livectr.core.config import Config, ConfigError, from_env, validate

BASE = ["topics", "--bootstrap-servers", "127.0.0.1:1"]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    start = time.monotonic()
    code = main(argv)
    captured = capsys.readouterr()
    assert time.monotonic() - start < 5, "refused before any broker call"
    out = captured.err + captured.out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    return code, out


def test_foreign_livectr_variables_are_ignored_but_config_typos_are_not() -> None:
    assert from_env({"LIVECTR_STOP_GRACE_S": "3", "LIVECTR_DATA_DIR": "/tmp/d"}).data_dir.as_posix() == "/tmp/d"
    with pytest.raises(ConfigError, match="unknown config section 'jion'"):
        from_env({"LIVECTR_JION__WINDOW_S": "60"})
    with pytest.raises(ConfigError, match="unknown config key 'join.windows_s'"):
        from_env({"LIVECTR_JOIN__WINDOWS_S": "60"})
    with pytest.raises(ConfigError, match="'join.window_s': 'ten minutes' is not a valid float"):
        from_env({"LIVECTR_JOIN__WINDOW_S": "ten minutes"})
    with pytest.raises(ConfigError, match="not a valid bool"):
        from_env({"LIVECTR_SEMANTIC__ENABLED": "maybe"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("kafka.partitions", 0),
        ("join.window_s", -5.0),
        ("join.score_sample", 1.5),
        ("learner.batch_size", 0),
        ("learner.lr", math.nan),
        ("serve.max_candidates", 0),
    ],
)
def test_values_no_run_can_use_are_refused(key: str, value: float) -> None:
    cfg = Config()
    section, _, name = key.partition(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)
    validate(Config())  # the defaults pass


def test_cli_refuses_bad_values_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Used to wait 15 s for topics that never appear, then a TimeoutError traceback.
    code, out = _cli([*BASE, "--partitions", "0"], capsys)
    assert (
        code == 2 and "kafka.partitions must be ≥ 1 and ≤ 65536, not 0 (--partitions, LIVECTR_KAFKA__PARTITIONS)" in out
    )
    # Used to be a ValueError traceback from the learner / the join.
    code, out = _cli(["learn", "--bootstrap-servers", "127.0.0.1:1", "--batch-size", "0"], capsys)
    assert code == 2 and "learner.batch_size must be ≥ 1" in out
    code, out = _cli(["join", "--bootstrap-servers", "127.0.0.1:1", "--window-s", "-5"], capsys)
    assert code == 2 and "join.window_s must be > 0" in out
    code, out = _cli(["join", "--bootstrap-servers", "127.0.0.1:1", "--caught-up-clock", "sometimes"], capsys)
    assert code == 2 and "join.caught_up_clock must be one of off, unbounded, always, not 'sometimes'" in out
    monkeypatch.setenv("LIVECTR_JOIN__WINDOW_S", "ten minutes")  # used to be a ValueError traceback
    code, out = _cli(BASE, capsys)
    assert code == 2 and "join.window_s" in out
    monkeypatch.setenv("LIVECTR_JOIN__WINDOW_S", "60")
    monkeypatch.setenv("LIVECTR_STOP_GRACE_S", "3")  # used to be a KeyError traceback in every command
    code, out = _cli([*BASE, "--partitions", "0"], capsys)
    assert code == 2 and "kafka.partitions" in out
