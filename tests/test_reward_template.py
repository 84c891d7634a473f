"""The reward-plugin template becomes a real, installed plugin: copy, rename, pip install,
its own tests pass, `rewardkit plugins` lists it, and a recipe trains with it.

Each step is what docs/writing-a-reward-plugin.md tells a third party to do. The
package is installed into a temporary --target folder (put on PYTHONPATH of the
subprocesses), so the test leaves the environment untouched.
"""

import json

import pytest
from conftest import install_template, run_python as _run

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_template("template-reward", "myreward", "MyReward", tmp_path_factory.mktemp("template"))


def test_template_package_has_the_entry_point(installed):
    pkg, _ = installed
    text = (pkg / "pyproject.toml").read_text()
    assert '[project.entry-points.rewardkit]\nacme = "rewardkit_acme"' in text


def test_template_own_tests_pass_once_installed(installed):
    pkg, env = installed
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], env, cwd=pkg)
    assert "4 passed" in out


def test_listed_and_trained_with_a_recipe(installed, tmp_path):
    pkg, env = installed
    listing = _run(["-m", "rewardkit", "plugins"], env, cwd=tmp_path)
    assert any("acme" in line and "rewardkit-acme" in line for line in listing.splitlines()), listing

    run_dir = tmp_path / "run"
    recipe = tmp_path / "acme.toml"
    recipe.write_text(
        f"""
[run]
dir = "{run_dir.as_posix()}"
steps = 6
batch_size = 2
trackers = []
progress = false

[prompts]
train = ["a colourful parrot", "a bright market"]

[generator]
type = "pixels"
height = 16
width = 16

[optimizer]
name = "adam"
lr = 0.05

[rewards.acme]
weight = 1.0
resolution = 16
"""
    )
    _run(["-m", "rewardkit", "run", str(recipe)], env, cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    first, last = records[0]["reward/acme"], records[-1]["reward/acme"]
    assert last > first  # the optimizer climbs the plugin's reward
