"""The house rules: one installed namespace, and stages that depend one way.

Layers, bottom to top: ``livectr.core`` ← ``livectr.simulators`` and ``livectr.streams`` ←
``livectr.semantic_cache`` ← ``livectr.learner`` ← ``livectr.pipeline`` ← ``livectr.chaos`` ← ``livectr.cli``. A
module may import its own layer and the layers below, never above, and no stage imports the
command line. Checked on the source (every ``import`` statement, including ones inside
functions), so a cycle cannot hide in a function body.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder of each installed package.
FOLDERS = {
    "livectr.core": ROOT / "livectr" / "core",
    "livectr.simulators": ROOT / "simulators",
    "livectr.streams": ROOT / "streams",
    "livectr.semantic_cache": ROOT / "semantic_cache",
    "livectr.learner": ROOT / "learner",
    "livectr.cli": ROOT / "livectr" / "cli.py",
    "livectr.pipeline": ROOT / "livectr" / "pipeline.py",
    "livectr.chaos": ROOT / "livectr" / "chaos.py",
}
LAYER = {
    "livectr.core": 0,
    "livectr.simulators": 1,
    "livectr.streams": 1,
    "livectr.semantic_cache": 2,
    "livectr.learner": 3,
    "livectr.cli": 5,
    "livectr.pipeline": 4,
    "livectr.chaos": 4.5,
}


def _package_of(module: str) -> str | None:
    for name in sorted(LAYER, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _sources() -> list[tuple[str, Path]]:
    found = []
    for package, folder in FOLDERS.items():
        files = [folder] if folder.suffix == ".py" else sorted(folder.rglob("*.py"))
        found.extend((package, f) for f in files)
    return found


def test_stages_import_only_their_own_layer_and_below() -> None:
    upward = []
    for package, path in _sources():
        for module in _imports(path):
            if module.split(".")[0] in {"streams", "learner", "semantic_cache", "simulators"}:
                upward.append(f"{path.relative_to(ROOT)} imports {module} (outside the livectr namespace)")
                continue
            target = _package_of(module)
            if target is not None and target != package and LAYER[target] >= LAYER[package]:
                upward.append(f"{path.relative_to(ROOT)} ({package}) imports {module} ({target})")
    assert not upward, "\n".join(upward)


def test_installed_namespace_has_no_top_level_stage_packages(tmp_path: Path) -> None:
    """From outside the source tree, ``livectr.streams`` imports and ``streams`` does not."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import importlib.util, livectr.streams, livectr.learner, livectr.semantic_cache, livectr.simulators\n"
        "bad = [n for n in ('streams', 'learner', 'semantic_cache', 'simulators') if importlib.util.find_spec(n)]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    if "No module named 'livectr'" in result.stderr:
        pytest.skip("livectr is not installed in this interpreter")
    assert result.returncode == 0, result.stderr


def test_every_policy_is_accepted_with_its_defaults() -> None:
    """The command line accepts each labelling policy with the default settings (a policy the
    join knows but the flags refused would be unusable)."""
    from livectr.cli import build_config, build_parser
    from livectr.streams.join import POLICIES

    for policy in POLICIES:
        cfg = build_config(build_parser().parse_args(["join", "--policy", policy]))
        assert cfg.join.policy == policy
    with pytest.raises(SystemExit):
        build_config(build_parser().parse_args(["join", "--policy", "defer", "--defer-wait-s", "900"]))


def test_repartition_is_on_by_default_and_the_flag_turns_it_off() -> None:
    from livectr.cli import build_config, build_parser

    for command in ("join", "run"):
        assert build_config(build_parser().parse_args([command])).join.repartition is True
        assert build_config(build_parser().parse_args([command, "--repartition", "off"])).join.repartition is False
