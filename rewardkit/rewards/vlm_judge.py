"""`vlm_judge`: a vision-language model asked to score each image, over an OpenAI-compatible chat API.

How UnifiedReward-style judges are served (vLLM, sglang, TGI, or a hosted
API all speak ``POST {url}/chat/completions``)::

    vllm serve CodeGoat24/UnifiedReward-qwen-7b --port 8000    # there
    [rewards.judge]                                            # here
    type = "vlm_judge"
    url = "http://127.0.0.1:8000/v1"
    model = "CodeGoat24/UnifiedReward-qwen-7b"
    estimator = "score_function"

Each image is sent as a PNG (or JPEG) data URL with the prompt filled into
`template`; the first match of `score_pattern` in the answer is the score,
mapped from `score_range` to [0, 1]. Requests run concurrently, at most
`max_concurrency` at a time from one process (a run with N processes has up
to N x max_concurrency in flight), spread over the servers in `url`, each
with a timeout and bounded retries; a batch whose requests no server
answered scores NaN (its step is skipped and counted). At start each server
is asked `GET {url}/models`: one that answers must list `model` (a
misspelt name fails at once, not at the first batch; a server without that
path is used unchecked). An answer with no
score in it is an error, naming the answer: the template or the pattern is
wrong, and training on a guess would be worse. Not differentiable.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from rewardkit.errors import UserError
from rewardkit.images import to_uint8
from rewardkit.rewards.base import Reward, RewardOptions
from rewardkit.rewards.endpoints import Endpoints, server_urls

DEFAULT_TEMPLATE = (
    "You are an expert judge of generated images. The image was generated from the prompt: \"{prompt}\". "
    "Rate how well it follows the prompt and how good it looks, from 1 (worst) to 10 (best). "
    "Answer with the number only."
)

log = logging.getLogger("rewardkit")


class VLMJudgeOptions(RewardOptions):
    url: str | list[str]
    """Base URL(s) of the OpenAI-compatible API, e.g. 'http://127.0.0.1:8000/v1' (requests go to URL/chat/completions)."""
    model: str
    """The served model's name, as the API expects it in `model`."""
    template: str = DEFAULT_TEMPLATE
    """The question asked about each image; {prompt} is replaced by the image's prompt (write other braces as {{ }})."""
    system: str | None = None
    """An optional system message sent before the question."""
    score_pattern: str = r"(-?\d+(?:\.\d+)?)"
    """A regular expression with one group: its first match in the answer is the score (default: the first number)."""
    score_range: tuple[float, float] | None = (1.0, 10.0)
    """(worst, best) of the scale the template asks for: scores are mapped to [0, 1]; an answer outside it is an error.
    None keeps the number as answered."""
    image_format: Literal["png", "jpeg"] = "png"
    """How images are encoded into the request's data URL (PNG is lossless; JPEG at quality 95 is smaller)."""
    max_concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once, over all servers."""
    timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for one answer before trying another server."""
    retries: int = Field(default=2, ge=0)
    """Further tries of a failed request, each on the next server; then the batch scores NaN and its step is skipped."""
    max_tokens: int = Field(default=64, ge=1)
    """The longest answer asked for."""
    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature of the judge (0: its most likely answer, so the same image scores the same)."""
    api_key_env: str | None = None
    """The environment variable holding the API key, sent as a bearer token (e.g. 'OPENAI_API_KEY' for a hosted API;
    None, the default: no key, as local vLLM / sglang servers need none, and no key is sent where it was not meant to go)."""

    @field_validator("template")
    @classmethod
    def _template_has_only_prompt(cls, template: str) -> str:
        try:
            template.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"the template may name only {{prompt}} (write literal braces as {{{{ and }}}}): {exc!r}") from None
        return template

    @field_validator("score_pattern")
    @classmethod
    def _pattern_has_one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if groups != 1:
            raise ValueError(f"needs exactly one group (the score), has {groups}")
        return pattern

    @model_validator(mode="after")
    def _range_is_ordered(self):
        if self.score_range is not None and not self.score_range[0] != self.score_range[1]:
            raise ValueError("score_range: worst and best must differ")
        return self


class VLMJudge(Reward):
    """A vision-language judge's score of each image, asked over an OpenAI-compatible chat API (not differentiable)."""

    name = "vlm_judge"
    Options = VLMJudgeOptions
    differentiable = False

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        key = None
        if o.api_key_env:
            key = os.environ.get(o.api_key_env)
            if not key:
                raise UserError(f"vlm_judge: api_key_env = {o.api_key_env!r}, but that environment variable is not set; "
                                "export it with the API key, or remove api_key_env for a server that needs none")
        self.endpoints = Endpoints(server_urls(o.url, what="vlm_judge"), timeout=o.timeout, retries=o.retries, what="vlm_judge",
                                   headers={"Authorization": f"Bearer {key}"} if key else None)
        self.pattern = re.compile(o.score_pattern)
        self._check_model()
        self._pool = ThreadPoolExecutor(max_workers=o.max_concurrency, thread_name_prefix="rewardkit-judge")

    @property
    def failed_batches(self) -> int:
        return self.endpoints.failed_batches

    def _check_model(self) -> None:
        """Each server's model list (GET {url}/models, which OpenAI-compatible servers answer) must hold `model`."""
        answers, errors = self.endpoints.ask_each("GET", "/models", parse=_model_ids, missing_ok=True)
        for error in errors:
            log.warning("vlm_judge: %s; it is tried again as requests come", error)
        for url, listed in answers.items():
            if listed is None:  # a gateway without the model list: the first answer will tell
                log.warning("vlm_judge: %s has no /models to check model = %r against", url, self.options.model)
                continue
            if self.options.model not in listed:
                raise UserError(f"vlm_judge: {url} serves {', '.join(sorted(listed)) or 'no model'}, not model = {self.options.model!r}; "
                                "set `model` to the served name")
        if not answers:
            raise UserError(f"vlm_judge: no server answered GET /models at {', '.join(self.endpoints.urls)}. Start the judge "
                            "(e.g. `vllm serve MODEL --port 8000`) and set `url` to its API base, e.g. 'http://127.0.0.1:8000/v1'.")

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        scores = self.endpoints.gather(self._pool, [(self._ask, (array, prompt)) for array, prompt in zip(pixels, prompts)], len(prompts))
        return torch.tensor(scores if scores is not None else [float("nan")] * len(prompts), dtype=torch.float32, device=images.device)

    def _ask(self, pixels: np.ndarray, prompt: str) -> float:
        o = self.options
        question = {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(pixels, o.image_format)}},
            {"type": "text", "text": o.template.format(prompt=prompt)},
        ]}
        body = {"model": o.model, "messages": ([{"role": "system", "content": o.system}] if o.system else []) + [question],
                "max_tokens": o.max_tokens, "temperature": o.temperature}
        answer = self.endpoints.request("POST", "/chat/completions", json=body, parse=_answer)
        return self.parse(answer, prompt)

    def parse(self, answer: str, prompt: str = "") -> float:
        """The score in a judge's `answer`, mapped to [0, 1] by score_range; UserError when there is none."""
        o = self.options
        match = self.pattern.search(answer)
        value = _number(match.group(1)) if match else None
        if value is not None and o.score_range is not None:
            lo, hi = o.score_range
            value = (value - lo) / (hi - lo) if min(lo, hi) <= value <= max(lo, hi) else None
        if value is None:
            raise UserError(
                f"vlm_judge: the judge's answer for the prompt {prompt!r} holds no score"
                + (f" within score_range {list(o.score_range)}" if match and o.score_range else f" matching score_pattern {o.score_pattern!r}")
                + f": {answer[:300]!r}. Change `template` so the judge answers with a score, or `score_pattern` to find it."
            )
        return value


def _answer(response) -> str:
    """The text of an OpenAI chat completion's first choice (its content a string, or a list of text parts);
    ValueError for anything else, which the endpoints count as that server's failure."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"not an OpenAI chat completion: {response.text[:300]!r}") from None
    if isinstance(content, list):
        content = "".join(str(part.get("text") or "") for part in content if isinstance(part, dict) and part.get("type") == "text")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"a chat completion whose content is {type(content).__name__}: {response.text[:300]!r}")
    return content or ""


def _model_ids(response) -> set[str]:
    """The ids in an OpenAI-style model list ({"data": [{"id": ...}, ...]})."""
    try:
        return {str(m["id"]) for m in response.json()["data"]}
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"not an OpenAI model list: {response.text[:200]!r}") from None


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if np.isfinite(value) else None


def data_url(pixels: np.ndarray, image_format: str) -> str:
    """An (H, W, 3) uint8 image as a base64 data URL of a PNG (lossless) or a quality-95 JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=image_format.upper(), **({"quality": 95} if image_format == "jpeg" else {}))
    return f"data:image/{image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
