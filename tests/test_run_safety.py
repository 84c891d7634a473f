"""Nothing lost, nothing unexplained: damaged checkpoints, refused writes, durable renames, one writer per run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rewardkit.checkpoint as checkpoint_module
from conftest import PLUGIN_FILES, pixels_recipe, run_cli
from rewardkit import Optimizer
from rewardkit.cli import main
from rewardkit.checkpoint import list_checkpoints, usable_checkpoint, verify_checkpoint
from rewardkit.durable import write_text_atomic
from rewardkit.metrics import read_metrics


def weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "generator.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ----------------------------------------------------------------------------- checksums
def test_state_json_records_each_files_size_and_sha256(tmp_path):
    Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=2, optimizer={"ema_decay": 0.9})).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    files = json.loads((ckpt / "state.json").read_text())["files"]
    on_disk = {p.name for p in ckpt.iterdir()} - {"state.json"}
    assert set(files) == on_disk == {"generator.safetensors", "optimizer.pt", "rng.safetensors", "generator_ema.safetensors"}
    for name, recorded in files.items():
        data = (ckpt / name).read_bytes()
        assert recorded == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def damage(checkpoint: Path, how: str) -> None:
    if how == "truncated weights":
        truncate(checkpoint / "generator.safetensors")
    elif how == "flipped byte":  # same size, one bit changed: only the checksum sees it
        data = bytearray((checkpoint / "generator.safetensors").read_bytes())
        data[-5] ^= 0x01
        (checkpoint / "generator.safetensors").write_bytes(bytes(data))
    elif how == "garbage state.json":
        (checkpoint / "state.json").write_bytes(b"\x00\xff{not json")
    else:
        (checkpoint / "rng.safetensors").unlink()


@pytest.mark.parametrize("how", ["truncated weights", "flipped byte", "garbage state.json", "missing rng"])
def test_resume_sets_a_damaged_checkpoint_aside_and_ends_as_an_uninterrupted_run(tmp_path, caplog, how):
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    run = {"checkpoint_every": 2, "keep_checkpoints": 3}
    Optimizer.from_recipe(pixels_recipe(clean, steps=6, run=run)).fit()
    Optimizer.from_recipe(pixels_recipe(damaged, steps=4, run=run)).fit()  # as if stopped after step 4's checkpoint
    newest = damaged / "checkpoints" / "step_000004"
    damage(newest, how)

    with caplog.at_level("INFO", logger="rewardkit"):
        result = Optimizer.from_recipe(pixels_recipe(damaged, steps=6, run=run)).fit(resume=True)
    assert f"checkpoint {newest} is damaged" in caplog.text and "set aside as damaged-step_000004" in caplog.text
    assert f"resuming from {damaged / 'checkpoints' / 'step_000002'}" in caplog.text
    assert (damaged / "checkpoints" / "damaged-step_000004").is_dir(), "set aside, not deleted"
    assert result.step == 6
    assert_same_weights(weights(damaged, 6), weights(clean, 6))
    assert [r["step"] for r in read_metrics(damaged / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_no_intact_checkpoint_exits_2_naming_them(tmp_path, write_recipe, capsys):
    recipe = write_recipe(pixels_recipe(tmp_path / "run", steps=4, run={"checkpoint_every": 2}))
    assert main(["run", str(recipe)]) == 0
    for step in (2, 4):
        truncate(tmp_path / "run" / "checkpoints" / f"step_{step:06d}" / "optimizer.pt")
    capsys.readouterr()
    assert main(["run", str(recipe), "run.steps=6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint in" in err and "step_000004, step_000002 are damaged" in err


def test_sample_takes_the_newest_intact_checkpoint_of_a_run_directory(tmp_path, write_recipe, capsys, caplog):
    """(export and eval read checkpoints through the same rundir.resolve_run_path.)"""
    recipe = write_recipe(pixels_recipe(tmp_path / "run", steps=4, run={"checkpoint_every": 2}))
    assert main(["run", str(recipe)]) == 0
    newest = tmp_path / "run" / "checkpoints" / "step_000004"
    truncate(newest / "generator.safetensors")
    capsys.readouterr()

    assert main(["sample", str(newest), "--prompt", "a red square", "-n", "1", "--out", str(tmp_path / "s0")]) == 2
    assert f"checkpoint {newest} is damaged: generator.safetensors has" in capsys.readouterr().err

    assert main(["sample", str(tmp_path / "run"), "--prompt", "a red square", "-n", "1", "--out", str(tmp_path / "s1")]) == 0
    assert "is damaged" in caplog.text and "step_000002" in capsys.readouterr().out
    assert not newest.exists() and (newest.parent / "damaged-step_000004").is_dir()


def test_a_reader_skips_but_does_not_rename_a_damaged_checkpoint_while_a_run_holds_the_directory(tmp_path, write_recipe, capsys):
    from rewardkit.rundir import claim_run_dir

    recipe = write_recipe(pixels_recipe(tmp_path / "run", steps=4, run={"checkpoint_every": 2}))
    assert main(["run", str(recipe)]) == 0
    newest = tmp_path / "run" / "checkpoints" / "step_000004"
    truncate(newest / "generator.safetensors")
    lock = claim_run_dir(tmp_path / "run")  # as a live (resumed) run would
    try:
        capsys.readouterr()
        assert main(["sample", str(tmp_path / "run"), "--prompt", "a red square", "-n", "1", "--out", str(tmp_path / "s")]) == 0
        assert "step_000002" in capsys.readouterr().out
        assert newest.is_dir(), "the writer's folder is not renamed under it"
    finally:
        lock.release()


def test_checkpoints_of_earlier_versions_without_checksums_still_resume(tmp_path):
    """Run directories written before checksums were recorded: intact ones are used, truncated ones detected."""
    recipe = pixels_recipe(tmp_path / "run", steps=4, run={"checkpoint_every": 2})
    Optimizer.from_recipe(recipe).fit()
    for ckpt in list_checkpoints(tmp_path / "run" / "checkpoints"):
        state = json.loads((ckpt / "state.json").read_text())
        del state["files"]
        (ckpt / "state.json").write_text(json.dumps(state))
        assert verify_checkpoint(ckpt) is None
    truncate(tmp_path / "run" / "checkpoints" / "step_000004" / "optimizer.pt", keep=0.9)
    assert "do not parse" in verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_000004")
    assert usable_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000002"


# ----------------------------------------------------------------------------- refused writes (a real file-size limit)
def run_limited(recipe: Path, limit: int, *args: str) -> subprocess.CompletedProcess:
    """`rewardkit run` with RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ).
    The limit is set by the child itself, before it imports rewardkit (no preexec_fn in a threaded parent)."""
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.argv = ['rewardkit', 'run', *{[str(recipe), *args]!r}]; runpy.run_module('rewardkit', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_refused_checkpoint_write_stops_the_run_and_keeps_the_last_good_one(tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    recipe = write_recipe(pixels_recipe(run_dir, steps=8, run={"checkpoint_every": 2}))
    assert main(["run", str(recipe), "run.steps=4"]) == 0
    good = run_dir / "checkpoints" / "step_000004"
    limit = (good / "optimizer.pt").stat().st_size - 1  # the next optimizer.pt cannot be written; everything else can
    assert (run_dir / "metrics.jsonl").stat().st_size * 3 < limit

    failed = run_limited(recipe, limit, "--resume")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"writing checkpoint {run_dir / 'checkpoints' / 'step_000006'} failed: File too large" in failed.stderr  # optimizer.pt
    assert f"The last good checkpoint is {good}; free space, then continue with --resume" in failed.stderr
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_000002", "step_000004"]
    assert verify_checkpoint(good) is None
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")], "the partial folder is removed"
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    assert main(["run", str(recipe), "--resume"]) == 0  # space again: it goes on as if nothing happened
    straight = tmp_path / "straight"
    assert main(["run", str(recipe), f"run.dir={straight}"]) == 0
    assert_same_weights(weights(run_dir, 8), weights(straight, 8))


def test_a_refused_metrics_line_is_cut_off_not_left_torn(tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    recipe = write_recipe(pixels_recipe(run_dir, steps=40, run={"checkpoint_every": 0, "sample_every": 0}))
    probe = tmp_path / "probe"
    assert main(["run", str(recipe), f"run.dir={probe}", "run.steps=2"]) == 0
    lines = (probe / "metrics.jsonl").read_text().splitlines(keepends=True)
    biggest_other = max(p.stat().st_size for p in probe.rglob("*") if p.is_file() and p.parent.name == "samples")
    limit = max(biggest_other, len(lines[0]) * 3) + len(lines[0]) // 2  # a line boundary never falls on it exactly
    assert limit < len(lines[0]) * 30

    failed = run_limited(recipe, limit)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"writing {run_dir / 'metrics.jsonl'} failed: File too large" in failed.stderr
    assert "The last good checkpoint is none yet" in failed.stderr
    data = (run_dir / "metrics.jsonl").read_bytes()
    assert 0 < len(data) <= limit and data.endswith(b"\n")
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(data.splitlines()) == len(records) and [r["step"] for r in records] == list(range(1, len(records) + 1))


def test_a_refused_grid_write_is_reported_and_leaves_no_partial_file(tmp_path, write_recipe):
    run_dir = tmp_path / "run"
    recipe = write_recipe(pixels_recipe(run_dir, steps=2, generator={"height": 64, "width": 64}))
    probe = tmp_path / "probe"
    assert main(["run", str(recipe), f"run.dir={probe}"]) == 0
    grid = (probe / "samples" / "step_000000.png").stat().st_size
    assert (probe / "recipe.toml").stat().st_size < grid // 2
    failed = run_limited(recipe, grid // 2)  # the recipe fits, the grid does not
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert f"writing sample grid {run_dir / 'samples' / 'step_000000.png'} failed: File too large" in failed.stderr
    assert list((run_dir / "samples").iterdir()) == []


def test_a_torn_last_line_is_dropped_by_readers_and_on_resume(tmp_path):
    recipe = pixels_recipe(tmp_path / "run", steps=4, run={"checkpoint_every": 2})
    Optimizer.from_recipe(recipe).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # what a kill in the middle of a write leaves
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4]
    Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=6, run={"checkpoint_every": 2})).fit(resume=True)
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- durable renames
def test_every_atomic_write_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    """The order of fsyncs and renames: a file's data, then its rename, then its folder's entry. Checkpoints:
    each file and the temporary folder's entries before the folder takes its name."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])

    target = tmp_path / "summary.json"
    write_text_atomic(target, "{}")
    tmp = str(tmp_path / f".summary.json.tmp-{os.getpid()}.json")
    assert events == [("fsync", tmp), ("replace", tmp, str(target)), ("fsync", str(tmp_path))]

    events.clear()
    root = tmp_path / "checkpoints"
    t = {"w": torch.ones(2)}
    checkpoint_module.save_checkpoint(root, 3, t, {"x": 1}, {"r": torch.zeros(1)}, {"nonfinite_total": 0}, keep=2)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(root / "step_000003"))
    tmp_dir = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert synced == {tmp_dir, *(f"{tmp_dir}/{n}" for n in ("generator.safetensors", "optimizer.pt", "rng.safetensors", "state.json"))}
    assert ("fsync", str(root)) in events[rename:]


