"""Throughput of a reward served by `rewardkit serve-reward` and called through `remote`, against the same reward local.

    python bench/remote_reward.py            # markdown table; servers on 127.0.0.1, one CPU thread each

Every figure is images per second over --repeat calls of --batch images after one warm-up (the best call: the
machine is shared). Local rewards run in this process with one thread; each server is its own process with one
thread (OMP_NUM_THREADS=1), so "2 servers" may use two cores where "local" uses one. The rows:
- digit_classifier, 16 px, with its image gradient (what pathwise training asks): a tiny CNN, so the row is
  the protocol's overhead per request (HTTP, safetensors, a thread hop);
- smoothness, 512 px, with gradient: 3 MB of float32 each way per image;
- jpeg_compressibility, 512 px, no gradient: images as float32 and as uint8 (transfer = "uint8").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

ROWS = [  # (reward, side, gradient, transfer)
    ("digit_classifier", 16, True, "float32"),
    ("smoothness", 512, True, "float32"),
    ("jpeg_compressibility", 512, False, "float32"),
    ("jpeg_compressibility", 512, False, "uint8"),
]


def start_server(name: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REWARDKIT_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardkit", "serve-reward", name, "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def wait(url: str, timeout: float = 180) -> None:
    import requests

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            requests.get(url + "/info", timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit(f"no answer from {url}")


def images_per_second(reward, side: int, batch: int, gradient: bool, repeat: int) -> float:
    x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    prompts = [f"a handwritten digit {i % 10}" for i in range(batch)]
    time.sleep(1.0)  # the previous row's servers go idle first (their threads may still spin for a while)
    best = float("inf")
    for i in range(repeat + 1):
        t = time.perf_counter()
        if gradient:
            reward.score_and_gradient(x, prompts)
        else:
            with torch.no_grad():
                reward(x, prompts)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - t)
    return batch / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from rewardkit.plugins import load_registry
    from rewardkit.rewards.remote import Remote

    registry = load_registry()
    names = sorted({name for name, *_ in ROWS})
    servers = {name: [start_server(name), start_server(name)] for name in names}
    try:
        for pair in servers.values():
            for _, url in pair:
                wait(url)
        print(f"images / s, batch {args.batch}, best of {args.repeat}, CPU, one thread per process, torch {torch.__version__}\n")
        print("| reward | image | gradient | transfer | local | remote, 1 server | remote, 2 servers |")
        print("|---|---|---|---|---|---|---|")
        for name, side, gradient, transfer in ROWS:
            local = registry.get("reward", name)().eval().requires_grad_(False)
            urls = [url for _, url in servers[name]]
            figures = [images_per_second(r, side, args.batch, gradient, args.repeat)
                       for r in (local, Remote(url=urls[0], transfer=transfer), Remote(url=urls, transfer=transfer))]
            print(f"| {name} | {side}x{side} | {'yes' if gradient else 'no'} | {transfer} | " + " | ".join(f"{f:.0f}" for f in figures) + " |")
    finally:
        for pair in servers.values():
            for proc, _ in pair:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
