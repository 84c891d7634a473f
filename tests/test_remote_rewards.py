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
from rewardkit.rewards.base import Reward  # noqa: E402
from rewardkit.rewards.remote import Remote, decode_request, decode_response, encode_request, encode_response  # noqa: E402

PROMPTS = ["a handwritten digit 3", "the number five", "a handwritten seven", "digit 1", "the number zero", "a handwritten digit 8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`rewardkit serve-reward digit_classifier` in its own process (and session: a signal to it reaches no test), as a
    user starts one; its output goes to a file, which no full pipe can block."""

    def __init__(self, log_dir, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server_{self.port}.log"
        env = {**os.environ, "REWARDKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rewardkit", "serve-reward", "digit_classifier", "--port", str(self.port), *options],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 120) -> "Server":
        import requests

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.log.read_text()}")
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
def servers(tmp_path_factory):
    """Two servers the tests share, and a third with small limits that the outage test stops and kills."""
    logs = tmp_path_factory.mktemp("servers")
    started = [Server(logs), Server(logs), Server(logs, "--max-batch", "4", "--max-request-mb", "1")]  # together: imports overlap
    try:
        yield [s.wait() for s in started]
    finally:
        for s in started:
            if s.proc.poll() is None:
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
    assert not gradient and torch.equal(quantized, torch.floor(x * 255 + 0.5) / 255)  # as saved PNGs round
    scores, grad = decode_response(encode_response(torch.arange(3.0), torch.ones(3, 3, 8, 5)), 3, (3, 3, 8, 5), True)
    assert torch.equal(scores, torch.arange(3.0)) and torch.equal(grad, torch.ones(3, 3, 8, 5))
    with pytest.raises(ValueError, match="3 strings"):
        decode_request(encode_request(x, ["a", "b"], False))
    with pytest.raises(ValueError, match="safetensors"):
        decode_request(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="2 scores"):
        decode_response(encode_response(torch.zeros(3), None), 2, (2, 3, 8, 5), False)


def test_remote_scores_and_gradients_equal_the_local_rewards_spread_over_the_servers(servers, local):
    remote = Remote(url=[s.url for s in servers[:2]])
    assert remote.differentiable and remote.input_size == local.input_size
    x = torch.rand(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = [s.served() for s in servers]
    scores, grad = remote.score_and_gradient(x, PROMPTS)
    want_scores, want_grad = local.score_and_gradient(x, PROMPTS)
    # the same float32 network on the same CPU and inputs: equal up to the reduction order of a different thread count
    assert torch.allclose(scores, want_scores, rtol=1e-5, atol=1e-5 * want_scores.abs().max())
    assert torch.allclose(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max()) and want_grad.abs().sum() > 0
    assert [s.served() - b for s, b in zip(servers, before)] == [3, 3, 0]  # half the batch each
    with torch.no_grad():  # plain scoring (evaluation) asks for no gradient and gives the same scores
        assert torch.allclose(remote(x, PROMPTS), want_scores, rtol=1e-5, atol=1e-5 * want_scores.abs().max())
    # a bad prompt is the request's fault: the served reward's own message, exit 2, not retried as an outage
    with pytest.raises(UserError, match="HTTP 422") as err:
        remote(x[:1], ["a photo of a cat"])
    assert "digit" in str(err.value)


def test_requests_respect_the_servers_limits_and_malformed_ones_are_refused(servers, local):
    import requests

    small = servers[2]  # --max-batch 4 --max-request-mb 1
    remote = Remote(url=small.url)
    assert remote.max_batch == 4 and remote.max_request_bytes == 2**20
    mixed = Remote(url=[servers[0].url, small.url])  # any request may go to either: the strictest limits hold
    assert mixed.max_batch == 4 and mixed.max_request_bytes == 2**20
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    before = requests.get(small.url + "/info", timeout=5).json()
    with torch.no_grad():
        assert torch.allclose(remote(x, PROMPTS), local(x, PROMPTS), rtol=1e-5, atol=1e-5)
    after = requests.get(small.url + "/info", timeout=5).json()
    assert (after["requests"] - before["requests"], after["images"] - before["images"]) == (2, 6)  # 3 + 3: none above 4
    big = torch.rand(3, 3, 256, 256)  # 786 KB each as float32: one per request under 1 MB
    with torch.no_grad():
        assert remote(big, PROMPTS[:3]).shape == (3,)
    assert requests.get(small.url + "/info", timeout=5).json()["requests"] - after["requests"] == 3
    headers = {"Content-Type": "application/vnd.rewardkit.safetensors"}
    too_large = requests.post(small.url + "/score", data=encode_request(torch.zeros(2, 3, 256, 256), ["a", "b"], False),
                              headers=headers, timeout=10)
    assert too_large.status_code == 413 and "--max-request-mb" in too_large.json()["detail"]
    empty = requests.post(small.url + "/score", data=encode_request(torch.zeros(1, 3, 0, 8), ["a"], False), headers=headers, timeout=10)
    assert empty.status_code == 400 and "each at least 1" in empty.json()["detail"]
    garbage = requests.post(small.url + "/score", data=b"not safetensors", headers=headers, timeout=10)
    assert garbage.status_code == 400


@pytest.mark.parametrize("transfer", ["uint8", "float32"])
def test_every_request_fits_the_size_limit_whatever_the_prompts(servers, transfer):
    """The batch is split so that each request's encoded body (counted by encoding it) stays under the limit, with
    prompts whose JSON escaping grows them (accents, CJK, quotes) and near the limit."""
    remote = Remote(url=servers[0].url, transfer=transfer)
    remote.max_batch, remote.max_request_bytes = 256, 200_000
    for prompts in (["é" * 400] * 76, ["一只猫坐在窗台上" * 40] * 76, ['"\\' * 200] * 76, ["a cat"] * 76):
        x = torch.rand(len(prompts), 3, 30, 30)
        chunks = remote.request_chunks(x, prompts)
        assert torch.equal(torch.cat(chunks), torch.arange(len(prompts)))
        sizes = [len(encode_request(x[c], [prompts[i] for i in c], False, transfer)) for c in chunks]
        assert max(sizes) <= remote.max_request_bytes, sizes
        assert min(sizes) > remote.max_request_bytes / 4, ("needlessly small requests", sizes)


def test_a_reward_served_without_gradients_says_so_in_backward(servers):
    remote = Remote(url=servers[0].url)
    remote.differentiable = False  # as /info says of a non-differentiable served reward (OCR, a VLM judge)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    scores = remote(x, PROMPTS[:2])
    with pytest.raises(UserError, match='estimator = "score_function"'):
        scores.sum().backward()
    empty = remote(x[:0], [])
    assert empty.shape == (0,)


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
    there = run({"type": "remote", "url": [s.url for s in servers[:2]]}, "remote")
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

    first, _, second = servers  # the third server is this test's to stop and kill
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
    # a dead server among live ones: /info is asked of each alone, the live one's answer is the one kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rewardkit"):
        partly = Remote(url=[second.url, first.url], timeout=2.0, retries=0)
    assert partly.differentiable and f"{second.url} did not answer" in caplog.text
    # a run with no server left skips each step like a NaN one and stops at run.max_nonfinite_steps, with a message
    with pytest.raises(TrainingDiverged, match="3 consecutive steps") as diverged:
        alone.fit()
    assert "Rewards computed elsewhere failed: digits (3 batch(es) no server answered" in str(diverged.value)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True] * 3 and rows[-1]["nonfinite_total"] == 3


class Held(Reward):
    """A throwaway reward that scores only when the test lets it: the server's queue under test, not a model."""

    name = "held"
    differentiable = False

    def __init__(self):
        super().__init__()
        import threading

        self.release, self.calls = threading.Event(), 0

    def forward(self, images, prompts):
        self.calls += 1
        assert self.release.wait(60), "the test never released the reward"
        return images.mean(dim=(1, 2, 3))


def test_a_busy_server_sheds_load_and_skips_requests_nobody_waits_for():
    import threading

    import requests
    import uvicorn

    from rewardkit.reward_server import create_app

    port, reward = free_port(), Held()
    server = uvicorn.Server(uvicorn.Config(create_app(reward, max_queue=2), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base, body = f"http://127.0.0.1:{port}", encode_request(torch.rand(1, 3, 4, 4), ["a"], False)

    def until(condition, what: str) -> None:
        end = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < end, f"{what} did not happen in 30 s"
            time.sleep(0.02)

    until(lambda: server.started, "the server's start")
    info = lambda: requests.get(base + "/info", timeout=10).json()  # noqa: E731
    results = {}

    def post(name: str, timeout: float) -> None:
        try:
            results[name] = requests.post(base + "/score", data=body, timeout=timeout).status_code
        except requests.Timeout:
            results[name] = "timeout"

    first = threading.Thread(target=post, args=("scored", 60))
    quitter = threading.Thread(target=post, args=("gave up", 1.0))
    try:
        first.start()
        until(lambda: reward.calls == 1, "the first request's scoring")  # held inside the reward
        quitter.start()
        until(lambda: info()["waiting"] == 2, "the second request's wait")
        shed = requests.post(base + "/score", data=body, timeout=30)  # the queue holds 2: the next one is told to come back
        assert shed.status_code == 503 and shed.headers["Retry-After"] == "1" and "--max-queue 2" in shed.json()["detail"]
        quitter.join()  # its client gave up while it waited its turn
        time.sleep(0.2)  # the server hears of the closed connection
        reward.release.set()
        first.join()
        assert results == {"scored": 200, "gave up": "timeout"}
        until(lambda: info()["waiting"] == 0, "the quitter's turn")
        assert info()["requests"] == reward.calls == 1, "the request whose client went away was not scored"

        # the remote reward meets a full queue as busy, not broken, even beside a dead server whose failures use up
        # its one retry: it waits as told and is answered
        reward.release.clear()
        held = threading.Thread(target=post, args=("held", 60))
        held.start()
        until(lambda: reward.calls == 2, "the held request's scoring")
        queued = threading.Thread(target=post, args=("queued", 60))
        queued.start()
        until(lambda: info()["waiting"] == 2, "a full queue")
        patient = Remote(url=[f"http://127.0.0.1:{free_port()}", base], retries=1, timeout=30)  # nothing listens on the first
        x, got = torch.rand(1, 3, 4, 4), {}

        def score() -> None:
            with torch.no_grad():
                got["scores"] = patient(x, ["a"])

        asking = threading.Thread(target=score)
        asking.start()
        shed = info()["shed"]
        until(lambda: info()["shed"] >= shed + 2, "the patient client's second busy answer")  # it waited and came back
        reward.release.set()
        for t in (asking, held, queued):
            t.join()
        assert torch.allclose(got["scores"], x.mean(dim=(1, 2, 3))) and patient.failed_batches == 0
        assert results["held"] == results["queued"] == 200 and info()["requests"] == 4
    finally:
        reward.release.set()
        server.should_exit = True
        thread.join(10)


def test_serve_reward_refuses_bad_input_with_exit_2(monkeypatch, capsys):
    from rewardkit.cli import main

    monkeypatch.setenv("REWARDKIT_LOAD_PLUGINS", "")
    assert main(["serve-reward", "digit_classifier", "-o", "score=median", "--port", str(free_port())]) == 2
    assert "score" in capsys.readouterr().err
    assert main(["serve-reward", "classifier_free_guidance", "--port", str(free_port())]) == 2
    assert "needs the run's generator" in capsys.readouterr().err
