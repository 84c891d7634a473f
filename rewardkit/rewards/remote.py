"""`remote`: a reward computed by `rewardkit serve-reward` servers, and the protocol they speak.

A reward with heavy or conflicting dependencies (GenEval's mmdet pins, a
7B judge) runs in its own environment or on its own machine::

    rewardkit serve-reward hps --port 8100 -o version=v2.1      # there
    [rewards.hps]                                                # here
    type = "remote"
    url = ["http://gpu1:8100", "http://gpu2:8100"]

The protocol (version 1). ``GET /info`` answers JSON: the reward's name,
whether it is differentiable, its input size. ``POST /score`` takes a
safetensors file: tensor ``images`` (B, 3, H, W), float32 in [0, 1] or uint8,
and in the file's metadata ``prompts`` (a JSON list of B strings) and
``gradient`` ("1" to ask for d scores / d images). It answers a safetensors
file with ``scores`` (B,) float32 and, when asked, ``gradient`` (B, 3, H, W)
float32. A differentiable remote reward therefore still trains pathwise: its
forward is an autograd function whose backward is the server's gradient.

A batch is split across the servers (one request each, concurrently, none
larger than the smallest ``max_batch`` and size limit the servers' /info declare); a failed request
is retried on another (rewardkit.rewards.endpoints). A batch no server could
score gets NaN scores (logged): the optimizer skips that step and counts it
like a non-finite step.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

import torch
from pydantic import Field
from torch.autograd.function import once_differentiable

from rewardkit.errors import UserError
from rewardkit.images import to_uint8
from rewardkit.rewards.base import Reward, RewardOptions
from rewardkit.rewards.endpoints import Endpoints, server_urls

log = logging.getLogger("rewardkit")

PROTOCOL = 1
MEDIA_TYPE = "application/vnd.rewardkit.safetensors"
MAX_BATCH, MAX_REQUEST_BYTES = 256, 1024 * 2**20
"""`rewardkit serve-reward`'s default limits: images in one request, bytes in one request's body."""


# --- the wire format: safetensors files, prompts as JSON in their metadata ------------------------------------------
def encode_request(images: torch.Tensor, prompts: Sequence[str], gradient: bool, transfer: str = "float32") -> bytes:
    from safetensors.torch import save

    x = images.detach().float().cpu()
    if transfer == "uint8":  # what a non-differentiable reward sees anyway (OCR, JPEG, a VLM): 4x fewer bytes
        x = to_uint8(x)
    return save({"images": x.contiguous()}, metadata={"prompts": json.dumps(list(prompts)), "gradient": "1" if gradient else "0"})


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str], bool]:
    """(images float32 in [0, 1], prompts, gradient asked); ValueError naming what is malformed."""
    tensors, metadata = _load(body)
    images = tensors.get("images")
    if images is None or images.ndim != 4 or images.shape[1] != 3 or min(images.shape) < 1:
        raise ValueError("the request needs a tensor 'images' of shape (B, 3, H, W), each at least 1")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    elif images.dtype != torch.float32:
        raise ValueError(f"'images' must be float32 or uint8, not {images.dtype}")
    try:
        prompts = json.loads(metadata["prompts"])
    except (KeyError, ValueError):
        raise ValueError("the request's metadata needs 'prompts', a JSON list of strings") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != images.shape[0]:
        raise ValueError(f"'prompts' must be a JSON list of {images.shape[0]} strings, one per image")
    return images, prompts, metadata.get("gradient") == "1"


def encode_response(scores: torch.Tensor, gradient: torch.Tensor | None) -> bytes:
    from safetensors.torch import save

    tensors = {"scores": scores.detach().float().cpu().contiguous()}
    if gradient is not None:
        tensors["gradient"] = gradient.detach().float().cpu().contiguous()
    return save(tensors)


def decode_response(body: bytes, n: int, shape: tuple[int, ...], gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors, _ = _load(body)
    scores, grad = tensors.get("scores"), tensors.get("gradient")
    if scores is None or tuple(scores.shape) != (n,) or (gradient and (grad is None or tuple(grad.shape) != shape)):
        raise ValueError(f"the server's answer is not {n} scores" + (f" and a gradient of shape {shape}" if gradient else ""))
    return scores.float(), (grad.float() if gradient else None)


def _load(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load

    try:
        # the header's length (8 bytes, little-endian), then the JSON header, whose __metadata__ holds the strings
        header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
        return load(body), header.get("__metadata__") or {}
    except Exception as exc:  # truncated or not safetensors at all
        raise ValueError(f"not a safetensors file ({type(exc).__name__}: {exc})") from None


# --- the reward --------------------------------------------------------------------------------------------------
class RemoteOptions(RewardOptions):
    url: str | list[str]
    """The `rewardkit serve-reward` server(s), e.g. 'http://127.0.0.1:8100'; with several, each batch is split across them."""
    timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for one server's answer to one request before trying another."""
    retries: int = Field(default=2, ge=0)
    """Further tries of a failed request, each on the next server; then the batch scores NaN and its step is skipped."""
    transfer: Literal["float32", "uint8"] = "float32"
    """How images travel: float32 (exact, needed for gradients) or uint8 (4x smaller; for non-differentiable rewards)."""


