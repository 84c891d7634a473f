"""Sample and evaluation grids (rewardkit.images.save_grid) and the progress bars of training."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pixels_recipe
from rewardkit import Optimizer
from rewardkit.images import save_grid

PAD, TILE = 2, 128  # the grid's padding, and the displayed size chosen for small images (images.MIN_TILE_PX)
DARK = 100  # text is drawn black on a white band; anything this dark in a band is text


def _eight_bit(images: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 as torchvision's save_image rounds, computed here in numpy."""
    return np.clip(np.floor(images.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)


def _cells(grid: np.ndarray, rows: int, cols: int, tile: int):
    """{(row, col): (tile pixels, band pixels)}; the band's height follows from the grid's."""
    band = (grid.shape[0] - PAD) // rows - tile - PAD
    assert grid.shape == (PAD + rows * (tile + band + PAD), PAD + cols * (tile + PAD), 3)
    out = {}
    for r in range(rows):
        for c in range(cols):
            y, x = PAD + r * (tile + band + PAD), PAD + c * (tile + PAD)
            out[r, c] = grid[y : y + tile, x : x + tile], grid[y + tile : y + tile + band, x : x + tile]
    return out, band


def _has_text(pixels: np.ndarray) -> bool:
    return bool((pixels.max(axis=-1) < DARK).any())


def test_small_images_are_enlarged_by_nearest_neighbour_and_captioned_per_row(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 3, 16, 16)
    prompts = ["a red square", "", "a blue square", "two of a kind", "two of a kind"]
    save_grid(images, tmp_path / "g.png", nrow=3, prompts=prompts)
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    cells, band = _cells(grid, rows=2, cols=3, tile=TILE)
    assert band > 0

    expected = _eight_bit(images)
    for i in range(5):
        tile, _ = cells[divmod(i, 3)]
        blocks = tile.reshape(16, 8, 16, 8, 3)  # each source pixel an 8 x 8 block of its exact value
        assert (blocks == expected[i][:, None, :, None, :]).all(), f"tile {i} is not its image enlarged 8x"

    assert _has_text(cells[0, 0][1]) and _has_text(cells[0, 2][1])
    assert not _has_text(cells[0, 1][1]), "no caption for an empty prompt"
    assert not _has_text(cells[1, 2][1]) and (cells[1, 2][0] == 255).all(), "the empty slot stays blank"
    # one caption centred under the two tiles that share a prompt: its text crosses the gap between them
    left, right = cells[1, 0][1], cells[1, 1][1]
    assert _has_text(left[:, -20:]) and _has_text(right[:, :20])
    gaps = grid[:, [PAD + TILE + c * (TILE + PAD) + k for c in range(2) for k in range(PAD)]]
    assert (gaps[: PAD + TILE] == 255).all(), "white padding between tiles"


def test_full_size_images_are_not_enlarged(tmp_path):
    image = torch.linspace(0, 1, 512).expand(1, 3, 512, 512).clone()  # smooth: cheap to encode
    save_grid(image, tmp_path / "g.png", prompts=["a photo"])
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    cells, _ = _cells(grid, rows=1, cols=1, tile=512)
    tile, band = cells[0, 0]
    assert (tile == _eight_bit(image)[0]).all() and _has_text(band)
    save_grid(image, tmp_path / "bare.png")
    assert Image.open(tmp_path / "bare.png").size == (512 + 2 * PAD, 512 + 2 * PAD), "no prompts: no caption band"


def test_long_prompts_are_wrapped_and_elided_to_the_tile():
    from PIL import ImageFont

    from rewardkit.images import CAPTION_LINES, _wrap

    font = ImageFont.load_default(size=12)
    lines = _wrap("a very long prompt " * 10 + "averyveryverylongwordthatcannotfitonasingleline", font, 120)
    assert len(lines) == CAPTION_LINES and lines[-1].endswith("...")
    assert all(font.getlength(line) <= 120 for line in lines)
    word = _wrap("averyveryverylongwordthatcannotfitonasingleline", font, 120)
    assert "".join(word) == "averyveryverylongwordthatcannotfitonasingleline" and len(word) > 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _fit(tmp_path, name: str, progress: bool) -> None:
    recipe = pixels_recipe(tmp_path / name, steps=2, prompts={"train": ["a red square", "a blue square"]},
                           run={"progress": progress, "checkpoint_every": 0})
    Optimizer.from_recipe(recipe).fit()


ETA = re.compile(r"rewardkit: 100%.*2/2 \[\d\d:\d\d<\d\d:\d\d")  # tqdm's elapsed<remaining


def test_training_grid_and_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("REWARDKIT_PROGRESS", raising=False)  # tqdm's own rule first
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    _fit(tmp_path, "tty", progress=True)
    assert ETA.search(terminal.getvalue()), terminal.getvalue()
    # the sample grid: two 16 px prompts (a column of two, as sqrt(2) rounds) enlarged to 128 px tiles, each captioned
    grid = np.asarray(Image.open(tmp_path / "tty" / "samples" / "step_000002.png").convert("RGB"))
    cells, _ = _cells(grid, rows=2, cols=1, tile=TILE)
    assert _has_text(cells[0, 0][1]) and _has_text(cells[1, 0][1])

    monkeypatch.undo()
    _fit(tmp_path, "log", progress=True)
    assert "rewardkit:" not in capsys.readouterr().err, "stderr is not a terminal: no bar (tqdm's disable=None)"
    monkeypatch.setenv("REWARDKIT_PROGRESS", "1")
    _fit(tmp_path, "forced", progress=True)
    assert ETA.search(capsys.readouterr().err)
    _fit(tmp_path, "off", progress=False)
    assert "rewardkit:" not in capsys.readouterr().err, "run.progress = false wins"


@pytest.mark.parametrize("value, disable", [("1", False), ("0", True), ("", None)])
def test_progress_environment_variable(monkeypatch, value, disable):
    """REWARDKIT_PROGRESS forces bars on (1) or off (0); unset, tqdm decides by whether stderr is a terminal (None)."""
    from rewardkit.images import progress_disable

    monkeypatch.setenv("REWARDKIT_PROGRESS", value)
    assert progress_disable(True) is disable
    assert progress_disable(False) is True, "switched off (run.progress = false, not the main process) whatever the variable"


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_writes_what_torchvision_writes(tmp_path, channels):
    """rewardkit.images.save_image stands in for torchvision's (whose import costs seconds): the same 8-bit file."""
    from torchvision.utils import save_image as torchvision_save_image

    from rewardkit.images import save_image

    torch.manual_seed(0)
    image = torch.rand(channels, 9, 7) * 1.2 - 0.1  # out of range too: both clamp
    save_image(image, tmp_path / "ours.png")
    torchvision_save_image(image, tmp_path / "theirs.png")
    ours, theirs = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ours", "theirs"))
    assert ours.shape == theirs.shape == (9, 7, 3) and (ours == theirs).all()
