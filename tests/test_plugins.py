"""Plugin discovery: built-ins, entry points, local files, failures, REWARDKIT_LOAD_PLUGINS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PLUGIN_FILES, pixels_recipe, run_cli
from rewardkit.plugins import load_registry

GOOD_PLUGIN = '''
import rewardkit
from rewardkit.rewards.color import Color

class Blue(Color):
    name = "bluish"

@rewardkit.hookimpl
def register_rewards(register):
    register(Blue)
'''


def fake_distribution(site: Path, dist: str, module: str, source: str, version: str = "1.2.3") -> None:
    """An installed distribution (dist-info + module) exposing a `rewardkit` entry point."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[rewardkit]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "rewardkit-bluish", "bluish_plugin", GOOD_PLUGIN)
    fake_distribution(site, "rewardkit-broken", "broken_plugin", "raise ImportError('this plugin is broken on purpose')\n", "0.0.1")
    return site


def env_with(site: Path, **extra) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **extra}


def test_builtins_are_registered_through_the_hooks():
    registry = load_registry()
    assert {"pixels"} <= set(registry.names("generator"))
    assert {"color", "smoothness"} <= set(registry.names("reward"))
    assert {"weight_l2", "normalize_gradients"} <= set(registry.names("regularizer"))
    assert registry.plugins["reward"]["color"].package == "rewardkit"


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(site, tmp_path, write_recipe):
    proc = run_cli("plugins", "--json", env=env_with(site))
    assert proc.returncode == 0, proc.stderr
    listing = json.loads(proc.stdout)
    bluish = [p for p in listing["plugins"] if p["name"] == "bluish"]
    assert bluish == [{"kind": "reward", "name": "bluish", "package": "rewardkit-bluish", "version": "1.2.3"}]
    assert [(f["plugin"], f["package"]) for f in listing["failed"]] == [("broken_plugin", "rewardkit-broken")]
    assert "broken on purpose" in listing["failed"][0]["error"]
    assert "plugin 'broken_plugin'" in proc.stderr and "skipped" in proc.stderr

    # `rewardkit run` keeps working, and can use the good plugin next to the broken one.
    recipe = pixels_recipe(tmp_path / "run", steps=3, rewards={"bluish": {"target": [0, 0, 1]}})
    proc = run_cli("run", str(write_recipe(recipe)), env=env_with(site))
    assert proc.returncode == 0, proc.stderr
    assert "plugin 'broken_plugin'" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "step_000003").is_dir()


@pytest.mark.parametrize(
    "selection, loaded, failed",
    [("", False, []), ("bluish_plugin", True, []), ("rewardkit-bluish", True, []), ("rewardkit-broken", False, ["rewardkit-broken"])],
)
def test_load_plugins_env_var_selects_installed_plugins(site, monkeypatch, selection, loaded, failed):
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("REWARDKIT_LOAD_PLUGINS", selection)
    registry = load_registry()
    assert ("bluish" in registry.names("reward")) is loaded
    assert [f.package for f in registry.failures if f.package in ("rewardkit-bluish", "rewardkit-broken")] == failed
    assert {"pixels", "color"} <= set(registry.names("generator")) | set(registry.names("reward")), "built-ins always load"


def test_local_plugin_file_registers_and_is_listed():
    registry = load_registry([PLUGIN_FILES / "slow_reward.py"])
    info = registry.plugins["reward"]["slow_color"]
    assert info.package.endswith("slow_reward.py") and info.version == "local"


def test_local_plugin_that_fails_to_import_is_reported(capsys):
    from rewardkit.cli import main

    code = main(["plugins", "--plugin", str(PLUGIN_FILES / "broken_on_import.py")])
    out, err = capsys.readouterr()
    assert code == 0
    assert "FAILED  broken_on_import" in out and "broken on purpose" in out
    assert "color" in out and "pixels" in out


def test_name_clash_is_reported_not_fatal(tmp_path):
    clash = tmp_path / "clash.py"
    clash.write_text(GOOD_PLUGIN.replace('"bluish"', '"color"'))
    registry = load_registry([clash])
    assert registry.plugins["reward"]["color"].package == "rewardkit"
    assert any("already registered by rewardkit" in f.error for f in registry.failures)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys\nfrom rewardkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: rewardkit" in proc.stdout
    assert proc.stdout.strip().endswith("False"), "rewardkit --help must not import torch"


COMMAND_PLUGIN = '''
import rewardkit
from rewardkit.errors import UserError

def arguments(parser):
    parser.add_argument("word")

def hello(args, registry):
    if args.word == "bad":
        raise UserError("hello: 'bad' is not a greeting")
    print(f"hello {args.word}, {len(registry.names('reward'))} rewards")
    return 0

@rewardkit.hookimpl
def register_commands(register):
    register("hello", hello, arguments, help="say hello")

@rewardkit.hookimpl
def run_finished(run_dir, recipe, registry):
    return f"finished {recipe.generator.cls.name} in {run_dir.name}"
'''


def test_a_plugin_adds_a_command_and_an_end_of_run_report(tmp_path, write_recipe):
    """register_commands and run_finished from an installed package (a throwaway distribution)."""
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "rewardkit-hello", "hello_plugin", COMMAND_PLUGIN)
    env = env_with(site)
    proc = run_cli("hello", "world", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello world, ") and "rewards" in proc.stdout
    bad = run_cli("hello", "bad", env=env)
    assert bad.returncode == 2 and "'bad' is not a greeting" in bad.stderr and "Traceback" not in bad.stderr
    listing = json.loads(run_cli("plugins", "--json", env=env).stdout)
    assert {"kind": "command", "name": "hello", "package": "rewardkit-hello", "version": "1.2.3"} in listing["plugins"]
    assert {"kind": "command", "name": "testbed-report", "package": "rewardkit", "version": listing["plugins"][0]["version"]} in listing["plugins"]

    proc = run_cli("run", str(write_recipe(pixels_recipe(tmp_path / "myrun", steps=2))), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "finished pixels in myrun" in proc.stdout

    helped = run_cli("--help", env=env)
    assert "testbed-report" in helped.stdout, "default plugin modules' commands are in --help"
    assert "hello" not in helped.stdout, "--help does not import installed packages"


def test_a_local_plugin_file_adds_a_command_and_cannot_replace_a_core_one(tmp_path):
    local = tmp_path / "hello_local.py"
    local.write_text(COMMAND_PLUGIN.replace('register("hello"', 'register("run", hello, arguments)\n    register("hello"'))
    proc = run_cli("hello", "there", "--plugin", str(local))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hello there, ")
    listing = json.loads(run_cli("plugins", "--json", "--plugin", str(local)).stdout)
    assert [f["plugin"] for f in listing["failed"]] == ["run"] and "rewardkit's own commands" in listing["failed"][0]["error"]
    assert not [p for p in listing["plugins"] if p["kind"] == "command" and p["name"] == "run"]


def test_the_names_plugins_cannot_take_are_the_cli_s_own_commands():
    """plugins.CORE_COMMANDS (below the CLI, which it cannot import) lists exactly cli.COMMANDS."""
    from rewardkit.cli import COMMANDS
    from rewardkit.plugins import CORE_COMMANDS

    assert sorted(CORE_COMMANDS) == sorted(COMMANDS)
