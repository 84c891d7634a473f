"""Rewards that run elsewhere: `rewardkit serve-reward` servers (real uvicorn processes on 127.0.0.1) and the `remote`
reward that calls them; the server's mistakes and outages as the optimizer sees them."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rewardkit.errors import UserError  # noqa: E402
from rewardkit.rewards.remote import Remote, decode_request, decode_response, encode_request, encode_response  # noqa: E402

PROMPTS = ["a handwritten digit 3", "the number five", "a handwritten seven", "digit 1", "the number zero", "a handwritten digit 8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rewardkit serve-reward digit_classifier` in its own process, as a user starts one."""

    def __init__(self, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "REWARDKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "rewardkit", "serve-reward", "digit_classifier", "--port", str(self.port), *options],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float = 120) -> "Server":
        import requests

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                requests.get(self.url + "/info", timeout=1)
                return self
            except requests.RequestException:
                time.sleep(0.2)
        raise AssertionError(f"no answer from {self.url} in {timeout} s")

    def served(self) -> int:
        import requests

        return requests.get(self.url + "/info", timeout=5).json()["images"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def servers():
    pair = [Server(), Server()]  # started together: their imports overlap
    try:
        yield [s.wait() for s in pair]
    finally:
        for s in pair:
            s.proc.send_signal(signal.SIGCONT)
            s.kill()


@pytest.fixture(scope="module")
def local():
    from rewardkit.testbed.plugins import DigitClassifier

    return DigitClassifier().eval().requires_grad_(False)


def test_the_wire_format_round_trips_and_refuses_malformed_requests():
    x = torch.rand(3, 3, 8, 5, generator=torch.Generator().manual_seed(0))
    images, prompts, gradient = decode_request(encode_request(x, ["a", "b é", "c"], True))
    assert torch.equal(images, x) and prompts == ["a", "b é", "c"] and gradient
    quantized, _, gradient = decode_request(encode_request(x, ["a", "b", "c"], False, transfer="uint8"))
    assert not gradient and torch.equal(quantized, (x * 255).round() / 255)
    scores, grad = decode_response(encode_response(torch.arange(3.0), torch.ones(3, 3, 8, 5)), 3, (3, 3, 8, 5), True)
    assert torch.equal(scores, torch.arange(3.0)) and torch.equal(grad, torch.ones(3, 3, 8, 5))
    with pytest.raises(ValueError, match="3 strings"):
        decode_request(encode_request(x, ["a", "b"], False))
    with pytest.raises(ValueError, match="safetensors"):
        decode_request(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="2 scores"):
        decode_response(encode_response(torch.zeros(3), None), 2, (2, 3, 8, 5), False)


def test_remote_scores_and_gradients_equal_the_local_rewards_spread_over_the_servers(servers, local):
    remote = Remote(url=[s.url for s in servers])
    assert remote.differentiable and remote.input_size == local.input_size
    x = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = [s.served() for s in servers]
    scores, grad = remote.score_and_gradient(x, PROMPTS)
    want_scores, want_grad = local.score_and_gradient(x, PROMPTS)
    # the same float32 network on the same CPU and inputs: equal up to the reduction order of a different thread count
    assert torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-5 * want_scores.abs().max())
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max()) and want_grad.abs().sum() > 0
    assert [s.served() - b for s, b in zip(servers, before)] == [3, 3]  # half the batch each
    with torch.no_grad():  # plain scoring (evaluation) asks for no gradient and gives the same scores
        assert torch.allclose(remote(x, PROMPTS), want_scores, rtol=1e-5, atol=1e-5 * want_scores.abs().max())
    # a bad prompt is the request's fault: the served reward's own message, exit 2, not retried as an outage
    with pytest.raises(UserError, match="HTTP 422") as err:
        remote(x[:1], ["a photo of a cat"])
    assert "digit" in str(err.value)


