"""`rewardkit eval`: tables, image cache, FID, prompt formats, errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import pixels_recipe
from rewardkit import Optimizer
from rewardkit.cli import main
from rewardkit.evaluation import FID, GeneratorSpec
from rewardkit.prompts import read_prompts


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    recipe = pixels_recipe(
        root / "run", steps=20, run={"checkpoint_every": 5, "keep_checkpoints": 10},
        prompts={"train": ["a red square", "a blue square", "a green square"]},
    )
    Optimizer.from_recipe(recipe).fit()
    (root / "prompts.txt").write_text("a red square\na blue square\n\na green square\n")
    return root


def test_two_rows_with_every_metric(trained_run, tmp_path, inception_weights, capsys):
    run = trained_run / "run"
    early = run / "checkpoints" / "step_000005"
    code = main([
        "eval", str(early), str(run), "--prompts", str(trained_run / "prompts.txt"), "-n", "2",
        "--metrics", "color,smoothness,fid", "--reference", str(run / "samples"), "--fid-weights", str(inception_weights), "--fid-dims", "64",
        "--metric-option", "color.target=[0.9,0.1,0.1]", "--out", str(tmp_path / "ev"),
    ])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "ev" / "results.json").read_text())
    rows = data["rows"]
    assert [r["label"] for r in rows] == ["run@step_000005", "run"]
    for r in rows:
        assert set(r["metrics"]) == {"color", "smoothness", "fid"}
        assert all(torch.isfinite(torch.tensor(v)) for v in r["metrics"].values())
        assert r["ms_per_image"] > 0
    assert rows[1]["metrics"]["color"] > rows[0]["metrics"]["color"], "the longer-trained generator scores higher on its reward"
    table = (tmp_path / "ev" / "results.md").read_text()
    assert table.splitlines()[0] == "| Model | Steps | FID | color | smoothness | ms / image |"
    assert "| run@step_000005 |" in table and "| run |" in table
    assert table in out


def test_cached_images_are_reused_not_regenerated(trained_run, tmp_path, monkeypatch):
    args = ["eval", str(trained_run / "run"), "--prompts", str(trained_run / "prompts.txt"), "--out", str(tmp_path / "ev")]
    assert main([*args, "--metrics", "color"]) == 0
    images = sorted((tmp_path / "ev" / "images").rglob("*.png"))
    assert len(images) == 3
    stamps = [p.stat().st_mtime_ns for p in images]

    def no_generation(*a, **k):
        raise AssertionError("the generator must not be built again")

    monkeypatch.setattr(GeneratorSpec, "build", no_generation)
    assert main([*args, "--metrics", "smoothness,color"]) == 0
    assert [p.stat().st_mtime_ns for p in images] == stamps
    first_color = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]["metrics"]["color"]
    assert main([*args, "--metrics", "color"]) == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]["metrics"]["color"] == first_color


def test_eval_writes_a_captioned_grid_per_generator_and_shows_progress(trained_run, tmp_path, monkeypatch, capsys):
    """One row per prompt, its samples side by side (16 px pixels enlarged to 128 px tiles, each the saved PNG), its
    caption under the row; apart from the images folder, which keeps only the images; rewritten from the cache."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("REWARDKIT_PROGRESS", "1")
    args = ["eval", str(trained_run / "run"), "--prompts", str(trained_run / "prompts.txt"), "-n", "2", "--metrics", "color",
            "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"generating run: .*/6 \[.*image/s", err) and re.search(r"scoring run: .*/6 \[", err), err  # (not left when done)
    (folder,) = (tmp_path / "ev" / "images").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(6)] + ["manifest.json"]
    grid_path = tmp_path / "ev" / "grids" / f"{folder.name}.png"
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    pad, tile = 2, 128
    band = (grid.shape[0] - pad) // 3 - tile - pad
    assert grid.shape == (pad + 3 * (tile + band + pad), pad + 2 * (tile + pad), 3) and band > 0
    for row in range(3):
        y = pad + row * (tile + band + pad)
        for col in range(2):
            x = pad + col * (tile + pad)
            saved = np.asarray(Image.open(folder / f"{2 * row + col:05d}.png").convert("RGB"))
            assert (grid[y : y + tile, x : x + tile] == saved.repeat(8, 0).repeat(8, 1)).all(), (row, col)
        assert (grid[y + tile : y + tile + band].max(axis=-1) < 100).any(), f"row {row}'s prompt under it"

    grid_path.unlink()
    monkeypatch.setattr(GeneratorSpec, "build", lambda *a, **k: pytest.fail("cached: the generator is not built again"))
    assert main(args) == 0
    assert (np.asarray(Image.open(grid_path).convert("RGB")) == grid).all(), "the same grid, from the cached images"
    monkeypatch.setenv("REWARDKIT_PROGRESS", "")
    capsys.readouterr()
    assert main(args) == 0
    assert "scoring run" not in capsys.readouterr().err, "stderr is not a terminal: no bar"


def test_fid_of_a_set_against_itself_is_near_zero_and_grows_with_a_shift(inception_weights, tmp_path):
    from torchvision.utils import save_image

    torch.manual_seed(0)
    images = torch.rand(24, 3, 32, 32) * 0.5 + 0.25
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(images):
        save_image(img, ref / f"{i}.png")
    fid = FID(inception_weights, dims=64)  # the full path; 64-d features keep the test fast
    fid.add_reference(ref)
    reloaded = torch.stack([img for img in images])  # the same pictures, as generated images
    same = fid.score((reloaded * 255).round() / 255)
    shifted = fid.score((reloaded + 0.2).clamp(0, 1))
    assert abs(same) < 1e-2 * shifted and shifted > 0, (same, shifted)

    stats = tmp_path / "ref.safetensors"
    fid.save_reference(stats)
    again = FID(inception_weights, dims=64)
    again.add_reference(stats)
    with pytest.raises(Exception, match="holds statistics of 64-d features, but --fid-dims is 2048"):
        FID(inception_weights).add_reference(stats)
    assert again.score((reloaded + 0.2).clamp(0, 1)) == pytest.approx(shifted, rel=1e-6)


def test_save_reference_stats_command(inception_weights, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REWARDKIT_PROGRESS", "1")  # bars shown although stderr is captured
    stats = tmp_path / "stats" / "ref.safetensors"
    assert main(["eval", "--reference", str(trained_run / "run" / "samples"), "--save-reference-stats", str(stats), "--fid-weights", str(inception_weights), "--fid-dims", "64"]) == 0
    from safetensors.torch import load_file

    n = len(list((trained_run / "run" / "samples").glob("*.png")))
    assert int(load_file(stats)["real_features_num_samples"]) == n
    assert re.search(rf"FID reference statistics: .*/{n} \[", capsys.readouterr().err), "the reference images' bar"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metrics", "color,fid"], "needs --reference"),
        (["--metrics", "color,fid", "--reference", "/nonexistent/coco"], "--reference /nonexistent/coco: no such file or folder"),
        (["--metrics", "colour"], "did you mean 'color'?"),
        (["--metrics", "fid", "--reference", ".", "--fid-weights", "/nonexistent.pth"], "--fid-weights /nonexistent.pth: no such file"),
    ],
)
def test_bad_eval_input_exits_2(trained_run, tmp_path, capsys, extra, message):
    code = main(["eval", str(trained_run / "run"), "--prompts", str(trained_run / "prompts.txt"), "--out", str(tmp_path / "ev"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_generator_spec_exits_2(trained_run, tmp_path, capsys):
    assert main(["eval", "nonsense", "--prompts", str(trained_run / "prompts.txt"), "--metrics", "color"]) == 2
    assert "expected a run directory, a checkpoint folder, or TYPE:MODEL" in capsys.readouterr().err


def test_prompt_formats(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b"}]))
    (tmp_path / "p.csv").write_text("id,prompt,style\n1,a cat,photo\n2,\"a dog, running\",anime\n")
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "photo.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "styles" / "anime.json").write_text(json.dumps(["z"]))
    assert read_prompts(tmp_path / "p.json") == (["a", "b"], [None, None])
    assert read_prompts(tmp_path / "p.csv") == (["a cat", "a dog, running"], ["photo", "anime"])
    assert read_prompts(tmp_path / "styles") == (["z", "x", "y"], ["anime", "photo", "photo"])
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    with pytest.raises(Exception, match="no 'prompt' column"):
        read_prompts(tmp_path / "bad.csv")


def test_styles_get_their_own_table(trained_run, tmp_path):
    styles = tmp_path / "styles"
    styles.mkdir()
    (styles / "photo.json").write_text(json.dumps(["a red square", "a blue square"]))
    (styles / "anime.json").write_text(json.dumps(["a green square"]))
    assert main(["eval", str(trained_run / "run"), "--prompts", str(styles), "--metrics", "color", "--out", str(tmp_path / "ev")]) == 0
    row = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]
    assert set(row["by_style"]) == {"photo", "anime"}
    assert "color by style" in (tmp_path / "ev" / "results.md").read_text()


def test_eval_inside_training_shows_reward_hacking(tmp_path):
    """Training on one reward while a held-out metric disagrees: the curves show it."""
    recipe = pixels_recipe(
        tmp_path / "run", steps=12,
        rewards={"color": {"target": [1.0, 0.0, 0.0]}},
        eval={
            "every": 4, "prompts": ["a red square"], "n_per_prompt": 1,
            "rewards": {"blueness": {"type": "color", "target": [0.0, 0.0, 1.0]}, "judge": {"type": "judge"}},
        },
    )
    from rewardkit.plugins import load_registry
    from rewardkit.recipe import load_recipe

    registry = load_registry([_judge_plugin(tmp_path)])
    Optimizer.from_recipe(load_recipe(recipe, registry=registry)).fit()
    from rewardkit.metrics import read_metrics

    history = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in history if "eval/blueness" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    assert all("eval/judge" in r for r in evals), "a non-differentiable reward is fine for evaluation"
    train = [r["reward/color"] for r in history if "reward/color" in r]
    assert train[-1] > train[0]
    assert evals[-1]["eval/blueness"] < evals[0]["eval/blueness"], "held-out metric falls while the trained reward rises"
    saved = load_recipe(tmp_path / "run" / "recipe.toml", registry=registry)
    assert [s.label for s in saved.evaluation.rewards] == ["blueness", "judge"] and saved.evaluation.every == 4


def _judge_plugin(tmp_path):
    path = tmp_path / "judge.py"
    path.write_text(
        "import rewardkit, torch\nfrom rewardkit.rewards.base import Reward\n"
        "class Judge(Reward):\n    name = 'judge'\n    differentiable = False\n"
        "    def forward(self, images, prompts):\n        return (images.mean(dim=(1, 2, 3)) > 0.5).float()\n"
        "@rewardkit.hookimpl\ndef register_rewards(register):\n    register(Judge)\n"
    )
    return path


def test_eval_section_errors_name_the_key(tmp_path, write_recipe, capsys):
    recipe = pixels_recipe(tmp_path / "run", eval={"every": 2, "prompts": ["x"], "rewards": {"hsp": {}}})
    assert main(["validate", str(write_recipe(recipe))]) == 2
    assert "eval.rewards.hsp.type: no reward plugin named 'hsp'" in capsys.readouterr().err


def test_eval_holds_one_batch_of_images_at_a_time(trained_run, tmp_path, inception_weights, monkeypatch):
    """Streaming: however many images a row has, no more than --batch-size of them are in memory at once,
    and the scores are those of the whole set at once."""
    from rewardkit import evaluation

    loaded, real = [], evaluation.load_images
    monkeypatch.setattr(evaluation, "load_images", lambda paths, size=None: loaded.append(len(paths)) or real(paths, size))
    run = trained_run / "run"
    args = ["eval", str(run), "--prompts", str(trained_run / "prompts.txt"), "-n", "5", "--batch-size", "4", "--metrics", "smoothness,fid",
            "--reference", str(run / "samples"), "--fid-weights", str(inception_weights), "--fid-dims", "64", "--out", str(tmp_path / "ev")]
    assert main(args) == 0
    assert sum(loaded) >= 15 and max(loaded) <= 4, loaded  # 15 generated images (and the reference), 4 at a time at most
    streamed = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"][0]["metrics"]

    paths = sorted((tmp_path / "ev" / "images").glob("*/*.png"))
    images = real(paths)
    from rewardkit.rewards.smoothness import Smoothness

    prompts = [p for p in ["a red square", "a blue square", "a green square"] for _ in range(5)]
    assert streamed["smoothness"] == pytest.approx(float(Smoothness()(images, prompts).mean()), rel=1e-5)
    fid = FID(inception_weights, 64)
    fid.add_reference(run / "samples")
    assert streamed["fid"] == pytest.approx(fid.score(images), rel=1e-4)


def test_non_square_references_are_centre_cropped_not_squashed(tmp_path):
    """A 2:1 reference photo enters FID as its centre square, resized: what the generated (square) images are."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import resize

    from rewardkit.evaluation import load_images

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (40, 80, 3), dtype=np.uint8)  # H 40, W 80
    Image.fromarray(wide).save(tmp_path / "wide.png")
    got = load_images([tmp_path / "wide.png"], size=(32, 32))[0]
    centre = torch.from_numpy(wide[:, 20:60].copy()).permute(2, 0, 1).float() / 255  # the middle 40 x 40, cut by hand
    torch.testing.assert_close(got, resize(centre, [32, 32], antialias=True), rtol=0, atol=1e-6)
    squashed = resize(torch.from_numpy(wide).permute(2, 0, 1).float() / 255, [32, 32], antialias=True)
    assert float((got - squashed).abs().max()) > 0.1
