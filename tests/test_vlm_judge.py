"""`vlm_judge` against a real OpenAI-compatible chat server on 127.0.0.1 (FastAPI + uvicorn in a thread) that judges
like a VLM would: it reads the image out of the request's data URL and answers in words with a number."""

# (no `from __future__ import annotations`: FastAPI reads the endpoint's annotations at run time)

import asyncio
import base64
import io
import logging
import socket
import threading
import time

import numpy as np
import pytest
import torch

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from rewardkit.errors import RecipeError, UserError  # noqa: E402
from rewardkit.rewards.vlm_judge import VLMJudge  # noqa: E402

MODEL = "judge-7b"
KEY = "sk-local-test"


class Judge:
    """An OpenAI-compatible server: /v1/models lists MODEL; /v1/chat/completions answers "Score: 1 + 9 * (mean
    brightness)" (as a list of text parts for prompts with 'parts' in them), or, for prompts with 'ramble' in them,
    no number at all, or for 'garble' a 200 that is no chat completion; it records the requests and how many were in
    flight at once."""

    def __init__(self, delay: float = 0.0, models: bool = True):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse

        self.requests, self.in_flight, self.most_in_flight, self.delay = [], 0, 0, delay
        app = FastAPI()

        if models:  # (a gateway may not offer the list)
            @app.get("/v1/models")
            async def model_list():
                return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append((body, request.headers.get("authorization")))
            if body.get("model") != MODEL:  # vLLM's answer to an unknown model
                return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.", "code": 404}}, 404)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(self.delay)
            self.in_flight -= 1
            content = body["messages"][-1]["content"]
            url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
            text = next(c["text"] for c in content if c["type"] == "text")
            from PIL import Image

            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"), dtype=np.float64)
            if "garble" in text:
                return {"status": "ok"}
            answer = "I would rather describe the scene." if "ramble" in text else f"Score: {1 + 9 * pixels.mean() / 255:.4f}"
            if "parts" in text:
                answer = [{"type": "text", "text": answer[:7]}, {"type": "text", "text": answer[7:]}]
            return {"id": "x", "object": "chat.completion", "model": MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "the judge server did not start in 30 s"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def judge():
    server = Judge(delay=0.5)  # long enough that 3 requests are surely in flight together
    yield server
    server.stop()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(seed))


def test_scores_are_the_judges_numbers_mapped_to_0_1_and_requests_look_like_openais(judge, monkeypatch):
    monkeypatch.setenv("RK_JUDGE_KEY", KEY)
    reward = VLMJudge(url=judge.url, model=MODEL, system="Be strict.", template="Prompt: {prompt}. Rate 1-10.",
                      max_concurrency=3, api_key_env="RK_JUDGE_KEY")
    x = images(8)
    prompts = [f"a red cube {i}" for i in range(8)]
    judge.requests.clear()
    judge.most_in_flight = 0
    scores = reward(x, prompts)
    # what the judge saw: the 8-bit image (PNG is lossless); its answer has 4 decimals on a 1-10 scale
    seen = (x * 255).round().mean(dim=(1, 2, 3)) / 255
    assert scores.dtype == torch.float32 and torch.allclose(scores, seen, atol=0.5e-4 / 9 + 1e-6)
    assert judge.most_in_flight == 3  # the concurrency limit held, and was used
    body, auth = judge.requests[0]
    assert auth == f"Bearer {KEY}" and body["temperature"] == 0.0 and body["model"] == MODEL
    assert body["messages"][0] == {"role": "system", "content": "Be strict."}
    user = body["messages"][1]["content"]
    assert user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert sorted(b["messages"][1]["content"][1]["text"] for b, _ in judge.requests) == sorted(f"Prompt: {p}. Rate 1-10." for p in prompts)
    # batch invariance: one image alone scores as in the batch; an answer in content parts reads the same
    assert reward(x[3:4], prompts[3:4]).item() == scores[3].item()
    assert reward(x[3:4], ["in parts"]).item() == scores[3].item()


