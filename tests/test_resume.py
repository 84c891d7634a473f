"""Kill a run at any moment, resume it, and get exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import rewardkit.checkpoint as checkpoint_module
from conftest import PLUGIN_FILES, pixels_recipe, run_cli
from rewardkit import Optimizer
from rewardkit.checkpoint import latest_checkpoint, list_checkpoints
from rewardkit.errors import WriteFailed
from rewardkit.metrics import read_metrics

VOLATILE = ("time/", "memory/")


def comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in history]


def slow_recipe(run_dir):
    return pixels_recipe(
        run_dir,
        steps=40,
        run={"checkpoint_every": 5, "keep_checkpoints": 3, "sample_every": 10},
        rewards={"slow_color": {"target": [0.2, 0.7, 0.3]}, "smoothness": {}},
        regularizers={"normalize_gradients": {}, "weight_l2": {"weight": 0.01}},
    )


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, write_recipe):
    plugin = str(PLUGIN_FILES / "slow_reward.py")
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_recipe = write_recipe(slow_recipe(killed_dir), "killed.toml")
    clean_recipe = write_recipe(slow_recipe(clean_dir), "clean.toml")

    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardkit", "run", str(killed_recipe), "--plugin", plugin],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ},
    )
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill between checkpoints, after at least two were written
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 13:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(metrics)) if metrics.exists() else 0
    assert 13 <= killed_at < 40, f"the kill must land mid-run, landed after {killed_at} steps"

    resumed = run_cli("run", str(killed_recipe), "--plugin", plugin, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    clean = run_cli("run", str(clean_recipe), "--plugin", plugin)
    assert clean.returncode == 0, clean.stderr

    killed_weights = load_file(killed_dir / "checkpoints" / "step_000040" / "generator.safetensors")
    clean_weights = load_file(clean_dir / "checkpoints" / "step_000040" / "generator.safetensors")
    assert killed_weights.keys() == clean_weights.keys()
    for name in clean_weights:
        assert torch.equal(killed_weights[name], clean_weights[name]), name
    assert comparable(read_metrics(killed_dir / "metrics.jsonl")) == comparable(read_metrics(clean_dir / "metrics.jsonl"))


def test_checkpoint_interrupted_while_written_is_never_picked_up(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    recipe = pixels_recipe(run_dir, steps=6, run={"checkpoint_every": 3})
    real_save_file, calls = checkpoint_module.save_file, []

    def dying_save_file(tensors, path):  # the second checkpoint dies after writing its weights
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", dying_save_file)
    with pytest.raises(WriteFailed, match=r"step_000006 failed: OSError: disk full \(simulated\)\. The last good checkpoint is .*step_000003"):
        Optimizer.from_recipe(recipe).fit()
    monkeypatch.setattr(checkpoint_module, "save_file", real_save_file)

    root = run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_000003"]
    assert not any(p.name.startswith(".tmp-step_000006") for p in root.iterdir()), "a refused write removes its partial folder"
    (root / ".tmp-step_000009-1234").mkdir()  # what a kill mid-write leaves: hidden, never read
    (root / "step_000009").mkdir()  # a step folder without state.json is not complete either
    assert latest_checkpoint(root).name == "step_000003"

    result = Optimizer.from_recipe(recipe).fit(resume=True)
    assert result.step == 6
    assert [p.name for p in list_checkpoints(root)] == ["step_000003", "step_000006"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir()), "stale partial checkpoints are cleaned up"
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=4)
    first = Optimizer.from_recipe(recipe).fit()
    again = Optimizer.from_recipe(recipe).fit(resume=True)
    assert again.step == 4
    assert again.metrics == first.metrics


def test_resume_can_extend_a_run(tmp_path):
    """Continuing a finished 4-step run to 8 steps equals an 8-step run with the same schedule."""
    Optimizer.from_recipe(pixels_recipe(tmp_path / "a", steps=4)).fit()
    extended = Optimizer.from_recipe(pixels_recipe(tmp_path / "a", steps=8)).fit(resume=True)
    straight = Optimizer.from_recipe(pixels_recipe(tmp_path / "b", steps=8)).fit()
    assert comparable([extended.metrics]) == comparable([straight.metrics])


def test_extending_a_cosine_run_follows_the_new_schedule(tmp_path):
    """The LR of an extended cosine run decays over the new length instead of rising past the old end."""
    cosine = {"lr": 0.1, "schedule": "cosine"}
    Optimizer.from_recipe(pixels_recipe(tmp_path / "a", steps=4, optimizer=cosine)).fit()
    Optimizer.from_recipe(pixels_recipe(tmp_path / "a", steps=8, optimizer=cosine)).fit(resume=True)
    Optimizer.from_recipe(pixels_recipe(tmp_path / "b", steps=8, optimizer=cosine)).fit()
    lrs = [r["lr"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")][4:]
    straight = [r["lr"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")][4:]
    assert lrs == pytest.approx(straight)
    assert lrs == sorted(lrs, reverse=True)


def test_resume_without_checkpoint_keeps_no_stale_lines(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=3, eval={"prompts": ["a red square"], "rewards": {"color": {}}})
    Optimizer.from_recipe(recipe).fit()
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed before the first checkpoint
    Optimizer.from_recipe(recipe).fit(resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 2, 3]