class Remote(Reward):
    """A reward computed by `rewardkit serve-reward` servers; differentiable when the served reward is."""

    name = "remote"
    Options = RemoteOptions

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        what = "remote reward"
        self.endpoints = Endpoints(server_urls(o.url, what=what), timeout=o.timeout, retries=o.retries, what=what)
        self.info = self._info()
        self.differentiable = bool(self.info["differentiable"])
        if self.differentiable and o.transfer == "uint8":
            log.info("remote reward: transfer = 'uint8' quantizes the images the gradient is taken at")
        self.input_size = tuple(self.info["input_size"]) if self.info.get("input_size") else None
        self._pool = ThreadPoolExecutor(max_workers=len(self.endpoints.urls), thread_name_prefix="rewardkit-remote")

    @property
    def failed_batches(self) -> int:
        return self.endpoints.failed_batches

    def _info(self) -> dict:
        """Every server's /info, each asked alone (so an answer is filed under the server that gave it): those that
        answer must serve one reward, in this protocol."""
        answers, errors = self.endpoints.ask_each("GET", "/info", parse=_info_json)
        if not answers:
            raise UserError(f"remote reward: no server answered /info at {', '.join(self.endpoints.urls)} ({'; '.join(errors)}). "
                            "Start one with `rewardkit serve-reward NAME --host HOST --port PORT` and set `url` to it.")
        for url in set(self.endpoints.urls) - set(answers):
            log.warning("remote reward: %s did not answer; it is tried again as requests come", url)
        served = {(a.get("protocol"), a.get("name"), a.get("differentiable")) for a in answers.values()}
        if len(served) > 1:
            raise UserError(f"remote reward: the servers serve different things: {sorted(map(str, served))}; give one reward's servers")
        url, info = next(iter(answers.items()))
        if info.get("protocol") != PROTOCOL:
            raise UserError(f"remote reward: {url} speaks protocol {info.get('protocol')}, this rewardkit {PROTOCOL}: "
                            "use the same rewardkit version on both sides")
        # a request may go to any server: it must fit the strictest (one down now is assumed to have the defaults)
        limits = [(int(a.get("max_batch") or MAX_BATCH), int(a.get("max_request_bytes") or MAX_REQUEST_BYTES)) for a in answers.values()]
        if len(answers) < len(self.endpoints.urls):
            limits.append((MAX_BATCH, MAX_REQUEST_BYTES))
        self.max_batch, self.max_request_bytes = min(b for b, _ in limits), min(m for _, m in limits)
        return info

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images and {len(prompts)} prompts")
        if len(prompts) == 0:
            return images.sum(dim=(1, 2, 3)) * 0  # (0,): no request, still in the graph
        return _RemoteScore.apply(images, list(prompts), self)

    def score_batch(self, images: torch.Tensor, prompts: list[str], gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (and gradients) of a batch, split across the servers; NaN (and a warning) when no server could score it."""
        n, b = len(self.endpoints.urls), len(prompts)
        chunks = self.request_chunks(images, prompts)
        first = self.endpoints.start()
        calls = [(self._score_chunk, (images[c], [prompts[i] for i in c], gradient, (first + j) % n)) for j, c in enumerate(chunks)]
        parts = self.endpoints.gather(self._pool, calls, b)
        if parts is None:
            return torch.full((b,), float("nan")), (torch.full(images.shape, float("nan")) if gradient else None)
        scores = torch.cat([s for s, _ in parts])
        return scores, (torch.cat([g for _, g in parts]) if gradient else None)

    def request_chunks(self, images: torch.Tensor, prompts: Sequence[str]) -> list[torch.Tensor]:
        """The batch's indices, one tensor per request: a share for each server, none above what a server takes."""
        n, b = len(self.endpoints.urls), len(prompts)
        # the bytes one image adds to a request: its pixels, and its prompt in the header's JSON as a JSON string
        # inside a JSON string (escaped twice), with its separator
        image_bytes = images[0].numel() * (1 if self.options.transfer == "uint8" else 4) + max(len(json.dumps(json.dumps(p))) + 2 for p in prompts)
        per_request = max(1, min(self.max_batch, (self.max_request_bytes - 4096) // image_bytes))
        return list(torch.arange(b).tensor_split(max(min(n, b), -(-b // per_request))))

    def _score_chunk(self, images: torch.Tensor, prompts: list[str], gradient: bool, start: int):
        body = encode_request(images, prompts, gradient, self.options.transfer)
        return self.endpoints.request(
            "POST", "/score", start=start, data=body, headers={"Content-Type": MEDIA_TYPE},
            parse=lambda response: decode_response(response.content, len(prompts), tuple(images.shape), gradient))


def _info_json(response) -> dict:
    try:
        info = response.json()
    except ValueError:
        info = None
    if not isinstance(info, dict) or "protocol" not in info or "differentiable" not in info:
        raise ValueError(f"{response.url} answered {response.text[:200]!r}, not a reward server's /info; "
                         "is it a `rewardkit serve-reward` server?")
    return info


class _RemoteScore(torch.autograd.Function):
    """Scores from the servers; with images that require grad, the servers' gradient is the backward."""

    @staticmethod
    def forward(ctx, images, prompts, reward):
        wanted = ctx.needs_input_grad[0] and reward.differentiable
        scores, gradient = reward.score_batch(images, prompts, gradient=wanted)
        ctx.name = reward.info.get("name")
        ctx.save_for_backward(gradient.to(images) if gradient is not None else None)
        return scores.to(images.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        (gradient,) = ctx.saved_tensors
        if gradient is None:
            raise UserError(f"remote reward: the served reward '{ctx.name}' is not differentiable, so it has no image gradient "
                            "for the pathwise estimator: set estimator = \"score_function\" on this reward, or use it in [eval]")
        return grad_scores.view(-1, 1, 1, 1) * gradient, None, None
