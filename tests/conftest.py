"""Shared fixtures: offline environment, a small pixels recipe, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS = Path(__file__).parent
PLUGIN_FILES = TESTS / "plugin_files"


def pixels_recipe(run_dir: Path, steps: int = 30, **sections) -> dict:
    """A small pixels recipe as a dict; `sections` replace or extend tables."""
    recipe = {
        "run": {"dir": str(run_dir), "steps": steps, "batch_size": 2, "trackers": [], "progress": False, "seed": 0},
        "prompts": {"train": ["a red square", "a blue square"]},
        "generator": {"type": "pixels", "height": 16, "width": 16},
        "optimizer": {"name": "adam", "lr": 0.05},
        "rewards": {"color": {"target": [0.9, 0.1, 0.1]}},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict) and key in ("run", "optimizer", "generator"):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`rewardkit ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rewardkit", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_python(args: list[str], env: dict, cwd: Path, timeout: float = 600) -> str:
    """`python ARGS` in a subprocess that must succeed; its stdout."""
    proc = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def install_template(template: str, module: str, cls: str, root: Path) -> tuple[Path, dict]:
    """What docs/writing-a-*-plugin.md tell a third party to do with plugins/<template>: copy it as rewardkit-acme,
    rename `module` / `cls` to acme / Acme, pip install it (into root/site, put on PYTHONPATH: the environment stays
    untouched). Returns (the package folder, the environment its subprocesses run in)."""
    import shutil

    pkg = root / "rewardkit-acme"
    shutil.copytree(TESTS.parent / "plugins" / template, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    (pkg / f"rewardkit_{module}").rename(pkg / "rewardkit_acme")
    for path in pkg.rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace(module, "acme").replace(cls, "Acme"))
    site = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(pkg)],
        check=True, capture_output=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), "HF_HUB_OFFLINE": "1"}
    env.pop("REWARDKIT_LOAD_PLUGINS", None)
    return pkg, env


def assert_adam_runs_agree(a, b, lr: float, steps: int) -> None:
    """Two Adam runs that differ only in the order of floating-point sums (one process vs two shards, another CPU).

    Adam moves a weight by about lr per step whatever its gradient's size, so a weight whose gradient is
    near zero - its sign decided by summation order - may be moved apart by up to 2 lr per step (on
    test_fsdp's recipe: 1 of 16,384 weights by 1.3e-5 in one run). Every other weight agrees to float32 rounding.
    """
    diff = (a - b).abs()
    assert diff.max() <= 2 * lr * steps, diff.max()
    off = diff > 1e-5 + 1e-5 * b.abs()
    assert int(off.sum()) <= max(1, off.numel() // 1000), f"{int(off.sum())} of {off.numel()} weights differ by more than 1e-5; max {diff.max():.3g}"


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as TOML under tmp_path; returns the path."""
    import tomli_w

    def write(recipe: dict, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(tomli_w.dumps(recipe))
        return path

    return write


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random-weight InceptionV3 in torch-fidelity's layout: the real FID code path, offline."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    orig_load, orig_url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = orig_load, orig_url
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


def photo_tiles(folder: Path, size: int = 200) -> Path:
    """Real photographs for offline tests: scikit-learn's two bundled photos cut into size x size tiles."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for photo in load_sample_images().images:
        for top in range(0, photo.shape[0] - size + 1, size):
            for left in range(0, photo.shape[1] - size + 1, size):
                Image.fromarray(photo[top : top + size, left : left + size]).save(folder / f"tile_{k:02d}.png")
                k += 1
    return folder


@pytest.fixture(scope="session")
def hires_classifier(tmp_path_factory):
    """(classifier file, tiles folder): a small high-resolution classifier trained on the photo tiles."""
    from rewardkit.hires_training import train

    root = tmp_path_factory.mktemp("hires")
    tiles = photo_tiles(root / "tiles")
    path = root / "hires.safetensors"
    train(tiles, path, resolution=200, crop=64, steps=200, batch_size=8, lr=5e-3, width=8, progress=False, device="cpu")
    return path, tiles
