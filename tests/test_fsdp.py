"""Sharded data parallelism (FSDP2, the shipped `fsdp` config) proven on 2 CPU processes.

accelerate enters FSDP only from a GPU state, so these runs go through
tests/fsdp_on_cpu.py, which applies the shipped configuration as `accelerate
launch` would and pins the accelerator to FSDP: accelerate's own FSDP2
preparation and torch's fully_shard then run on gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_adam_runs_agree
from rewardkit import Optimizer
from rewardkit.metrics import read_metrics

HARNESS = Path(__file__).parent / "fsdp_on_cpu.py"


def run_fsdp(recipe_path: Path, *extra: str) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(HARNESS), "run", str(recipe_path), *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def lora_recipe(run_dir: Path, steps: int, training: str = "lora") -> dict:
    return {
        "run": {"dir": str(run_dir), "steps": steps, "batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 5, "trackers": [], "progress": False},
        "prompts": {"train": [f"a handwritten digit {d}" for d in range(6)]},
        "generator": {"type": "testbed", "num_steps": 2, "training": training, "lora_rank": 4, "report": False},
        "optimizer": {"name": "adam", "lr": 1e-3 if training == "lora" else 1e-5},
        "rewards": {"digit_classifier": {}},
        "regularizers": {"weight_l2": {"weight": 10.0}, "random_eta": {}, "normalize_gradients": {}},
    }


def shared_recipe(run_dir: Path, steps: int) -> dict:
    """The LoRA run the one-process, FSDP and resumed runs below all take, with what sharding must get right besides
    the weights: the weights' average (each process averages its shards; the checkpoint holds the whole average, which
    a resumed FSDP run splits back into shards), and R0+ with a step per sample (each process's rows supervise other
    steps, yet every process must make the same collective network calls: the sampler agrees on the steps and on the
    gradient mode of each)."""
    r = lora_recipe(run_dir, steps)
    r["generator"]["num_steps"] = 3
    r["optimizer"]["ema_decay"] = 0.5
    r["regularizers"]["intermediate_step"] = {"supervision": "random_step", "per_sample": True}
    return r


def weights(run_dir: Path, step: int, name: str = "generator.safetensors") -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / name)


def assert_same_weights_and_average(run_dir: Path, single_dir: Path, lr: float, steps: int) -> None:
    for name in ("generator.safetensors", "generator_ema.safetensors"):
        sharded, single = weights(run_dir, steps, name), weights(single_dir, steps, name)
        assert set(sharded) == set(single) and single and all(v.shape == single[k].shape for k, v in sharded.items())  # whole tensors
        for k in single:  # (an average of weights that agree as Adam runs do agrees at least as well)
            assert_adam_runs_agree(sharded[k], single[k], lr, steps)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "straight"
    Optimizer.from_recipe(shared_recipe(run_dir, 4)).fit()
    return run_dir


def assert_logged_alike(run_dir: Path, single_dir: Path, steps: int) -> None:
    logged = [(h["step"], h["reward/digit_classifier"], h["penalty/weight_l2"]) for h in read_metrics(run_dir / "metrics.jsonl")]
    expected = [(h["step"], h["reward/digit_classifier"], h["penalty/weight_l2"]) for h in read_metrics(single_dir / "metrics.jsonl")]
    assert expected[-1][2] > 0  # it trained away from theta_0
    assert [s for s, *_ in logged] == list(range(1, steps + 1)), "each step logged once, by one process"
    torch.testing.assert_close(torch.tensor([r[1:] for r in logged]), torch.tensor([r[1:] for r in expected]), rtol=1e-4, atol=1e-6)


def test_fsdp_equals_one_process(straight, tmp_path, write_recipe):
    """The testbed teacher fully sharded (every block its own shard group, resharded after use), LoRA under weight
    L2, with the weights' average and R0+ per sample: the same run as one process."""
    proc = run_fsdp(write_recipe(shared_recipe(tmp_path / "run", 4)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 4") == 1, "only rank 0 reports"
    assert_same_weights_and_average(tmp_path / "run", straight, lora_recipe(tmp_path, 4)["optimizer"]["lr"], 4)
    assert_logged_alike(tmp_path / "run", straight, 4)
    optimizer_state = torch.load(tmp_path / "run" / "checkpoints" / "step_000004" / "optimizer.pt", weights_only=True)["optimizer"]
    assert set(optimizer_state["state"]) == set(weights(straight, 4))  # name-keyed, gathered from the shards


def test_full_fine_tuning_under_fsdp_equals_one_process(tmp_path, write_recipe):
    Optimizer.from_recipe(lora_recipe(tmp_path / "single", 4, "full")).fit()
    proc = run_fsdp(write_recipe(lora_recipe(tmp_path / "run", 4, "full")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = weights(tmp_path / "run", 4), weights(tmp_path / "single", 4)
    assert set(sharded) == set(single) and all(v.shape == single[k].shape for k, v in sharded.items())
    for k in single:
        assert_adam_runs_agree(sharded[k], single[k], lora_recipe(tmp_path, 4, "full")["optimizer"]["lr"], 4)
    assert_logged_alike(tmp_path / "run", tmp_path / "single", 4)


def test_resume_between_fsdp_and_one_process(straight, tmp_path, write_recipe):
    # 1 process for 2 steps, then FSDP to the end
    Optimizer.from_recipe(shared_recipe(tmp_path / "a", 2)).fit()
    proc = run_fsdp(write_recipe(shared_recipe(tmp_path / "a", 4), "a.toml"), "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # FSDP for 2 steps, then 1 process to the end
    proc = run_fsdp(write_recipe(shared_recipe(tmp_path / "b", 2), "b.toml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    Optimizer.from_recipe(shared_recipe(tmp_path / "b", 4)).fit(resume=True)
    for run in ("a", "b"):
        assert_same_weights_and_average(tmp_path / run, straight, lora_recipe(tmp_path, 4)["optimizer"]["lr"], 4)


def test_a_noise_run_under_fsdp_writes_the_images_of_one_process(tmp_path, write_recipe):
    """ReNO's result under full sharding: the noise table is gathered, every process draws, rank 0 writes."""
    import numpy as np
    from PIL import Image

    def noise_recipe(run_dir: Path) -> dict:
        recipe = lora_recipe(run_dir, 2, "noise")
        recipe["prompts"]["train"] = [f"a handwritten digit {d}" for d in (0, 1, 2, 3, 4, 3)]
        recipe["optimizer"]["lr"] = 0.05
        recipe["regularizers"] = {"noise_norm": {}}
        return recipe

    Optimizer.from_recipe(noise_recipe(tmp_path / "single")).fit()
    proc = run_fsdp(write_recipe(noise_recipe(tmp_path / "run")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, sharded = tmp_path / "single" / "images", tmp_path / "run" / "images"
    assert (sharded / "index.jsonl").read_text() == (single / "index.jsonl").read_text()
    files = sorted(p.name for p in single.glob("*.png"))
    assert len(files) == 6 and sorted(p.name for p in sharded.glob("*.png")) == files
    for name in files:  # 8-bit PNGs of float32 images whose sums ran in another order: at most one level apart
        a = np.asarray(Image.open(single / name), dtype=np.int16)
        b = np.asarray(Image.open(sharded / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def test_accumulation_and_a_policy_gradient_under_fsdp_equal_one_process_with_the_whole_update(tmp_path, write_recipe):
    """2 processes x 2 rows x 2 micro-batches under FSDP = one process's batch of 8, with a pathwise reward and a
    score-function one (GRPO, groups of 4 spread over both processes and micro-batches, two updates per batch, a KL
    penalty to theta_0): the rollouts, their advantages from every shard's scores and both updates are the same."""
    def recipe(run_dir: Path, batch: int, accumulation: int) -> dict:
        r = lora_recipe(run_dir, 2)
        r["run"].update(batch_size=batch, gradient_accumulation_steps=accumulation)
        r["generator"]["eta"] = 0.7
        r["rewards"]["digit_correct"] = {"estimator": "score_function"}
        r["regularizers"] = {"weight_l2": {"weight": 10.0}, "normalize_gradients": {}, "kl_reference": {"weight": 1.0}}
        r["policy_gradient"] = {"group_size": 4, "updates_per_batch": 2}
        return r

    Optimizer.from_recipe(recipe(tmp_path / "single", 8, 1)).fit()
    sharded_recipe = recipe(tmp_path / "run", 4, 2)
    sharded_recipe["generator"]["text_encoders"] = "free"  # encoded before sharding; FSDP then wraps what is left
    proc = run_fsdp(write_recipe(sharded_recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = weights(tmp_path / "run", 2), weights(tmp_path / "single", 2)
    for k in single:
        assert_adam_runs_agree(sharded[k], single[k], lora_recipe(tmp_path, 2)["optimizer"]["lr"], 4)  # 2 updates a step
    logged, expected = (read_metrics(d / "metrics.jsonl") for d in (tmp_path / "run", tmp_path / "single"))
    for key in ("reward/digit_correct", "policy/ratio"):
        torch.testing.assert_close(torch.tensor([h[key] for h in logged]), torch.tensor([h[key] for h in expected]), rtol=1e-5, atol=1e-9)
    # the KL is quadratic in the weights' moves (about lr per step), which agree to 1e-5 absolute (0.25% of a move):
    # it agrees to about twice that
    torch.testing.assert_close(torch.tensor([h["policy/kl"] for h in logged]), torch.tensor([h["policy/kl"] for h in expected]), rtol=1e-2, atol=0)
    assert expected[-1]["policy/kl"] > 0 and expected[-1]["policy/ratio"] != 1.0


def test_a_skipped_update_under_fsdp_accumulation_leaves_nothing_behind(tmp_path, write_recipe, monkeypatch):
    """NaN in the last micro-batch of update 1 (on rank 1): the update is skipped, and update 2 starts from
    clean gradients - as in one process, where the same NaN (RANK=1 set by hand) skips update 1 too."""
    from rewardkit.plugins import load_registry

    plugin = str(Path(__file__).parent / "plugin_files" / "nan_on_one_rank.py")

    def recipe(run_dir: Path) -> dict:
        r = lora_recipe(run_dir, 2)
        r["run"].update(batch_size=4, gradient_accumulation_steps=2)
        r["rewards"]["nan_on_rank_one"] = {"target": [0.9, 0.1, 0.1]}
        return r

    proc = run_fsdp(write_recipe(recipe(tmp_path / "run")), "--plugin", plugin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("RANK", "1")
    Optimizer.from_recipe(recipe(tmp_path / "single"), registry=load_registry([plugin])).fit()
    for run in ("run", "single"):
        assert [r["skipped"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "skipped" in r] == [True, False], run
    sharded, single = weights(tmp_path / "run", 2), weights(tmp_path / "single", 2)
    for k in single:
        assert_adam_runs_agree(sharded[k], single[k], lora_recipe(tmp_path, 2)["optimizer"]["lr"], 1)
