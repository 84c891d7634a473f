"""Atomic checkpoints: a checkpoint either exists whole or not at all.

    checkpoints/step_000100/
        generator.safetensors   trainable weights
        optimizer.pt            optimizer + LR schedule state, fp16 loss scale (loaded weights_only)
        rng.safetensors         data-sampling and torch RNG states
        generator_ema.safetensors   the EMA of the trainable weights (optimizer.ema_decay only)
        state.json              step and counters; written last

Everything is written into a hidden temporary folder, flushed to disk, and
renamed into place in one step, so a crash or kill mid-write leaves at most
a `.tmp-*` folder that is never read and is cleaned up on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{6,})$")
COMPLETE_MARKER = "state.json"
EMA_FILE = "generator_ema.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(root: Path, step: int, generator_state, optimizer_state, rng_state, state: dict, keep: int, ema_state=None) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in generator_state.items()}, tmp / "generator.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    save_file(rng_state, tmp / "rng.safetensors")
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, tmp / EMA_FILE)
    (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        fsync(f)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        _discard(final)
    os.replace(tmp, final)
    fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Hide a checkpoint first (one rename), then delete it: a kill mid-delete leaves no half checkpoint."""
    hidden = path.with_name(f".tmp-discard-{path.name}-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(generator state, optimizer state, rng state, state.json) of a checkpoint."""
    state = json.loads((path / COMPLETE_MARKER).read_text())
    generator_state = load_file(path / "generator.safetensors")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng_state = load_file(path / "rng.safetensors")
    return generator_state, optimizer_state, rng_state, state


def load_ema(path: Path) -> dict | None:
    """The EMA weights of a checkpoint, or None when the run kept none."""
    return load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None


def fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
