"""Finding and loading model weights: a local path, or a file in a Hugging Face hub repo.

Shared by every plugin that loads published weights (the reward packages
under plugins/ and third-party ones), so they all resolve, cache and refuse
unsafe files the same way.

A weights reference is either a local file (or folder) or ``owner/repo/file``:
the first two parts name a hub repository, the rest the file inside it. Hub
files go through huggingface_hub's cache: the cached copy is used when there
is one (no network needed), otherwise the file is downloaded. When it is
neither cached nor downloadable, a UserError (exit code 2) says which file is
missing and how to provide it.

Checkpoints are read with safetensors or ``torch.load(weights_only=True)``:
never arbitrary pickles.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from rewardkit.errors import UserError


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """'owner/repo/dir/file.pt' -> ('owner/repo', 'dir/file.pt'); 'owner/repo' -> ('owner/repo', None)."""
    parts = ref.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"{ref!r} is neither an existing local path nor a hub reference 'owner/repo/file'")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def looks_local(ref: str) -> bool:
    """A path rather than a hub reference: absolute, ~, ./ or ../, or a single bare name."""
    return ref.startswith(("/", "~", "./", "../", ".\\")) or "/" not in ref.strip("/")


def resolve(ref: str, *, what: str, option: str, default_filenames: tuple[str, ...] = ()) -> Path:
    """The local path of weights `ref` (a local file/folder, or 'owner/repo[/file]' on the hub).

    `what` names the model in messages ("HPS v2.1 weights"); `option` is the
    reward option that takes a local path instead; `default_filenames` are
    tried, in order, when `ref` names a folder or a repo without a file.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in default_filenames:
            if (path / name).is_file():
                return path / name
        raise UserError(f"{what}: folder {path} holds none of {', '.join(default_filenames) or 'the expected files'}")
    if looks_local(ref):
        raise UserError(f"{what}: no such file {path}; set the reward's `{option}` option to an existing file")

    repo, filename = split_hub_ref(ref)
    candidates = (filename,) if filename else default_filenames
    if not candidates:
        raise UserError(f"{what}: {ref!r} is neither an existing local file nor a hub reference 'owner/repo/file'")
    from huggingface_hub import hf_hub_download

    for name in candidates:  # the cached copy first: no network needed
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except Exception:
            pass
    errors = []
    if not _offline():
        for name in candidates:
            try:
                return Path(hf_hub_download(repo, name))
            except Exception as exc:  # network down, no such repo/file, gated repo...
                errors.append(f"{name}: {type(exc).__name__}")
    files = " or ".join(candidates)
    why = "HF_HUB_OFFLINE is set" if _offline() else "it could not be downloaded (" + "; ".join(errors) + ")"
    first = candidates[0] if candidates else "FILE"
    raise UserError(
        f"{what} are missing: {files} from the hub repo {repo} is not in the local Hugging Face cache and {why}. "
        f"Either pre-download it on a machine with network (`hf download {repo} {first}`, then copy the cache folder "
        f"~/.cache/huggingface or set HF_HOME), or set the reward's `{option}` option to a local path of the file."
    )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_state_dict(path: str | os.PathLike, *, what: str) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors file or a torch checkpoint (weights_only).

    Unwraps a top-level 'state_dict' / 'model' entry and strips a 'module.' prefix (DDP).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(
                f"{what}: {path} holds Python objects beyond tensors and is not loaded (only safetensors or "
                f"weights_only checkpoints are, for safety): {exc}. Convert it to safetensors."
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise UserError(f"{what}: {path} is not a readable checkpoint: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{what}: {path} does not hold a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state