def test_resaving_a_step_always_leaves_a_complete_copy_of_it(tmp_path, monkeypatch):
    """A crash between moving the old copy away and moving the new one in: the old copy is still found."""
    root = tmp_path / "checkpoints"
    save = checkpoint_module.save_checkpoint
    save(root, 3, {"w": torch.ones(2)}, {"x": 1}, {"r": torch.zeros(1)}, {"nonfinite_total": 0}, keep=2)
    real_replace = os.replace

    def crash_after_first_rename(a, b):
        real_replace(a, b)
        if str(b).endswith(".previous"):
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", crash_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save(root, 3, {"w": torch.full((2,), 2.0)}, {"x": 1}, {"r": torch.zeros(1)}, {"nonfinite_total": 0}, keep=2)
    monkeypatch.setattr(os, "replace", real_replace)
    [found] = list_checkpoints(root)
    assert found.name == "step_000003.previous" and verify_checkpoint(found) is None
    assert torch.equal(load_file(found / "generator.safetensors")["w"], torch.ones(2))

    save(root, 3, {"w": torch.full((2,), 2.0)}, {"x": 1}, {"r": torch.zeros(1)}, {"nonfinite_total": 0}, keep=2)  # the next save completes it
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == ["step_000003"]
    assert torch.equal(load_file(root / "step_000003" / "generator.safetensors")["w"], torch.full((2,), 2.0))

    # a crash after the new copy is in place but before the old one is dropped: the next save drops it
    (root / "step_000003").rename(root / "keep")
    shutil.copytree(root / "keep", root / "step_000003.previous")
    (root / "keep").rename(root / "step_000003")
    save(root, 4, {"w": torch.ones(2)}, {"x": 1}, {"r": torch.zeros(1)}, {"nonfinite_total": 0}, keep=2)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step_000003", "step_000004"]


