"""The generator-plugin template becomes a real, installed plugin: copy, rename, pip install, its own tests (the
exactness test against the family's diffusers pipeline) pass, `rewardkit plugins` lists it, a recipe trains it and
`rewardkit export` writes it out - each step what docs/writing-a-generator-plugin.md tells a third party to do."""

import json

import pytest
from conftest import install_template, run_python as _run


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_template("template-generator", "mygenerator", "MyGenerator", tmp_path_factory.mktemp("template"))


def test_template_package_has_the_entry_point(installed):
    pkg, _ = installed
    assert '[project.entry-points.rewardkit]\nacme = "rewardkit_acme"' in (pkg / "pyproject.toml").read_text()


def test_template_own_tests_pass_once_installed(installed):
    pkg, env = installed
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], env, cwd=pkg)
    assert "4 passed" in out


def test_listed_trained_with_a_recipe_and_exported(installed, tmp_path):
    pkg, env = installed
    listing = _run(["-m", "rewardkit", "plugins"], env, cwd=tmp_path)
    assert any(line.split()[:3] == ["generator", "acme", "rewardkit-acme"] for line in listing.splitlines()), listing

    model = tmp_path / "tiny-chroma"  # the template's own tiny model, as its tests build it
    _run(["-c", f"import sys; sys.path.insert(0, 'tests'); from test_mygenerator import tiny_pipeline; tiny_pipeline().save_pretrained({str(model)!r})"],
         env, cwd=pkg)
    run_dir = tmp_path / "run"
    recipe = tmp_path / "acme.toml"
    recipe.write_text(f"""
[run]
dir = "{run_dir.as_posix()}"
steps = 4
batch_size = 2
trackers = []
progress = false
sample_every = 0

[prompts]
train = ["a red cat", "a photo of a dog"]

[generator]
type = "acme"
model = "{model.as_posix()}"
height = 16
width = 16
max_sequence_length = 16
num_steps = 2
lora_rank = 4

[optimizer]
lr = 0.05

[rewards.color]
target = [1.0, 0.0, 0.0]
""")
    _run(["-m", "rewardkit", "run", str(recipe)], env, cwd=tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and not any(r["skipped"] for r in records)
    _run(["-m", "rewardkit", "export", str(run_dir), "--format", "lora", "--out", str(tmp_path / "lora")], env, cwd=tmp_path)
    settings = json.loads((tmp_path / "lora" / "rewardkit_export.json").read_text())
    assert settings["generator"] == "acme" and (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
