"""rewardkit-ocr: the score function on hand-computed cases, the image path into the engine, and the real engine
(RapidOCR's bundled PP-OCRv4 models, offline) on small Pillow renderings."""

import ast
import functools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rapidocr_onnxruntime")

import rewardkit_ocr  # noqa: E402
from rewardkit.errors import RecipeError, UserError  # noqa: E402
from rewardkit.plugins import load_registry  # noqa: E402
from rewardkit.recipe import load_recipe  # noqa: E402
from rewardkit_ocr import OCR, edit_distance, normalize, ocr_score  # noqa: E402


def levenshtein(a: str, b: str) -> int:
    """The textbook recursion, written apart from the plugin's row-by-row version."""

    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def flow_grpo_score(read: str, target: str) -> float:
    """Flow-GRPO's rule restated: lowercase, spaces out; a contained target scores 1; else 1 - min(lev, n) / n."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    d = 0 if target in read else min(levenshtein(read, target), len(target))
    return 1 - d / len(target)


def render(text: str, size=(512, 128), font_size=48) -> torch.Tensor:
    """Black text centred on white with Pillow's bundled scalable font, as (3, H, W) in [0, 1]: a sign as large in
    the frame as a 512-px SD output draws it (cap height ~35 px)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top), text, font=font, fill="black")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


class FakeEngine:
    """Stands in for RapidOCR: records the array it is given and returns fixed lines [box, text, confidence]."""

    def __init__(self, lines):
        self.lines, self.arrays, self.kwargs = lines, [], []

    def __call__(self, array, **kwargs):
        self.arrays.append(array)
        self.kwargs.append(kwargs)
        return self.lines, [0.0]


@pytest.fixture(scope="module")
def ocr():
    return OCR()


@pytest.fixture(scope="module")
def batch(ocr):
    """One batch scored once for several tests: an exact rendering, a partly wrong one, uniform noise."""
    images = torch.stack([render("HELLO WORLD"), render("HELLO WORLD"), torch.rand(3, 128, 512, generator=torch.Generator().manual_seed(0))])
    prompts = ['a shop sign that says "hello world"', 'a neon sign reading “HELLO WORD”', 'a poster with the words "HELLO WORLD"']
    return images, prompts, ocr(images, prompts)


def test_score_function_against_hand_computed_cases():
    assert normalize("  Hello\tWorld \n") == "helloworld"
    assert normalize("Hello  World", case_sensitive=True) == "HelloWorld"
    assert normalize(" Hello \t World ", ignore_spaces=False) == "hello world"
    assert edit_distance("sitting", "kitten") == 3 and edit_distance("abc", "") == 3 and edit_distance("", "abc") == 3
    assert edit_distance("word", "xxworlxx", free_ends=True) == 1  # 'worl' -> 'word'; the x's are free
    assert ocr_score("helloworld", "helloword") == pytest.approx(1 - 1 / 9)  # one deletion, 9 target characters
    assert ocr_score("helo", "hello") == pytest.approx(0.8)
    assert ocr_score("", "open") == 0.0
    assert ocr_score("zzzzzzzz", "open") == 0.0  # distance 8 is capped at the target's length 4
    # extra text: Flow-GRPO's rule makes an exact target free but counts everything once one character is wrong
    for extra_text, exact, one_wrong in (("free_if_exact", 1.0, 0.0), ("counted", 0.0, 0.0), ("free", 1.0, 0.75)):
        assert ocr_score("opensale", "open", extra_text=extra_text) == exact  # counted: 4 deletions, capped at 4
        assert ocr_score("opxnsale", "open", extra_text=extra_text) == one_wrong  # 1 substitution + 4 deletions
    with pytest.raises(ValueError):
        ocr_score("abc", "")


def test_targets_are_the_quoted_spans_and_a_prompt_without_quotes_is_refused(ocr):
    reward = OCR()  # its own instance (its engine is replaced below); the fixture keeps the shared engine alive
    prompts = ['a poster: "BIG Sale" and “50% off”', 'a sign "OPEN"']
    assert reward.targets(prompts) == ["bigsale50%off", "open"]
    assert OCR(quoted="first").targets(prompts[:1]) == ["bigsale"]
    assert OCR(ignore_spaces=False, case_sensitive=True).targets(prompts[:1]) == ["BIG Sale 50% off"]
    reward.engine = FakeEngine([])  # an instance attribute: the shared engine is untouched
    for prompt in ["a cat on a sofa", 'an unclosed "quote', "a sign that says ''"]:
        with pytest.raises(UserError, match="needs quoted text") as info:
            reward(torch.zeros(1, 3, 32, 32), [prompt])
        assert repr(prompt) in str(info.value)
    with pytest.raises(UserError, match="is empty"):
        reward(torch.zeros(1, 3, 32, 32), ['an empty sign ""  '])
    assert reward.engine.arrays == []  # refused before any OCR