def test_no_key_is_sent_unless_asked_for(judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-for-this-server")
    judge.requests.clear()
    VLMJudge(url=judge.url, model=MODEL)(images(1), ["a cat"])
    assert [auth for _, auth in judge.requests] == [None]
    monkeypatch.delenv("RK_MISSING_KEY", raising=False)
    with pytest.raises(UserError, match="RK_MISSING_KEY"):
        VLMJudge(url=judge.url, model=MODEL, api_key_env="RK_MISSING_KEY")


def test_unparseable_or_out_of_range_answers_and_unknown_models_are_errors_that_say_what_to_change(judge):
    reward = VLMJudge(url=judge.url, model=MODEL)
    with pytest.raises(UserError, match="score_pattern") as err:
        reward(images(2), ["a cat", "please ramble"])
    assert "I would rather describe the scene." in str(err.value) and "'please ramble'" in str(err.value)
    assert reward.parse("8 out of 10") == pytest.approx(7 / 9)
    with pytest.raises(UserError, match=r"within score_range \[1.0, 10.0\]"):
        reward.parse("I give it 11")
    raw = VLMJudge(url=judge.url, model=MODEL, score_pattern=r"Score:\s*(\S+)", score_range=None)
    assert raw.parse("Score: 7.25") == 7.25
    with pytest.raises(UserError, match="holds no score"):
        raw.parse("Score: high")
    with pytest.raises(UserError, match=f"serves {MODEL}, not model = 'other'"):
        VLMJudge(url=judge.url, model="other")  # at start, from GET /models
    reward.options = reward.options.model_copy(update={"model": "other"})  # a server that drops the model later: its 404 is the request's fault
    with pytest.raises(UserError, match=r"HTTP 404\): The model `other` does not exist"):
        reward(images(1), ["a cat"])


def test_an_answer_in_text_parts_is_read_and_a_malformed_one_is_that_servers_failure():
    """vlm_judge._answer on real requests.Response objects: string content, text parts (a null text is no text),
    and bodies that are no chat completion (ValueError: the endpoints retry them elsewhere)."""
    import json

    import requests

    from rewardkit.rewards.vlm_judge import _answer

    def response(body) -> requests.Response:
        r = requests.Response()
        r.status_code, r._content = 200, json.dumps(body).encode()
        return r

    def completion(content):
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    assert _answer(response(completion("Score: 7"))) == "Score: 7"
    parts = [{"type": "text", "text": "Score:"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": None},
             {"type": "text", "text": " 7"}]
    assert _answer(response(completion(parts))) == "Score: 7"
    assert _answer(response(completion(None))) == ""
    for bad in ({"status": "ok"}, {"choices": []}, completion(7)):
        with pytest.raises(ValueError):
            _answer(response(bad))


def test_options_are_checked_before_any_request():
    for bad in ({"template": "{prompt} and {style}"}, {"score_pattern": r"\d+"}, {"score_pattern": "("}, {"score_range": [5, 5]},
                {"url": "127.0.0.1:8000"}):
        with pytest.raises((RecipeError, UserError, ValueError)):
            from rewardkit.options import validate_plugin_options

            options = {"url": "http://127.0.0.1:1/v1", "model": MODEL, **bad}
            validate_plugin_options(VLMJudge, options, "rewards.judge")
            VLMJudge(**options)


def test_a_judge_that_goes_down_or_garbles_costs_a_skipped_step_not_the_run(judge, caplog):
    with caplog.at_level(logging.WARNING, logger="rewardkit"):
        garbled = VLMJudge(url=judge.url, model=MODEL, retries=1)(images(2), ["a cat", "garble"])
    assert torch.isnan(garbled).all() and "not an OpenAI chat completion" in caplog.text

    listless = Judge(models=False)
    try:
        with caplog.at_level(logging.WARNING, logger="rewardkit"):
            unchecked = VLMJudge(url=listless.url, model=MODEL)
        assert "has no /models to check" in caplog.text and unchecked(images(1), ["a cat"]).isfinite().all()
    finally:
        listless.stop()

    going = Judge()
    reward = VLMJudge(url=going.url, model=MODEL, retries=1, timeout=2.0)
    going.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewardkit"):
        scores = reward(images(3), ["a", "b", "c"])
    assert torch.isnan(scores).all() and reward.failed_batches == 1
    assert "no server answered in 2 tries" in caplog.text and "its step is skipped" in caplog.text
    with pytest.raises(UserError, match="no server answered GET /models"):
        VLMJudge(url=going.url, model=MODEL, retries=0)
