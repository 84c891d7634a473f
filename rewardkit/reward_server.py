"""`rewardkit serve-reward NAME`: any registered reward over HTTP, for the `remote` reward to call.

    rewardkit serve-reward hps -o version=v2.1 --host 0.0.0.0 --port 8100

FastAPI + uvicorn. The protocol is rewardkit.rewards.remote's: ``GET /info``
(what is served, and how much it has scored), ``POST /score`` (safetensors
in, safetensors out; the image gradient when asked and the reward is
differentiable). Requests are scored one at a time (the model is one), each
in a worker thread so the server keeps answering /info meanwhile. A request
the reward refuses as bad input (a UserError) answers 422 with its message,
a malformed one 400; the client reports both as errors, not as outages.
"""


import logging  # (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time)
import threading
from typing import Sequence

import torch

from rewardkit.errors import UserError
from rewardkit.rewards.base import Reward
from rewardkit.rewards.remote import MEDIA_TYPE, PROTOCOL, decode_request, encode_response

log = logging.getLogger("rewardkit")


def build_reward(name: str, options: Sequence[str], registry, device: str | None = None) -> Reward:
    """The reward `name` with `options` ('KEY=VALUE', values read as TOML), validated as a recipe's are, on `device`."""
    from rewardkit.images import default_device
    from rewardkit.options import validate_plugin_options
    from rewardkit.recipe import parse_override

    cls = registry.get("reward", name)
    values = {}
    for text in options:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise UserError(f"--option {text!r}: expected KEY=VALUE with one of {cls.name}'s options, e.g. weights=/models/x.pt")
        values[keys[0]] = value
    validate_plugin_options(cls, values, name, source="--option")
    if cls.setup is not Reward.setup:
        raise UserError(f"reward '{name}' needs the run's generator (it implements setup), so it cannot be served apart from the run")
    reward = cls(**values)
    return reward.requires_grad_(False).eval().to(torch.device(device) if device else default_device())


def create_app(reward: Reward, max_batch: int = 256):
    """The ASGI application serving `reward`."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from starlette.concurrency import run_in_threadpool

    device = next(iter(reward.parameters()), torch.empty(0)).device
    lock = threading.Lock()
    served = {"requests": 0, "images": 0}
    app = FastAPI(title=f"rewardkit reward server: {reward.name}")

    @app.get("/info")
    def info():
        import rewardkit

        return {"protocol": PROTOCOL, "name": reward.name, "differentiable": bool(reward.differentiable),
                "input_size": list(reward.input_size) if reward.input_size else None, "device": str(device),
                "rewardkit": rewardkit.__version__, **served}

    def score(body: bytes) -> bytes:
        try:
            images, prompts, gradient = decode_request(body)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        if len(prompts) > max_batch:
            raise HTTPException(413, f"{len(prompts)} images in one request; this server takes at most {max_batch} (--max-batch)")
        if gradient and not reward.differentiable:
            raise HTTPException(400, f"reward '{reward.name}' is not differentiable: it has no image gradient to give")
        with lock:
            try:
                x = images.to(device)
                if gradient:
                    scores, grad = reward.score_and_gradient(x, prompts)
                else:
                    with torch.no_grad():
                        scores, grad = reward(x, prompts).float(), None
            except UserError as exc:
                raise HTTPException(422, str(exc)) from None
            served["requests"] += 1
            served["images"] += len(prompts)
        return encode_response(scores, grad)

    @app.post("/score")
    async def score_endpoint(request: Request):
        body = await request.body()
        return Response(await run_in_threadpool(score, body), media_type=MEDIA_TYPE)

    return app


def serve(reward: Reward, host: str, port: int, max_batch: int = 256) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    import uvicorn

    log.info("serving reward '%s' (%s) on http://%s:%d: GET /info, POST /score", reward.name,
             "differentiable" if reward.differentiable else "not differentiable", host, port)
    uvicorn.run(create_app(reward, max_batch), host=host, port=port, log_level="warning")


def require_server_packages() -> None:
    """fastapi and uvicorn are the `serve` extra's: say how to get them rather than fail on an import."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"rewardkit serve-reward needs fastapi and uvicorn ({exc.name} is missing): pip install 'rewardkit[serve]' "
                        "(from a checkout: pip install -e '.[serve]')") from None
