"""The command line as users run it: run, sample, validate, exit codes."""

from __future__ import annotations

import tomllib

from PIL import Image

from conftest import pixels_recipe, run_cli
from rewardkit.cli import main
from rewardkit.metrics import read_metrics


def test_embedded_recipe_runs_by_name_from_any_folder(tmp_path):
    proc = run_cli("run", "pixels_demo", "run.steps=6", "run.sample_every=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "pixels_demo"
    assert "done: step 6" in proc.stdout
    history = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["reward/total"] > history[0]["reward/total"]
    saved = tomllib.loads((run_dir / "recipe.toml").read_text())
    assert saved["run"]["steps"] == 6, "the resolved recipe, overrides applied, is saved"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000000.png", "step_000003.png", "step_000006.png"]
    assert (run_dir / "summary.json").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs are written"


def test_sample_writes_n_images_and_a_grid_from_run_dir_and_checkpoint(tmp_path, write_recipe, capsys):
    recipe = pixels_recipe(tmp_path / "run", steps=20, run={"checkpoint_every": 10}, rewards={"color": {"target": [0.0, 0.0, 1.0]}})
    assert main(["run", str(write_recipe(recipe))]) == 0

    assert main(["sample", str(tmp_path / "run"), "--prompt", "a red square", "-n", "3", "--out", str(tmp_path / "out")]) == 0
    pngs = sorted((tmp_path / "out").glob("0*.png"))
    assert len(pngs) == 3 and (tmp_path / "out" / "grid.png").is_file()
    final = Image.open(pngs[0]).convert("RGB")
    assert final.size == (16, 16)
    r, g, b = [sum(c) / len(c) for c in zip(*final.getdata())]
    assert b > r + 40, "the trained image is blue, as the reward asked"

    step10 = tmp_path / "run" / "checkpoints" / "step_000010"
    assert main(["sample", str(step10), "--prompt", "a red square", "-n", "1", "--out", str(tmp_path / "out10")]) == 0
    early = Image.open(tmp_path / "out10" / "0000.png").convert("RGB")
    assert list(early.getdata()) != list(final.getdata()), "a checkpoint folder samples that checkpoint's weights"


def test_sample_errors_are_bad_input(tmp_path, write_recipe, capsys):
    assert main(["sample", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    recipe = pixels_recipe(tmp_path / "run", steps=2)
    assert main(["run", str(write_recipe(recipe))]) == 0
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "run"), "--prompt", "a green dog", "--out", str(tmp_path / "o")]) == 2
    assert "has none for 'a green dog'" in capsys.readouterr().err


def test_validate_reports_ok(tmp_path, write_recipe, capsys):
    assert main(["validate", str(write_recipe(pixels_recipe(tmp_path / "r")))]) == 0
    out = capsys.readouterr().out
    assert "ok - generator pixels, rewards color (color), 30 steps" in out
    assert not (tmp_path / "r").exists(), "validate never creates a run directory"


def test_unexpected_failure_exits_1_with_a_traceback(tmp_path, write_recipe):
    plugin = tmp_path / "crash.py"
    plugin.write_text(
        "import rewardkit\nfrom rewardkit.rewards.color import Color\n"
        "class Crash(Color):\n    name = 'crash'\n    def forward(self, images, prompts):\n        raise RuntimeError('boom')\n"
        "@rewardkit.hookimpl\ndef register_rewards(register):\n    register(Crash)\n"
    )
    recipe = pixels_recipe(tmp_path / "run", steps=2, rewards={"crash": {}})
    proc = run_cli("run", str(write_recipe(recipe)), "--plugin", str(plugin))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: boom" in proc.stderr


def test_rerun_into_existing_directory_is_refused(tmp_path, write_recipe, capsys):
    path = write_recipe(pixels_recipe(tmp_path / "run", steps=2))
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path)]) == 2
    assert "pass --resume" in capsys.readouterr().err
