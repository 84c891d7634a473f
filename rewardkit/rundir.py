"""The run directory: what a run writes, and how a finished run is read back.

    RUN_DIR/recipe.toml      the resolved recipe (re-runnable)
    RUN_DIR/metrics.jsonl    one JSON object per step (rewardkit.metrics)
    RUN_DIR/samples/         grids on fixed prompts and noise
    RUN_DIR/checkpoints/     atomic checkpoints (rewardkit.checkpoint)
    RUN_DIR/summary.json     the last step's metrics and the final checkpoint
    RUN_DIR/images/          noise-optimizing runs: one image per training prompt

Whole files are written atomically (rewardkit.durable: a reader sees the old
file or the new, never half of one); metrics.jsonl is appended line by line
and cut back on resume (rewardkit.metrics).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from rewardkit.checkpoint import EMA_FILE, load_checkpoint, load_ema, usable_checkpoint, verify_checkpoint
from rewardkit.durable import writable_dir, write_text_atomic
from rewardkit.errors import UserError, WriteFailed
from rewardkit.recipe import load_recipe

log = logging.getLogger("rewardkit")


def sample_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's sample grids, samples/step_NNNNNN.png, as (step, path) by step."""
    import re

    found = [(int(m.group(1)), p) for p in (run_dir / "samples").glob("step_*.png") if (m := re.fullmatch(r"step_(\d+)\.png", p.name))]
    return sorted(found)


def recipe_table(run_dir: Path) -> dict:
    """RUN_DIR/recipe.toml as plain TOML, for describing a run (a report, a model card); {} with a warning where it is
    missing or does not parse. Building from a recipe validates it: load_recipe."""
    import tomllib

    path = run_dir / "recipe.toml"
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("%s does not parse (%s); the run is described without its recipe", path, exc)
        return {}


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True))


LOCK_FILE, OWNER_FILE = ".lock", ".lock-owner.json"


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run never reuses a directory that holds one (UserError); --resume continues it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir = {str(run_dir)!r} is a file, not a folder; choose a folder with run.dir=...")
    if resume:
        return
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise UserError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose a new directory with run.dir=..."
        )


def claim_run_dir(run_dir: Path):
    """Create the run directory and take its one-writer lock, before anything is built; returns the held lock
    (a filelock.FileLock: an OS lock the kernel releases when its holder dies, so a killed run never blocks
    its resume). UserError when the folder cannot be written or another live process holds it."""
    import datetime
    import socket

    writable_dir(run_dir, "run.dir")
    try:
        lock = _lock_now(run_dir)
    except NotImplementedError:  # a filesystem without locks (filelock 3.x): say so, and go on unguarded
        log.warning("run directory %s: the filesystem has no file locks; one writer per run directory is not enforced", run_dir)
        return _NoLock()
    except OSError as exc:
        raise UserError(f"run.dir {run_dir} cannot be written ({exc.strerror or exc}); give another folder") from None
    if lock is None:
        raise UserError(f"run directory {run_dir} is in use: {_owner(run_dir)} is training in it (one writer per run "
                        "directory); wait for it to finish or stop it, or choose another run.dir")
    try:
        write_json(run_dir / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    except WriteFailed as exc:
        lock.release()
        raise UserError(f"run.dir {run_dir} cannot be written ({exc}); give another folder") from None
    return lock


def _lock_now(run_dir: Path):
    """The run directory's lock, taken without waiting; None where another live process holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


class _NoLock:
    def release(self) -> None:
        pass


def _owner(run_dir: Path) -> str:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text(encoding="utf-8"))
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def write_recipe(run_dir: Path, recipe: dict, resumed: bool) -> None:
    """Save the resolved recipe as RUN_DIR/recipe.toml; on resume, warn about keys that changed."""
    import tomli_w

    path = run_dir / "recipe.toml"
    text = tomli_w.dumps(_drop_empty(recipe))
    if resumed and path.exists() and path.read_bytes() != text.encode():
        import tomllib

        try:
            before = _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        except Exception:  # noqa: BLE001 - a damaged saved copy (anything the parser raises): it is replaced below
            log.warning("the saved %s does not parse; replacing it with this run's recipe", path)
        else:
            after = _flatten(tomllib.loads(text))
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            log.warning("resuming with a recipe that differs from the saved one in: %s", ", ".join(changed))
    write_text_atomic(path, text)


def _drop_empty(d: dict) -> dict:
    return {k: v for k, v in d.items() if not (isinstance(v, dict) and not v)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def resolve_run_path(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a run directory (its newest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        if (problem := verify_checkpoint(path, READ_FILES)) is not None:
            raise UserError(f"checkpoint {path} is damaged: {problem}; name another checkpoint, or the run directory for its newest intact one")
        return path.parent.parent, path
    if (path / "recipe.toml").is_file():
        with _unless_busy(path) as idle:  # damaged checkpoints are set aside only where no run is writing
            checkpoint = usable_checkpoint(path / "checkpoints", set_aside=idle, files=READ_FILES)
        if checkpoint is None:
            raise UserError(f"{path} holds no complete checkpoint yet; train first, or name a checkpoint folder")
        return path, checkpoint
    raise UserError(f"{path} is neither a run directory (with recipe.toml) nor a checkpoint (with state.json)")


READ_FILES = ("generator.safetensors", EMA_FILE)  # what sample / export / eval load of a checkpoint


@contextlib.contextmanager
def _unless_busy(run_dir: Path):
    """Yield whether this reader holds the run directory's lock (no live run is writing there), holding it
    meanwhile; False where another process has it or the folder cannot be written (read-only copies)."""
    try:
        lock = _lock_now(run_dir)
    except (OSError, NotImplementedError):
        lock = None
    if lock is None:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def load_generator(path: str | Path, registry, ema: bool = False):
    """The trained generator of a run directory (newest checkpoint) or of one checkpoint.

    Returns (generator, recipe, checkpoint path), the generator set up exactly
    as in training and with the checkpoint's weights loaded (`ema`: the moving
    average of them), in eval mode.
    """
    run_dir, checkpoint = resolve_run_path(path)
    return generator_from_checkpoint(run_dir, checkpoint, registry, ema)


def generator_from_checkpoint(run_dir: Path, checkpoint: Path, registry, ema: bool = False):
    """load_generator for a checkpoint resolve_run_path has already chosen and verified."""
    from rewardkit.images import default_device

    recipe = load_recipe(run_dir / "recipe.toml", registry=registry)
    generator = recipe.generator.build()
    generator.setup(recipe.prompts, recipe.run.seed)
    if ema:
        weights = load_ema(checkpoint)
        if weights is None:
            raise UserError(f"{checkpoint} has no EMA weights: the run did not set optimizer.ema_decay (leave out --ema)")
    else:
        weights = load_checkpoint(checkpoint)[0]
    generator.load_trainable_state_dict(weights)
    return generator.to(default_device()).eval(), recipe, checkpoint
