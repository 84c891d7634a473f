"""Atomic, verified checkpoints: a checkpoint exists whole or not at all, and a damaged one is never trained from.

    checkpoints/step_000100/
        generator.safetensors   trainable weights
        optimizer.pt            optimizer + LR schedule state, fp16 loss scale (loaded weights_only)
        rng.safetensors         data-sampling and torch RNG states
        generator_ema.safetensors   the EMA of the trainable weights (optimizer.ema_decay only)
        state.json              step, counters and each file's size and SHA-256; written last

Everything is written into a hidden temporary folder, flushed to disk (files
and the folder's entries), and renamed into place in one step, so a crash,
kill or full disk mid-write leaves at most a `.tmp-*` folder that is never
read and is cleaned up on the next save. Re-saving a step first renames the
old copy to `step_000100.previous`, which readers take while the new one is
not there yet: at no moment is there no complete checkpoint of that step.

`usable_checkpoint` checks a checkpoint's files against state.json before
anything loads it; one that does not match (truncated or edited weights, a
garbage state.json, a file missing) is set aside as `damaged-step_000100`
(renamed, never deleted) and the newest intact older one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewardkit.durable import WRITE_ERRORS, failure, fsync
from rewardkit.errors import UserError, WriteFailed

log = logging.getLogger("rewardkit")

STEP_DIR = re.compile(r"^step_(\d{6,})(\.previous)?$")  # .previous: the old copy while a step is re-saved
COMPLETE_MARKER = "state.json"
EMA_FILE = "generator_ema.safetensors"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(root: Path, step: int, generator_state, optimizer_state, rng_state, state: dict, keep: int, ema_state=None) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep`. A refused write (no space, a
    file-size limit, an I/O error) raises WriteFailed and leaves the checkpoints there were untouched."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    generator_state = {k: v.detach().cpu().contiguous() for k, v in generator_state.items()}
    ema_state = None if ema_state is None else {k: v.detach().cpu().contiguous() for k, v in ema_state.items()}
    for stale in root.glob("step_*.previous"):  # a crash after a re-save's rename: the new copy is there, drop the old
        if (root / stale.name.removesuffix(".previous") / COMPLETE_MARKER).is_file():
            _discard(stale)
    try:
        tmp.mkdir()
        save_file(generator_state, tmp / "generator.safetensors")
        with open(tmp / "optimizer.pt", "wb") as f:  # through Python's file: a refused write says why (torch's own: "iostream error")
            torch.save(optimizer_state, f)
        save_file(rng_state, tmp / "rng.safetensors")
        if ema_state is not None:
            save_file(ema_state, tmp / EMA_FILE)
        files = {f.name: _fingerprint(f) for f in sorted(tmp.iterdir())}
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, **state, "files": files}, indent=2))
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)  # the folder's entries, before it takes the final name
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WRITE_ERRORS):
            raise WriteFailed(f"writing checkpoint {final} failed: {failure(exc)}") from exc
        raise
    previous = final.with_name(final.name + ".previous")
    if final.exists():  # re-saving the same step (e.g. after a resume from an older checkpoint): replace it
        if previous.exists():
            _discard(previous)
        os.replace(final, previous)
    os.replace(tmp, final)
    fsync(root)
    if previous.exists():
        _discard(previous)
    for old in list_checkpoints(root)[:-keep]:
        _discard(old)
    return final


def _fingerprint(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _discard(path: Path) -> None:
    """Hide a checkpoint first (one rename), then delete it: a kill mid-delete leaves no half checkpoint."""
    hidden = path.with_name(f".tmp-discard-{path.name}-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root` (with state.json written), oldest first; of a step being re-saved,
    the new copy once it is there, the previous one until then."""
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        if (m := STEP_DIR.match(p.name)) and (p / COMPLETE_MARKER).is_file():
            if m.group(2) is None or int(m.group(1)) not in found:
                found[int(m.group(1))] = p
    return [found[step] for step in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


RESUME_FILES = ("generator.safetensors", "optimizer.pt", "rng.safetensors")  # what --resume loads (and the EMA, when there)


def verify_checkpoint(path: Path, files: tuple[str, ...] | None = None) -> str | None:
    """What is wrong with a checkpoint's files, or None when they are as state.json recorded them.

    `files`: only these (and any other recorded one among them) are checked, e.g. the weights alone for a
    reader that loads nothing else; default: every file the checkpoint has."""
    try:
        state = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{COMPLETE_MARKER} does not parse ({failure(exc)})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("nonfinite_total"), int):
        return f"{COMPLETE_MARKER} is not a rewardkit checkpoint's (no step or counters)"
    if "files" not in state:  # written before rewardkit recorded checksums
        return _verify_unrecorded(path)
    if not isinstance(state["files"], dict):
        return f"{COMPLETE_MARKER}'s file list is not a table"
    for name in RESUME_FILES:
        if name not in state["files"]:
            return f"{COMPLETE_MARKER} lists no {name}"
    for name, recorded in state["files"].items():
        if files is not None and name not in files:
            continue
        f = path / str(name)
        if not isinstance(recorded, dict) or Path(str(name)).name != name:
            return f"{COMPLETE_MARKER}'s entry for {name!r} is not a file record"
        if not f.is_file():
            return f"{name} is missing"
        try:
            actual = _fingerprint(f)
        except OSError as exc:
            return f"{name} cannot be read ({failure(exc)})"
        if actual["bytes"] != recorded.get("bytes"):
            return f"{name} has {actual['bytes']} bytes, {recorded.get('bytes')} were written (truncated or replaced)"
        if actual["sha256"] != recorded.get("sha256"):
            return f"{name} does not match its checksum (changed or damaged since it was written)"
    return None