# ----------------------------------------------------------------------------- early refusal, one writer
def test_an_unusable_run_directory_is_refused_before_anything_is_built(tmp_path, write_recipe, capsys):
    """The generator plugin announces when it is built: a refused run directory must come first."""
    plugin = tmp_path / "announcing.py"
    plugin.write_text(
        "import sys\nimport rewardkit\nfrom rewardkit.generators.pixels import Pixels\n\n"
        "class Announcing(Pixels):\n    name = 'announcing'\n\n"
        "    def __init__(self, **options):\n        print('BUILT', file=sys.stderr)\n        super().__init__(**options)\n\n"
        "@rewardkit.hookimpl\ndef register_generators(register):\n    register(Announcing)\n"
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for run_dir, expected in ((a_file, "is a file, not a folder"), (a_file / "run", "cannot be written"),
                              (Path("/proc/rewardkit-run"), "cannot be written")):
        recipe = write_recipe(pixels_recipe(run_dir, steps=2, generator={"type": "announcing"}))
        assert main(["run", str(recipe), "--plugin", str(plugin)]) == 2, run_dir
        err = capsys.readouterr().err
        assert expected in err and "BUILT" not in err, err
    assert main(["run", str(write_recipe(pixels_recipe(tmp_path / "fine", steps=1, generator={"type": "announcing"}))), "--plugin", str(plugin)]) == 0
    assert "BUILT" in capsys.readouterr().err  # the plugin does announce itself


def test_a_second_writer_is_refused_and_a_killed_ones_lock_does_not_block(tmp_path, write_recipe):
    plugin = str(PLUGIN_FILES / "slow_reward.py")
    run_dir = tmp_path / "run"
    recipe = write_recipe(pixels_recipe(run_dir, steps=5000, run={"checkpoint_every": 2}, rewards={"slow_color": {}}))  # killed long before its end
    proc = subprocess.Popen([sys.executable, "-m", "rewardkit", "run", str(recipe), "--plugin", plugin],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run_dir / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.02)
        second = run_cli("run", str(recipe), "--plugin", plugin, "--resume")
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"run directory {run_dir} is in use: process {proc.pid} on " in second.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert main(["run", str(recipe), "--plugin", plugin, "--resume", "run.steps=1"]) == 0  # the dead holder's lock went with it


def test_the_lock_is_released_when_a_run_ends_in_process(tmp_path, monkeypatch):
    recipe = pixels_recipe(tmp_path / "run", steps=2)
    Optimizer.from_recipe(recipe).fit()
    Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=3)).fit(resume=True)  # the same process, again

    def failing_step(self, step):
        raise RuntimeError("a bug mid-run")

    monkeypatch.setattr(Optimizer, "_step", failing_step)
    with pytest.raises(RuntimeError, match="a bug mid-run"):
        Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=4)).fit(resume=True)
    monkeypatch.undo()
    assert Optimizer.from_recipe(pixels_recipe(tmp_path / "run", steps=4)).fit(resume=True).step == 4


def test_a_bug_in_what_is_written_is_not_reported_as_a_full_disk(tmp_path):
    from rewardkit.images import save_grid

    with pytest.raises(NotImplementedError):  # a meta tensor cannot be copied out: a bug, with its traceback
        save_grid(torch.empty(2, 3, 8, 8, device="meta"), tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []
