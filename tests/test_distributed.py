"""Data parallelism through accelerate, proven with 2 CPU processes (gloo)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import pixels_recipe, run_cli
from rewardkit import Optimizer
from rewardkit.cli import main
from rewardkit.metrics import read_metrics

STEPS = 8


def recipe(run_dir, steps=STEPS):
    return pixels_recipe(
        run_dir,
        steps=steps,
        run={"batch_size": 4, "checkpoint_every": 4, "keep_checkpoints": 5, "trackers": ["tensorboard"]},
        prompts={"train": ["a", "b", "c", "d", "e", "f"]},
        rewards={"color": {"target": [0.9, 0.1, 0.1]}, "smoothness": {"scale": 100.0}},
        regularizers={"normalize_gradients": {}, "weight_l2": {"weight": 0.01}},
    )


def weights(run_dir, step=STEPS):
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "generator.safetensors")["logits"]


def rewards_of(run_dir):
    return [(r["step"], r["reward/color"], r["reward/smoothness"]) for r in read_metrics(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The recipe's run in one process, to its end: what every run of it below must equal."""
    run_dir = tmp_path_factory.mktemp("ddp") / "straight"
    assert Optimizer.from_recipe(recipe(run_dir)).fit().step == STEPS
    return run_dir


def test_two_processes_equal_one_process_with_the_combined_batch(straight, tmp_path, write_recipe):
    proc = run_cli("run", str(write_recipe(recipe(tmp_path / "two"))), "--num-processes", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done: step 8") == 1, "only rank 0 reports"

    torch.testing.assert_close(weights(tmp_path / "two"), weights(straight), rtol=1e-5, atol=1e-6)
    two, one = rewards_of(tmp_path / "two"), rewards_of(straight)
    assert [s for s, *_ in two] == list(range(1, STEPS + 1)), "each step is logged once, by one process"
    torch.testing.assert_close(torch.tensor([r[1:] for r in two]), torch.tensor([r[1:] for r in one]), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_000004", "step_000008"]


def test_resume_across_process_counts(straight, tmp_path, write_recipe):
    # 1 process for 4 steps, then 2 processes to the end.
    Optimizer.from_recipe(recipe(tmp_path / "a", steps=4)).fit()
    proc = run_cli("run", str(write_recipe(recipe(tmp_path / "a"), "a.toml")), "--resume", "--num-processes", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    torch.testing.assert_close(weights(tmp_path / "a"), weights(straight), rtol=1e-5, atol=1e-6)

    # 2 processes for 4 steps, then 1 process to the end.
    proc = run_cli("run", str(write_recipe(recipe(tmp_path / "b", steps=4), "b.toml")), "--num-processes", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    Optimizer.from_recipe(recipe(tmp_path / "b")).fit(resume=True)
    torch.testing.assert_close(weights(tmp_path / "b"), weights(straight), rtol=1e-5, atol=1e-6)
    assert [s for s, *_ in rewards_of(tmp_path / "b")] == list(range(1, STEPS + 1))


def test_bad_distributed_settings_exit_2_before_any_process_starts(tmp_path, write_recipe, capsys):
    path = write_recipe(recipe(tmp_path / "run"))
    cases = [
        (["--num-processes", "3"], "run.batch_size = 4 does not divide evenly over 3 processes"),
        (["run.accelerate_config=ddp.yaml", "--num-processes", "2"], "accelerate config ddp.yaml: no such file"),
        (["run.accelerate_config=dpp"], "run.accelerate_config: no shipped accelerate config named 'dpp' (did you mean 'ddp'?)"),
        (["--num-processes", "0"], "argument --num-processes: must be at least 1, got 0"),
    ]
    configs = {
        "fsdp1.yaml": ("distributed_type: FSDP\n", "rewardkit runs FSDP2; set fsdp_config.fsdp_version: 2"),
        "zero3.yaml": ("distributed_type: DEEPSPEED\n", "distributed_type DEEPSPEED is not supported (DeepSpeed is not yet)"),
    }
    for name, (text, message) in configs.items():
        (tmp_path / name).write_text(text)
        cases.append(([f"run.accelerate_config={tmp_path / name}", "--num-processes", "2"], message))
    if not torch.cuda.is_available():
        (tmp_path / "gpus.yaml").write_text("distributed_type: MULTI_GPU\n")
        cases.append(([f"run.accelerate_config={tmp_path / 'gpus.yaml'}", "--num-processes", "2"], "needs CUDA GPUs"))
        cases.append((["run.accelerate_config=fsdp", "--num-processes", "2"], "accelerate config 'fsdp' needs CUDA GPUs"))  # FSDP asked on CPU
    existing = write_recipe(recipe(tmp_path / "done", steps=1), "done.toml")
    assert main(["run", str(existing)]) == 0
    capsys.readouterr()
    assert main(["run", str(existing), "--num-processes", "2"]) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    for extra, message in cases:
        try:
            code = main(["run", str(path), *extra])
        except SystemExit as exc:  # argparse's own errors (exit 2, the argument named)
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert message in err, (extra, err)
        assert not (tmp_path / "run").exists()


def test_noise_optimization_shards_prompt_positions(tmp_path, write_recipe):
    """ReNO-style runs under 2 processes: each sample keeps its prompt's noise row (SampleOptions.prompt_index
    is sharded with the batch), so the optimized table equals the single-process one."""
    from rewardkit.testbed import data

    def noise_recipe(run_dir):
        prompts = [data.prompt(d) for d in range(10)] + ["a handwritten digit 3"]  # a repeated prompt keeps its own row
        return {
            "run": {"dir": str(run_dir), "steps": 4, "batch_size": 4, "sample_every": 0, "checkpoint_every": 0, "progress": False, "trackers": []},
            "prompts": {"train": prompts},
            "generator": {"type": "testbed", "num_steps": 2, "training": "noise", "report": False},
            "optimizer": {"name": "adam", "lr": 0.05},
            "rewards": {"digit_classifier": {}},
            "regularizers": {"noise_norm": {"weight": 1.0}, "normalize_gradients": {}},
        }

    Optimizer.from_recipe(noise_recipe(tmp_path / "one")).fit()
    proc = run_cli("run", str(write_recipe(noise_recipe(tmp_path / "two"))), "--num-processes", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    one = load_file(tmp_path / "one" / "checkpoints" / "step_000004" / "generator.safetensors")["noise_table"]
    two = load_file(tmp_path / "two" / "checkpoints" / "step_000004" / "generator.safetensors")["noise_table"]
    init = torch.randn(one.shape, generator=torch.Generator().manual_seed(0))
    assert (one - init).abs().amax(dim=(1, 2, 3)).gt(0).sum() >= 8  # most rows were optimized
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    assert len(list((tmp_path / "two" / "images").glob("*.png"))) == 11  # written once, by rank 0


def test_two_processes_accumulating_equal_one_process_with_the_whole_update(tmp_path, write_recipe):
    """Global batch = batch_size x accumulation (batch_size is over all processes): 2 processes x 2 rows x 2
    micro-batches is one process's batch of 8. SGD, so a mis-scaled accumulated gradient shows."""
    def accumulating(run_dir, batch, accumulation):
        r = recipe(run_dir, steps=4)
        r["run"].update(batch_size=batch, gradient_accumulation_steps=accumulation)
        r["optimizer"] = {"name": "sgd", "lr": 20.0}
        return r

    Optimizer.from_recipe(accumulating(tmp_path / "one", 8, 1)).fit()
    proc = run_cli("run", str(write_recipe(accumulating(tmp_path / "two", 4, 2))), "--num-processes", "2", timeout=300)
    assert proc.returncode == 0, proc.stderr
    start = Optimizer.from_recipe(accumulating(tmp_path / "x", 8, 1))
    start.generator.setup(start.prompts, 0)
    moved = weights(tmp_path / "one", 4) - start.generator.logits.detach()
    assert float(moved.abs().max()) > 1e-3
    torch.testing.assert_close(weights(tmp_path / "two", 4), weights(tmp_path / "one", 4), rtol=1e-5, atol=1e-6)


def test_two_machines_equal_one_process_with_the_combined_batch(tmp_path, write_recipe):
    """Multi-node: two single-process "machines" on 127.0.0.1, each started with the same command and its own
    --machine-rank, take the steps one process takes with their combined batch."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    path = str(write_recipe(recipe(tmp_path / "two", steps=4)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "rewardkit", "run", path, "--num-machines", "2", "--machine-rank", str(rank),
                               "--main-process-ip", "127.0.0.1", "--main-process-port", port],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert outputs[0][0].count("done: step 4") == 1 and "done:" not in outputs[1][0], "only machine 0's rank 0 reports"
    Optimizer.from_recipe(recipe(tmp_path / "one", steps=4)).fit()
    torch.testing.assert_close(weights(tmp_path / "two", 4), weights(tmp_path / "one", 4), rtol=1e-5, atol=1e-6)


def test_bad_multi_node_settings_exit_2(tmp_path, write_recipe, capsys):
    path = str(write_recipe(recipe(tmp_path / "run")))
    for args, message in ((["--num-machines", "2"], "needs --main-process-ip"),
                          (["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "127.0.0.1"], "--machine-rank 2 is not one of the 2 machines"),
                          (["--num-machines", "3", "--main-process-ip", "127.0.0.1"], "run.batch_size = 4 does not divide evenly over 3 processes")):
        assert main(["run", path, *args]) == 2
        assert message in capsys.readouterr().err


def test_a_policy_gradient_next_to_a_pathwise_reward_equals_one_process(tmp_path, write_recipe, monkeypatch):
    """Mixed estimators over 2 processes: groups of 4 spread over both, the advantages from both processes' scores,
    the pathwise and policy terms reduced together (SGD: an unreduced term would move the processes apart). A NaN on
    one process (a throwaway reward, NaN on rank 1 at its second call) skips that step on all of them, with no
    collective mismatch - as in one process, where the same NaN (RANK=1 set by hand) skips the same step."""
    from conftest import PLUGIN_FILES
    from rewardkit.plugins import load_registry

    plugin = str(PLUGIN_FILES / "nan_on_one_rank.py")

    def mixed(run_dir):
        return {
            "run": {"dir": str(run_dir), "steps": 3, "batch_size": 8, "trackers": [], "progress": False, "checkpoint_every": 3},
            "prompts": {"train": [f"a handwritten digit {d}" for d in range(6)]},
            "generator": {"type": "testbed", "num_steps": 2, "eta": 0.7, "training": "lora", "lora_rank": 4, "report": False},
            "optimizer": {"name": "sgd", "lr": 0.5},
            "rewards": {"digit_prototype": {}, "digit_classifier": {"estimator": "score_function"},
                        "nan_on_rank_one": {"target": [0.9, 0.1, 0.1], "weight": 0.1}},
            "policy_gradient": {"group_size": 4},
        }

    proc = run_cli("run", str(write_recipe(mixed(tmp_path / "two"))), "--num-processes", "2", "--plugin", plugin, timeout=300)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("RANK", "1")
    Optimizer.from_recipe(mixed(tmp_path / "one"), registry=load_registry([plugin])).fit()
    monkeypatch.delenv("RANK")
    for run in ("one", "two"):
        history = read_metrics(tmp_path / run / "metrics.jsonl")
        assert [r["step"] for r in history if r["skipped"]] == [2] and history[-1]["nonfinite_total"] == 1, run
    one = load_file(tmp_path / "one" / "checkpoints" / "step_000003" / "generator.safetensors")
    two = load_file(tmp_path / "two" / "checkpoints" / "step_000003" / "generator.safetensors")
    start = Optimizer.from_recipe(mixed(tmp_path / "x"), registry=load_registry([plugin]))
    start.generator.setup(start.prompts, 0)
    initial = {n: p.detach() for n, p in start.generator.named_parameters() if p.requires_grad}
    assert max(float((one[n] - initial[n]).abs().max()) for n in one) > 1e-4  # the weights moved
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)