def _verify_unrecorded(path: Path) -> str | None:
    """A checkpoint without recorded checksums: its files parse whole (safetensors checks its data against its
    header's sizes; optimizer.pt is a zip archive whose members carry CRC-32s)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    for name in ("generator.safetensors", "rng.safetensors", "optimizer.pt"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        for name in ("generator.safetensors", "rng.safetensors", EMA_FILE):
            if (path / name).is_file():
                with safe_open(path / name, "pt") as f:
                    f.keys()
        with zipfile.ZipFile(path / "optimizer.pt") as z:
            if (bad := z.testzip()) is not None:
                return f"optimizer.pt: member {bad} does not match its CRC"
    except (OSError, SafetensorError, zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
        return f"its files do not parse ({failure(exc)})"
    return None


def usable_checkpoint(root: Path, set_aside: bool = True, files: tuple[str, ...] | None = None) -> Path | None:
    """The newest intact checkpoint under `root`, None when there is none at all (`files`: as verify_checkpoint).

    Newer damaged ones are reported and (`set_aside`: only the run directory's writer should) renamed to
    damaged-step_N so that no later run takes them; when every checkpoint is damaged, UserError names them."""
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path, files)
        if problem is None:
            if damaged:
                log.warning("using %s, the newest intact checkpoint", path)
            return path
        if not path.exists():  # rotated away by a live run while it was read: gone, not damaged
            continue
        damaged.append(path)
        where = _set_aside(path) if set_aside else None
        log.warning("checkpoint %s is damaged: %s; %s", path, problem, f"set aside as {where.name}" if where else "skipped")
    if damaged:
        raise UserError(
            f"no intact checkpoint in {root}: {', '.join(p.name for p in damaged)} "
            f"{'are' if len(damaged) > 1 else 'is'} damaged{' (set aside as damaged-*)' if set_aside else ''}; "
            "start a new run (or copy an intact checkpoint back)"
        )
    return None


def _set_aside(path: Path) -> Path | None:
    """Rename a damaged checkpoint out of the way; None when it cannot be (a read-only folder, gone meanwhile)."""
    for n in range(1, 1000):
        target = path.with_name(f"damaged-{path.name}" + (f"-{n}" if n > 1 else ""))
        if not target.exists():
            try:
                os.replace(path, target)
            except OSError:
                return None
            return target
    return None


def load_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """(generator state, optimizer state, rng state, state.json) of a checkpoint."""
    state = json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    generator_state = load_file(path / "generator.safetensors")
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    rng_state = load_file(path / "rng.safetensors")
    return generator_state, optimizer_state, rng_state, state


def load_ema(path: Path) -> dict | None:
    """The EMA weights of a checkpoint, or None when the run kept none."""
    return load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None
