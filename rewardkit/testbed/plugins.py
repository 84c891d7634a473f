"""The testbed's plugins: the `testbed` generator and the digit rewards.

- `testbed` (generator): the `sd` generator on the packaged digits teacher.
  It is the same code that parameterizes Stable Diffusion 1.5 (the K-step
  R0 sampler, LoRA or full fine-tuning, weight reference, export); only
  where the pipeline comes from differs.
- `digit_classifier` (reward): log-probability (or logit margin) of the
  prompt's digit under the CNN trained on split A. The task reward, like
  ImageReward / HPS for real models.
- `digit_correct` (reward): 1 where that CNN's most likely digit is the
  prompt's, else 0. Not differentiable: the reward a score-function
  (policy-gradient) estimator trains on, and an evaluation metric (accuracy),
  like OCR accuracy or a VLM judge's verdict for real models.
- `digit_realism` (reward): minus the squared residual of the image outside
  the top principal components of real digits (split A): how far it is
  from the manifold of handwriting, blind to which digit it is.
- `digit_prototype` (reward): cosine similarity between the image and the
  mean image of the prompt's digit (split A): a prompt-image alignment
  score, as CLIP score is for real models.

Prompts name their digit as a numeral or a word ("a handwritten digit 7",
"the number seven"); the last one in the prompt counts.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from pydantic import Field, PositiveFloat, model_validator

from rewardkit.errors import UserError
from rewardkit.generators.sd import SDOptions, StableDiffusion
from rewardkit.rewards.base import Reward, RewardOptions
from rewardkit.testbed import data
from rewardkit.testbed.data import PACKAGED, weights_dir


# ----------------------------------------------------------------------------- generator
class TestbedOptions(SDOptions):
    model: str = PACKAGED
    """'rewardkit-testbed' (the packaged teacher, or $REWARDKIT_TESTBED_WEIGHTS), or a folder
    written by `python -m rewardkit.testbed.train --out DIR`."""
    report: bool = True
    """When `rewardkit run` ends, evaluate teacher and trained generator with the independent evaluator
    (the testbed plugin's `run_finished` hook; `rewardkit testbed-report RUN_DIR` does it on demand)."""
    report_samples_per_digit: int = 30
    report_teacher_steps: int = 25
    report_teacher_guidance: float = 2.0


class TestbedGenerator(StableDiffusion):
    """The `sd` generator on the digits teacher (16x16 images, 4x8x8 latents)."""

    name = "testbed"
    Options = TestbedOptions
    __test__ = False  # not a pytest class

    def _load_pipeline(self):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # loading takes a blink; its bars would only clutter the run's output
        transformers_logging.disable_progress_bar()
        folder = weights_dir(self.options.model) / "teacher"
        # Weights ship in float16 (half the size); compute in float32 on CPUs.
        return StableDiffusionPipeline.from_pretrained(
            str(folder), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
        )


# ----------------------------------------------------------------------------- rewards
def _load_reward_tensors(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(weights_dir(name) / "reward_models.safetensors"))


def _digit_cnn(weights: str) -> torch.nn.Module:
    """The digit CNN trained on split A (`weights`: the packaged testbed or a training output folder)."""
    from rewardkit.testbed.models import DigitCNN

    model = DigitCNN()
    model.load_state_dict({k[4:]: v for k, v in _load_reward_tensors(weights).items() if k.startswith("cnn.")})
    return model


def _digits(prompts: Sequence[str], who: str) -> torch.Tensor:
    out = [data.parse_digit(p) for p in prompts]
    bad = [p for p, d in zip(prompts, out) if d < 0]
    if bad:
        raise UserError(f"reward '{who}': prompt {bad[0]!r} names no digit (0-9 or zero..nine)")
    return torch.tensor(out, dtype=torch.long)


class DigitClassifierOptions(RewardOptions):
    weights: str = PACKAGED
    """'rewardkit-testbed' or a folder written by `python -m rewardkit.testbed.train --out DIR`."""
    score: Literal["log_prob", "margin"] = "log_prob"
    """'log_prob': log p(digit | image); 'margin': the digit's logit minus the largest other logit."""
    confidence: float | None = Field(default=None, gt=0, lt=1)
    """Cap log p(digit | image) at log(confidence) (log_prob only). Past the cap the reward's
    gradient is exactly zero, so per-sample gradient normalization cannot blow a vanishing
    gradient up into adversarial detail on images the classifier already reads right."""

    @model_validator(mode="after")
    def _confidence_caps_log_prob(self):
        if self.confidence is not None and self.score != "log_prob":
            raise ValueError("confidence caps score = 'log_prob'; with score = 'margin' leave it unset")
        return self


class DigitClassifier(Reward):
    """log p(digit | image) (or the logit margin) under the CNN trained on split A: the testbed's task reward."""

    name = "digit_classifier"
    Options = DigitClassifierOptions
    input_size = (data.IMAGE_SIZE, data.IMAGE_SIZE)

    def __init__(self, **options):
        super().__init__(**options)
        self.model = _digit_cnn(self.options.weights)

    def forward(self, images, prompts):
        logits = self.model(data.to_gray(images)).float()
        d = _digits(prompts, self.name).to(logits.device)
        if self.options.score == "margin":
            own = logits.gather(1, d[:, None])[:, 0]
            other = logits.scatter(1, d[:, None], float("-inf")).max(1).values
            return own - other
        log_p = logits.log_softmax(1).gather(1, d[:, None])[:, 0]
        if self.options.confidence is not None:
            log_p = log_p.clamp(max=math.log(self.options.confidence))
        return log_p


class DigitCorrectOptions(RewardOptions):
    weights: str = PACKAGED
    """'rewardkit-testbed' or a folder written by `python -m rewardkit.testbed.train --out DIR`."""


class DigitCorrect(Reward):
    """1 where the CNN trained on split A reads the prompt's digit (its argmax), else 0: not differentiable."""

    name = "digit_correct"
    Options = DigitCorrectOptions
    input_size = (data.IMAGE_SIZE, data.IMAGE_SIZE)
    differentiable = False

    def __init__(self, **options):
        super().__init__(**options)
        self.model = _digit_cnn(self.options.weights)

    def forward(self, images, prompts):
        with torch.no_grad():
            read = self.model(data.to_gray(images)).argmax(1)
        return (read == _digits(prompts, self.name).to(read.device)).float()


class DigitRealismOptions(RewardOptions):
    weights: str = PACKAGED
    scale: PositiveFloat = 1.0
    """Scores are -scale * (relative residual), between -scale and 0."""


class DigitRealism(Reward):
    """Minus the fraction of the image's energy that real handwriting does not explain.

    The grayscale image is projected on the top principal directions of real
    digits (split A, uncentred); the residual's energy, plus the image's
    colour (real digits are gray), is divided by the image's own energy, so
    the score does not change when the image is dimmed: only looking like
    real handwriting raises it. (A blank image scores 0, the maximum; the
    classifier reward it is paired with rules that out.)
    """

    name = "digit_realism"
    Options = DigitRealismOptions
    input_size = (data.IMAGE_SIZE, data.IMAGE_SIZE)

    def __init__(self, **options):
        super().__init__(**options)
        t = _load_reward_tensors(self.options.weights)
        self.register_buffer("basis", t["realism.basis"])

    def forward(self, images, prompts):
        gray = data.to_gray(images)
        colour = (images - images.mean(1, keepdim=True)).pow(2).flatten(1).mean(1) * gray[0].numel()
        x = gray.flatten(1)
        residual = x - (x @ self.basis.T) @ self.basis
        energy = x.pow(2).sum(1) + colour + 1.0
        return -self.options.scale * (residual.pow(2).sum(1) + colour) / energy


class DigitPrototypeOptions(RewardOptions):
    weights: str = PACKAGED
    max_similarity: float | None = Field(default=None, gt=-1, lt=1)
    """Cap the cosine at this value: an image as close to the mean digit as a typical real one
    is pulled no closer (held-out real digits: median 0.70), which keeps the samples diverse."""


class DigitPrototype(Reward):
    """Cosine similarity of the image to the mean image of the prompt's digit: prompt-image alignment."""

    name = "digit_prototype"
    Options = DigitPrototypeOptions
    input_size = (data.IMAGE_SIZE, data.IMAGE_SIZE)

    def __init__(self, **options):
        super().__init__(**options)
        t = _load_reward_tensors(self.options.weights)
        self.register_buffer("mean", t["pca.mean"])
        self.register_buffer("prototypes", t["proto.means"] - t["pca.mean"])

    def forward(self, images, prompts):
        x = data.to_gray(images).flatten(1) - self.mean
        p = self.prototypes[_digits(prompts, self.name).to(x.device)]
        cos = torch.nn.functional.cosine_similarity(x, p, dim=1, eps=1e-6)
        return cos if self.options.max_similarity is None else cos.clamp(max=self.options.max_similarity)
