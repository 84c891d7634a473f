"""R0+'s high-resolution guidance: `rewardkit train-hires` and the `high_resolution` reward."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import photo_tiles, pixels_recipe, run_cli

from rewardkit.errors import UserError
from rewardkit.rewards.high_resolution import HighResolution, degrade, load_classifier


def _tiles(folder):
    from torchvision.io import read_image

    return torch.stack([read_image(str(p)).float() / 255 for p in sorted(folder.glob("*.png"))])


def test_classifier_tells_real_photos_from_upsampled_ones(hires_classifier):
    path, tiles = hires_classifier
    model, info = load_classifier(path)
    assert info["resolution"] == 200 and info["train_images"] + info["heldout_images"] == 12
    assert info["heldout_accuracy"] >= 0.75  # held-out real crops above their own degraded copies (chance: 0.5)
    reward = HighResolution(weights=str(path))
    real = _tiles(tiles)
    with torch.no_grad():
        sharp = reward(real, [""] * len(real))
        blurred = reward(degrade(real, torch.full((len(real),), 3.0)), [""] * len(real))
    # Whole 200 px tiles, most of them textured: the real one scores higher nearly everywhere.
    assert (sharp > blurred).float().mean() >= 0.9, (sharp, blurred)
    assert sharp.max() <= 0 and blurred.max() <= 0  # log-probabilities


def test_reward_gradient_is_finite_and_nonzero(hires_classifier):
    path, tiles = hires_classifier
    reward = HighResolution(weights=str(path))
    x = degrade(_tiles(tiles)[:2], torch.tensor([2.0, 4.0])).requires_grad_(True)
    (g,) = torch.autograd.grad(reward(x, ["", ""]).sum(), x)
    assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all()
    assert not any(p.requires_grad and p.grad is not None for p in reward.parameters())


def test_guidance_adds_detail_to_a_flat_image(hires_classifier, tmp_path, write_recipe):
    """End to end through `rewardkit run`: a recipe with the reward raises log p(HR | x)."""
    path, _ = hires_classifier
    recipe = pixels_recipe(
        tmp_path / "run", steps=30, generator={"type": "pixels", "height": 64, "width": 64, "init": "gray"},
        rewards={"high_resolution": {"weights": str(path)}},
    )
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 0, result.stderr
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0]["reward/high_resolution"], history[-1]["reward/high_resolution"]
    assert last > first + 0.5 * abs(first), (first, last)


def test_missing_classifier_says_how_to_train_one(tmp_path, write_recipe):
    recipe = pixels_recipe(tmp_path / "run", rewards={"high_resolution": {"weights": str(tmp_path / "nope.safetensors")}})
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 2
    assert "nope.safetensors" in result.stderr and "rewardkit train-hires" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_safetensors_file_that_is_not_a_classifier_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a high-resolution classifier"):
        HighResolution(weights=str(tmp_path / "other.safetensors"))


def test_train_hires_bad_folders_exit_2(tmp_path, capsys):
    from rewardkit.cli import main

    (tmp_path / "empty").mkdir()
    one = photo_tiles(tmp_path / "one")
    for extra in sorted(one.glob("*.png"))[1:]:
        extra.unlink()
    small = photo_tiles(tmp_path / "small", size=40)
    cases = {
        str(tmp_path / "missing"): "not a folder",
        str(tmp_path / "empty"): "no images",
        str(one): "need at least 2",
        str(small): "need at least 2",  # every tile is smaller than --crop
    }
    for folder, message in cases.items():
        assert main(["train-hires", folder, "--out", str(tmp_path / "c.safetensors"), "--crop", "64", "--steps", "1"]) == 2, folder
        assert message in capsys.readouterr().err
    bad_args = {("--resolution", "32"): "--resolution (32) must be at least --crop (64)", ("--min-factor", "1"): "--min-factor"}
    for extra, message in bad_args.items():
        try:
            code = main(["train-hires", str(tmp_path / "empty"), "--out", str(tmp_path / "c.safetensors"), "--crop", "64", *extra])
        except SystemExit as exc:  # argparse's own errors (exit 2, the argument named)
            code = exc.code
        assert code == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_train_hires_shows_its_progress_unless_told_not_to(tmp_path, monkeypatch, capsys):
    from rewardkit import hires_training
    from rewardkit.hires_training import train

    monkeypatch.setenv("REWARDKIT_PROGRESS", "1")  # bars shown although stderr is captured
    monkeypatch.setattr(hires_training, "heldout_accuracy", lambda *a, **k: 1.0)  # the bar is under test, not the classifier
    tiles = photo_tiles(tmp_path / "tiles")
    kwargs = dict(resolution=64, crop=32, steps=3, batch_size=2, width=8, device="cpu")
    train(tiles, tmp_path / "a.safetensors", **kwargs)
    assert re.search(r"train-hires: 100%.* 3/3 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().err), "steps, elapsed < remaining"
    train(tiles, tmp_path / "b.safetensors", **kwargs, progress=False)
    assert "train-hires" not in capsys.readouterr().err
