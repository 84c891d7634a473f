"""`rewardkit serve-reward NAME`: any registered reward over HTTP, for the `remote` reward to call.

    rewardkit serve-reward hps -o version=v2.1 --host 0.0.0.0 --port 8100

FastAPI + uvicorn. The protocol is rewardkit.rewards.remote's: ``GET /info``
(what is served, its limits, how much it has scored), ``POST /score``
(safetensors in, safetensors out; the image gradient when asked and the
reward is differentiable). Requests are scored one at a time (the model is
one), in a worker thread, so /info answers meanwhile; a request whose client
went away while it waited is not scored. Past `max_queue` requests in the
server (being received, waiting or scored; /info's `waiting`), it answers
503 with Retry-After (the client tries another server or
waits), and a body above `max_request_mb` is refused with 413 before it is
read. A request the reward refuses as bad input (a UserError) answers 422
with its message, a malformed one 400; the client reports both as errors,
not as outages. There is no authentication: serve on 127.0.0.1 or a
private network, or behind a proxy that authenticates.
"""


import asyncio  # (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at run time)
import logging
from typing import Sequence

import torch

from rewardkit.errors import UserError
from rewardkit.rewards.base import Reward
from rewardkit.rewards.remote import MAX_BATCH, MAX_REQUEST_BYTES, MEDIA_TYPE, PROTOCOL, decode_request, encode_response

log = logging.getLogger("rewardkit")

MAX_QUEUE, MAX_REQUEST_MB = 32, MAX_REQUEST_BYTES // 2**20
"""Defaults: requests in the server at once; megabytes in one request's body."""


def build_reward(name: str, options: Sequence[str], registry, device: str | None = None) -> Reward:
    """The reward `name` with `options` ('KEY=VALUE', values read as TOML), validated as a recipe's are, on `device`."""
    from rewardkit.rewards.base import standalone_reward
    from rewardkit.recipe import parse_override

    cls = registry.get("reward", name)
    values = {}
    for text in options:
        keys, value = parse_override(text)
        if len(keys) != 1:
            raise UserError(f"--option {text!r}: expected KEY=VALUE with one of {cls.name}'s options, e.g. weights=/models/x.pt")
        values[keys[0]] = value
    return standalone_reward(cls, values, name, source="--option", device=device)


def create_app(reward: Reward, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE, max_request_mb: float = MAX_REQUEST_MB):
    """The ASGI application serving `reward`."""
    from fastapi import FastAPI, HTTPException, Request, Response
    from starlette.concurrency import run_in_threadpool

    device = next(iter(reward.parameters()), torch.empty(0)).device
    max_bytes = int(max_request_mb * 2**20)
    one_at_a_time = asyncio.Lock()
    state = {"requests": 0, "images": 0, "waiting": 0, "shed": 0}
    app = FastAPI(title=f"rewardkit reward server: {reward.name}")

    @app.get("/info")
    async def info():
        import rewardkit

        return {"protocol": PROTOCOL, "name": reward.name, "differentiable": bool(reward.differentiable),
                "input_size": list(reward.input_size) if reward.input_size else None, "device": str(device),
                "rewardkit": rewardkit.__version__, "max_batch": max_batch, "max_request_bytes": max_bytes, **state}

    def score(images, prompts, gradient) -> bytes:
        x = images.to(device)
        try:
            if gradient:
                scores, grad = reward.score_and_gradient(x, prompts)
            else:
                with torch.no_grad():
                    scores, grad = reward(x, prompts).float(), None
        except UserError as exc:
            raise HTTPException(422, str(exc)) from None
        return encode_response(scores, grad)

    async def read_body(request: Request) -> bytes:
        too_big = HTTPException(413, f"the request is larger than this server's {max_request_mb:g} MB (--max-request-mb); "
                                "send fewer or smaller images per request")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise too_big
        return bytes(body)

    @app.post("/score")
    async def score_endpoint(request: Request):
        if state["waiting"] >= max_queue:
            state["shed"] += 1
            raise HTTPException(503, f"{state['waiting']} requests are waiting (--max-queue {max_queue})", headers={"Retry-After": "1"})
        state["waiting"] += 1
        try:
            body = await read_body(request)
            try:
                images, prompts, gradient = decode_request(body)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
            if len(prompts) > max_batch:
                raise HTTPException(413, f"{len(prompts)} images in one request; this server takes at most {max_batch} (--max-batch)")
            if gradient and not reward.differentiable:
                raise HTTPException(400, f"reward '{reward.name}' is not differentiable: it has no image gradient to give")
            async with one_at_a_time:
                if await request.is_disconnected():  # the client gave up (its timeout) while this waited: nobody reads it
                    log.info("a /score request's client went away before its turn; not scored")
                    return Response(status_code=499)
                answer = await run_in_threadpool(score, images, prompts, gradient)
            state["requests"] += 1
            state["images"] += len(prompts)
            return Response(answer, media_type=MEDIA_TYPE)
        finally:
            state["waiting"] -= 1

    return app


def serve(reward: Reward, host: str, port: int, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
          max_request_mb: float = MAX_REQUEST_MB) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    import uvicorn

    log.info("serving reward '%s' (%s) on http://%s:%d: GET /info, POST /score", reward.name,
             "differentiable" if reward.differentiable else "not differentiable", host, port)
    uvicorn.run(create_app(reward, max_batch, max_queue, max_request_mb), host=host, port=port, log_level="warning")


def require_server_packages() -> None:
    """fastapi and uvicorn are the `serve` extra's: say how to get them rather than fail on an import."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"rewardkit serve-reward needs fastapi and uvicorn ({exc.name} is missing): pip install 'rewardkit[serve]' "
                        "(from a checkout: pip install -e '.[serve]')") from None
