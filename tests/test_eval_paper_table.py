"""`rewardkit eval` end to end on tiny random models: the paper's two-row table.

The base model at many steps and a trained generator at few steps, scored with
every metric of the paper's Table 1 (HPS, aesthetic, CLIP score, FID,
ImageReward) - all offline: a tiny random SD pipeline (tests/tiny_models.py),
tiny random reward checkpoints passed through --metric-option
(tests/tiny_rewards.py), random InceptionV3 weights for FID.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import save_tiny_sd

for _plugin in ("open_clip", "rewardkit_clip", "rewardkit_hps", "rewardkit_imagereward"):
    pytest.importorskip(_plugin, reason="the paper's reward plugins (pip install 'rewardkit[all]')")

import tiny_rewards

from rewardkit import Optimizer
from rewardkit.cli import main

# words of the tiny ImageReward vocabulary, so its tokenizer sees real tokens
PROMPTS = ["a red cat on the beach", "a painting of a blue house", "a small bird in the tree"]
BASE_STEPS, TRAINED_STEPS = 8, 2
PAPER_HEADER = "| Model | Steps | HPS | Aes | CLIP score | FID | ImageReward | ms / image |"


@pytest.fixture(scope="module")
def metric_options(tmp_path_factory) -> list[str]:
    """--metric-option arguments pointing every paper reward at a tiny random checkpoint."""
    root = tmp_path_factory.mktemp("rewards")
    hps = tiny_rewards.save_tiny_hps(root / "hps")
    clip, aesthetic = tiny_rewards.save_tiny_clip(root / "clip")
    imagereward = tiny_rewards.save_tiny_imagereward(root / "imagereward")
    args = []
    # clip and aesthetic through their aliases, as a user would type them
    for metric, options in (("hps", hps), ("aesthetic", aesthetic), ("clip", clip), ("imagereward", imagereward)):
        for key, value in options.items():
            args += ["--metric-option", f"{metric}.{key}={value}"]
    return args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD model folder, a generator trained from it (LoRA, 2-step sampler), prompts, real images."""
    root = tmp_path_factory.mktemp("paper_table")
    model = save_tiny_sd(root / "tiny_sd")
    recipe = {
        "run": {"dir": str(root / "r0_tiny"), "steps": 3, "batch_size": 2, "trackers": [], "progress": False, "seed": 0},
        "prompts": {"train": PROMPTS},
        "generator": {"type": "sd", "model": str(model), "num_steps": TRAINED_STEPS, "training": "lora", "lora_rank": 4},
        "optimizer": {"name": "adam", "lr": 0.05},
        "rewards": {"color": {"target": [0.9, 0.1, 0.1]}},
    }
    result = Optimizer.from_recipe(recipe).fit()
    assert result.step == 3
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")

    from torchvision.utils import save_image

    reference = root / "reference"
    reference.mkdir()
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32)
    for i in range(6):  # smooth colour gradients plus texture: "real-ish" 32 px photos
        colour = torch.rand(3, 1, 1, generator=g)
        image = 0.6 * colour * ramp.view(1, 32, 1) + 0.3 * ramp.view(1, 1, 32) + 0.1 * torch.rand(3, 32, 32, generator=g)
        save_image(image.clamp(0, 1), reference / f"real_{i}.png")
    return {"model": model, "run": root / "r0_tiny", "prompts": root / "prompts.txt", "reference": reference}


def test_two_row_paper_table_with_every_metric(workspace, metric_options, inception_weights, tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DConditionModel

    unet_calls = []  # id of the network of each UNet call, in order
    forward = UNet2DConditionModel.forward
    monkeypatch.setattr(UNet2DConditionModel, "forward", lambda self, *a, **k: unet_calls.append(id(self)) or forward(self, *a, **k))
    base = f"sd:{workspace['model']},num_steps={BASE_STEPS}"
    out = tmp_path / "eval"
    code = main([
        "eval", base, str(workspace["run"]), "--prompts", str(workspace["prompts"]), "-n", "1", "--batch-size", "3",
        "--metrics", "hps,aesthetic,clip,imagereward,fid", "--reference", str(workspace["reference"]),
        "--fid-weights", str(inception_weights), "--fid-dims", "64", *metric_options, "--out", str(out),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err

    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["label"] for r in rows] == [f"sd:{workspace['model']}", "r0_tiny"]
    assert [r["steps"] for r in rows] == [BASE_STEPS, TRAINED_STEPS]
    assert list(data["columns"]) == ["hps", "laion_aesthetic", "clip_score", "fid", "imagereward"]
    for r in rows:
        assert set(r["metrics"]) == {"hps", "laion_aesthetic", "clip_score", "fid", "imagereward"}
        assert all(isinstance(v, float) and math.isfinite(v) for v in r["metrics"].values()), r["metrics"]
        assert r["ms_per_image"] > 0
        # the paper's units: 100 x cosine, scaled once by the plugin (not again by the table)
        assert abs(r["metrics"]["hps"]) <= 100 and abs(r["metrics"]["clip_score"]) <= 100, r["metrics"]
    assert all(rows[0]["metrics"][m] != rows[1]["metrics"][m] for m in rows[0]["metrics"]), "two rows, two image sets"

    # each row's images came from its own generator at its own steps (the cache manifests say which)
    base_manifest = json.loads((Path(rows[0]["images"]) / "manifest.json").read_text())
    trained_manifest = json.loads((Path(rows[1]["images"]) / "manifest.json").read_text())
    assert base_manifest["generator"] == {"spec": base} and base_manifest["label"] == rows[0]["label"]
    assert trained_manifest["generator"]["checkpoint"].endswith("step_000003") and trained_manifest["label"] == "r0_tiny"
    assert len(list(Path(rows[0]["images"]).glob("*.png"))) == len(list(Path(rows[1]["images"]).glob("*.png"))) == len(PROMPTS)
    # one batch per row: the base network 8 times, then the trained one 2 times
    runs = [(net, sum(1 for _ in group)) for net, group in itertools.groupby(unet_calls)]
    assert [count for _, count in runs] == [BASE_STEPS, TRAINED_STEPS] and runs[0][0] != runs[1][0]

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == PAPER_HEADER
    assert table[1] == "|---" * 8 + "|"
    assert len(table) == 4, "one line per generator, no per-style tables for a .txt prompt file"
    for line, r in zip(table[2:], rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [r["label"], str(r["steps"])]
        assert len(cells) == 8 and all(cells), line
        m = r["metrics"]
        shown = [m["hps"], m["laion_aesthetic"], m["clip_score"], m["fid"], m["imagereward"], r["ms_per_image"]]
        assert [float(c) for c in cells[2:]] == pytest.approx(shown, abs=0.051)
    assert "\n".join(table) in captured.out
