"""rewardkit-ocr: the text-rendering (OCR) reward, as Flow-GRPO trains with it.

The target is the text inside the prompt's quotes; an OCR engine reads the
image; the score is 1 - min(d, n) / n, with d the edit distance between the
two normalized texts and n the normalized target's length: 1 when the text is
read exactly, 0 when nothing of it is. Not differentiable: it trains with
estimator = 'score_function' (GRPO) and scores images for evaluation.

The engine is RapidOCR (rapidocr-onnxruntime): PaddleOCR's PP-OCRv4 detection
and recognition models as ONNX files inside its wheel, so it runs offline,
on CPU.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from typing import Any, Literal, Sequence

import torch
from pydantic import Field

import rewardkit
from rewardkit.errors import UserError
from rewardkit.images import to_uint8
from rewardkit.rewards import Reward, RewardOptions

__version__ = "0.1.0"

ExtraText = Literal["free_if_exact", "counted", "free"]

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')  # straight "..." or typographic “...”, scanned left to right
_ENGINES: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()  # alive while a reward holds it
_LOCK = threading.Lock()


class OCROptions(RewardOptions):
    quoted: Literal["all", "first"] = "all"
    """Target: every quoted span of the prompt ("..." or “...”), joined by spaces, or only the first (Flow-GRPO's)."""
    case_sensitive: bool = False
    """Compare letter case too; False lowercases both texts (Flow-GRPO)."""
    ignore_spaces: bool = True
    """Remove all whitespace from both texts (Flow-GRPO removes spaces); False collapses each run to one space."""
    extra_text: ExtraText = "free_if_exact"
    """Other text read in the image: free when the target appears in it exactly, else counted (Flow-GRPO); always
    'counted'; or always 'free' (distance to the best-matching stretch of what was read)."""
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    """Text lines the recognizer reads with a lower confidence are ignored (0: keep every line, as Flow-GRPO)."""
    angle_classifier: bool = False
    """Run the 0/180-degree text-line classifier before recognition (finds upside-down text; Flow-GRPO: off)."""
    detection_side: int = Field(default=960, ge=32)
    """Detection input size limit in pixels, applied as `detection_limit` says (PaddleOCR's default: 960)."""
    detection_limit: Literal["max", "min"] = "max"
    """'max': scale the longer side down to detection_side if above it (PaddleOCR, Flow-GRPO); 'min': scale the
    shorter side up to it (RapidOCR's own default, with 736: slower on small images)."""
    threads: int = Field(default=1, ge=0)
    """onnxruntime threads per OCR model; 0: onnxruntime's default (one per physical core). Small: the optimizer has its own."""


class OCR(Reward):
    """Flow-GRPO's OCR reward: 1 - normalized edit distance between the prompt's quoted text and the text read."""

    name = "ocr"
    Options = OCROptions
    input_size = None  # any size; the detector resizes (detection_side / detection_limit)
    differentiable = False

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        threads = min(o.threads, os.cpu_count() or 1)  # RapidOCR silently falls back to all cores above cpu_count
        self.engine = _engine(threads, o.detection_side, o.detection_limit)  # shared: never configure it in place

    def targets(self, prompts: Sequence[str]) -> list[str]:
        """The normalized target text of each prompt; UserError for a prompt without (non-empty) quoted text."""
        o = self.options
        out = []
        for prompt in prompts:
            spans = quoted_spans(prompt)
            if not spans:
                raise UserError(
                    f"the ocr reward needs quoted text in every prompt (the text to render, e.g. 'a shop sign that says "
                    f"\"OPEN\"'), as text-rendering prompt sets have; this prompt has none: {prompt!r}"
                )
            target = normalize(" ".join(spans if o.quoted == "all" else spans[:1]), case_sensitive=o.case_sensitive,
                               ignore_spaces=o.ignore_spaces)
            if not target:
                raise UserError(f"the ocr reward needs quoted text in every prompt; the quoted text of this prompt is empty: {prompt!r}")
            out.append(target)
        return out

    def read(self, images: torch.Tensor) -> list[str]:
        """What the OCR engine reads in each image (B, 3, H, W) in [0, 1]: its text lines, in reading order, joined by spaces."""
        import numpy as np

        o = self.options
        # 8-bit RGB as jpeg_compressibility quantizes it, then BGR: RapidOCR takes numpy images in OpenCV's channel order
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        texts = []
        for array in pixels:
            lines, _ = self.engine(np.ascontiguousarray(array[:, :, ::-1]), use_cls=o.angle_classifier)  # no kwargs: they reset thresholds
            texts.append(" ".join(text for _box, text, confidence in lines or () if float(confidence) >= o.min_confidence))
        return texts

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"ocr: {images.shape[0]} images but {len(prompts)} prompts")
        o = self.options
        targets = self.targets(prompts)  # before any OCR: a bad prompt fails fast
        scores = [ocr_score(normalize(text, case_sensitive=o.case_sensitive, ignore_spaces=o.ignore_spaces), target, extra_text=o.extra_text)
                  for text, target in zip(self.read(images), targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def quoted_spans(prompt: str) -> list[str]:
    """The quoted spans of `prompt` in order: "..." and “...” (an unclosed quote opens no span)."""
    return [straight or curly for straight, curly in _QUOTED.findall(prompt)]


def normalize(text: str, *, case_sensitive: bool = False, ignore_spaces: bool = True) -> str:
    """The form both texts are compared in: lowercased unless case_sensitive; whitespace removed, or collapsed to single spaces."""
    if not case_sensitive:
        text = text.lower()
    return "".join(text.split()) if ignore_spaces else " ".join(text.split())


def edit_distance(target: str, read: str, *, free_ends: bool = False) -> int:
    """Levenshtein distance (unit insertions, deletions, substitutions) from `read` to `target`; with free_ends,
    to the best-matching substring of `read` (what precedes and follows it in `read` costs nothing)."""
    previous = [0] * (len(read) + 1) if free_ends else list(range(len(read) + 1))
    for i, t in enumerate(target, 1):
        current = [i]
        for j, r in enumerate(read, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (t != r)))
        previous = current
    return min(previous) if free_ends else previous[-1]


def ocr_score(read: str, target: str, *, extra_text: ExtraText = "free_if_exact") -> float:
    """1 - min(d, n) / n for normalized texts, n = len(target) > 0; d as `extra_text` says (see OCROptions)."""
    if not target:
        raise ValueError("ocr_score: empty target")
    if extra_text == "free_if_exact" and target in read:
        d = 0
    else:
        d = edit_distance(target, read, free_ends=extra_text == "free")
    return 1.0 - min(d, len(target)) / len(target)


def _engine(threads: int, detection_side: int, detection_limit: str):
    """RapidOCR built once per process per setting (its three ONNX sessions load in about half a second)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("rapidocr_onnxruntime"):
            raise UserError(
                f"the ocr reward needs rapidocr-onnxruntime ({exc}): `pip install rewardkit-ocr` (or `pip install "
                "'rewardkit[ocr]'`; from a rewardkit checkout: `pip install -e plugins/rewardkit-ocr`)"
            ) from None
        raise UserError(
            f"the ocr reward needs rapidocr-onnxruntime, which is installed but failed to import ({type(exc).__name__}: "
            f"{exc}); if it names libGL or glib (opencv-python's system libraries): `apt-get install libgl1 libglib2.0-0`, "
            "or replace opencv-python by opencv-python-headless"
        ) from None
    key = (threads, detection_side, detection_limit)
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            # threads -1: RapidOCR leaves onnxruntime's default (inter-op threads only matter in its parallel mode, unused);
            # text_score 0: every line comes back and min_confidence filters, so rewards with other thresholds share it
            engine = RapidOCR(intra_op_num_threads=threads or -1, text_score=0.0,
                              det_limit_side_len=detection_side, det_limit_type=detection_limit)
            _ENGINES[key] = engine
        return engine


@rewardkit.hookimpl
def register_rewards(register):
    register(OCR)