def test_a_remote_reward_trains_as_the_local_one_does(servers, tmp_path):
    from rewardkit.optimizer import Optimizer

    def run(reward: dict, name: str):
        recipe = {
            "run": {"steps": 2, "batch_size": 4, "dir": str(tmp_path / name), "trackers": [], "progress": False, "seed": 0},
            "prompts": {"train": PROMPTS[:4]},
            "generator": {"type": "pixels", "height": 16, "width": 16},
            "optimizer": {"name": "adam", "lr": 0.05},
            "rewards": {"digits": reward},
        }
        Optimizer.from_recipe(recipe).fit()
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    here = run({"type": "digit_classifier"}, "local")
    there = run({"type": "remote", "url": [s.url for s in servers]}, "remote")
    for a, b in zip(here, there):  # the second step's reward depends on the first step's gradient, from the server
        assert b["reward/digits"] == pytest.approx(a["reward/digits"], rel=1e-4)
        assert b["grad_norm/digits"] == pytest.approx(a["grad_norm/digits"], rel=1e-4)
    assert here[1]["reward/digits"] != here[0]["reward/digits"]

    # evaluation mixes local and remote rewards, one plugin in two columns under labels
    from rewardkit.cli import main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    assert main(["eval", str(tmp_path / "remote"), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "ev"),
                 "--metrics", "digit_classifier,served=remote,smoothness", "--metric-option", f"served.url={servers[1].url}"]) == 0
    (row,) = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert set(row["metrics"]) == {"digit_classifier", "served", "smoothness"}
    assert row["metrics"]["served"] == pytest.approx(row["metrics"]["digit_classifier"], rel=1e-5)
    assert "| Model | Steps | digit_classifier | served | smoothness |" in (tmp_path / "ev" / "results.md").read_text()


def test_outages_a_killed_server_is_survived_a_hung_one_times_out_a_lost_batch_scores_nan(servers, tmp_path, caplog):
    from rewardkit.errors import TrainingDiverged
    from rewardkit.optimizer import Optimizer

    first, second = servers
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    remote = Remote(url=[first.url, second.url], timeout=2.0, retries=1)
    strict = Remote(url=second.url, timeout=1.0, retries=0)
    alone = Optimizer.from_recipe({  # a run whose only server dies before its first step
        "run": {"steps": 20, "batch_size": 2, "dir": str(tmp_path / "run"), "trackers": [], "progress": False, "seed": 0,
                "max_nonfinite_steps": 3},
        "prompts": {"train": PROMPTS[:2]},
        "generator": {"type": "pixels", "height": 16, "width": 16},
        "rewards": {"digits": {"type": "remote", "url": second.url, "timeout": 2.0, "retries": 0}},
    })
    with torch.no_grad():
        want = remote(x, PROMPTS[:4])
        # hung (SIGSTOP: connections are accepted, never answered): the request times out and goes to the other server
        second.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            with caplog.at_level(logging.WARNING, logger="rewardkit"):
                assert torch.allclose(remote(x, PROMPTS[:4]), want, rtol=1e-5, atol=1e-5)
            assert 2.0 <= time.monotonic() - t < 20 and f"{second.url} failed (" in caplog.text and "ReadTimeout" in caplog.text
            # with no other server and no retries, the batch is lost: NaN, logged, counted
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="rewardkit"):
                lost = strict(x, PROMPTS[:4])
            assert torch.isnan(lost).all() and strict.failed_batches == 1 and "scores NaN, so its step is skipped" in caplog.text
        finally:
            second.proc.send_signal(signal.SIGCONT)
        assert torch.allclose(remote(x, PROMPTS[:4]), want, rtol=1e-5, atol=1e-5)  # back
        # killed: connection refused, the other server takes its share at once
        second.kill()
        assert torch.allclose(remote(x, PROMPTS[:4]), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="no server answered /info") as err:
        Remote(url=second.url, timeout=1.0)
    assert "rewardkit serve-reward" in str(err.value)
    # a run with no server left skips each step like a NaN one and stops at run.max_nonfinite_steps, with a message
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        alone.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True] * 3 and rows[-1]["nonfinite_total"] == 3


def test_serve_reward_refuses_bad_input_with_exit_2(monkeypatch, capsys):
    from rewardkit.cli import main

    monkeypatch.setenv("REWARDKIT_LOAD_PLUGINS", "")
    assert main(["serve-reward", "digit_classifier", "-o", "score=median", "--port", str(free_port())]) == 2
    assert "score" in capsys.readouterr().err
    assert main(["serve-reward", "classifier_free_guidance", "--port", str(free_port())]) == 2
    assert "needs the run's generator" in capsys.readouterr().err