def test_the_engine_gets_8bit_bgr_and_lines_are_filtered_and_joined(ocr):
    fake = OCR(min_confidence=0.5)
    fake.engine = FakeEngine([[None, "HELLO", 0.9], [None, "junk", 0.3], [None, "WORLD", 0.5]])
    x = torch.zeros(1, 3, 2, 3)
    x[0, 0] = torch.tensor([[1.0, 0.25, 2.0], [-1.0, 0.6, 0.01]])  # red: 255 64 255 / 0 153 3 (clamped, rounded)
    x[0, 2, 0, 0] = 0.6  # blue at one pixel: 153
    scores = fake(x, ['"Hello World"'])
    (array,) = fake.engine.arrays
    assert array.dtype == np.uint8 and array.shape == (2, 3, 3) and array.flags.c_contiguous
    assert array[:, :, 2].tolist() == [[255, 64, 255], [0, 153, 3]]  # red is the last channel (OpenCV's BGR)
    assert array[0, 0].tolist() == [153, 0, 255] and array[:, :, 1].max() == 0
    assert fake.engine.kwargs == [{"use_cls": False}]  # no other kwargs: RapidOCR resets its thresholds when given any
    assert fake.read(x) == ["HELLO WORLD"]  # 'junk' (0.3 < 0.5) dropped; 0.5 kept
    assert scores.dtype == torch.float32 and scores.shape == (1,) and scores.tolist() == [1.0]
    strict = OCR(case_sensitive=True, min_confidence=0.0)
    strict.engine = FakeEngine([[None, "HELLO", 0.9], [None, "junk", 0.3]])
    assert strict(x, ['"HELLO"']).tolist() == [1.0] and strict(x, ['"Hello"']).tolist() == [0.0]  # contained / 4 of 5 letters wrong + 'junk': capped


def test_the_array_is_what_the_engines_own_loader_makes_of_the_picture(ocr):
    """RapidOCR converts a PIL image RGB -> BGR itself and takes a numpy array as it is: given the same picture as a
    tensor, the reward must hand the engine the array its loader makes of the PIL image (colours that differ per
    channel, so that RGB and BGR differ)."""
    from PIL import Image
    from rapidocr_onnxruntime.utils import LoadImage

    x = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(1))
    pil = Image.fromarray((x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    recorder = OCR()
    recorder.engine = FakeEngine([])
    recorder.read(x[None])
    assert np.array_equal(recorder.engine.arrays[0], LoadImage()(pil))
    assert not np.array_equal(recorder.engine.arrays[0], np.array(pil))  # the test can tell the channel orders apart


def test_a_clean_rendering_scores_near_1_and_noise_near_0(batch):
    images, _, scores = batch
    # The 48-px rendering is read exactly (measured: 1.0; the engine drops the space, which the normalization
    # removes anyway, and the prompt's lower case is folded). 0.9 leaves room for one misread character of the 10
    # (another onnxruntime/OpenCV build's rounding); a failure of case folding scores 0.
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.device == images.device
    assert scores[0] >= 0.9
    # Noise holds no text: the engine should read nothing (0); 0.1 allows one stray character matching one of the 10.
    assert scores[2] <= 0.1


def test_a_partly_wrong_rendering_scores_its_edit_distance(batch, ocr):
    images, _, scores = batch
    (read,) = ocr.read(images[1:2])
    expected = flow_grpo_score(read, "HELLO WORD")
    assert 0 < scores[1] < 1  # "HELLO WORLD" for "HELLO WORD": one extra letter
    assert float(scores[1]) == pytest.approx(expected, abs=1e-6)  # float32 of a ratio of small integers


def test_batch_invariance(batch, ocr):
    images, prompts, scores = batch
    for i in range(len(prompts)):
        assert ocr(images[i : i + 1], prompts[i : i + 1]).item() == scores[i].item()


def test_registered_not_differentiable_and_refused_pathwise():
    info = load_registry().plugins["reward"]["ocr"]
    assert info.cls is OCR and info.cls.differentiable is False and info.package == "rewardkit-ocr"
    recipe = {
        "run": {"steps": 1, "batch_size": 4, "trackers": [], "progress": False},
        "prompts": {"train": ['a shop sign that says "OPEN"']},
        "generator": {"type": "testbed", "num_steps": 3, "eta": 0.7, "training": "lora"},
        "rewards": {"ocr": {}},
    }
    with pytest.raises(RecipeError, match="'ocr' is not differentiable, so it cannot be trained on pathwise"):
        load_recipe(recipe, registry=load_registry())
    recipe |= {"rewards": {"ocr": {"estimator": "score_function"}}, "policy_gradient": {"group_size": 4}}
    assert load_recipe(recipe, registry=load_registry()).rewards[0].options.estimator == "score_function"


def test_engine_built_once_and_missing_engine_is_a_user_error(ocr, monkeypatch):
    assert OCR().engine is ocr.engine and OCR(detection_side=736).engine is not ocr.engine
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UserError, match="needs rapidocr-onnxruntime") as info:
        OCR()
    assert "pip install rewardkit-ocr" in str(info.value) and "pip install -e plugins/rewardkit-ocr" in str(info.value)
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", types.ModuleType("rapidocr_onnxruntime"))  # broken install
    with pytest.raises(UserError, match="installed but failed to import .*cannot import name 'RapidOCR'.*libGL"):
        OCR()


def test_the_module_imports_nothing_heavy_at_top_level():
    tree = ast.parse(Path(rewardkit_ocr.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= {"__future__", "os", "re", "threading", "weakref", "typing", "torch", "pydantic", "rewardkit"}
