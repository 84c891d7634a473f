"""Launching data-parallel runs: `rewardkit run RECIPE --num-processes N`.

The training loop is the same code for one process or many (accelerate);
this module only starts the processes. On a CUDA machine it hands over to
`accelerate launch` with a configuration shipped in
rewardkit/accelerate_configs/ (or a path to the user's own); on a CPU-only
machine it uses torchrun with accelerate's CPU mode (gloo), which is what
the tests run. Under `accelerate launch` or torchrun started by the user,
`rewardkit run` is already one of the processes and launches nothing.

Everything that can be checked before processes start is checked here, so
bad input exits 2 with one message instead of N tracebacks.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import sys
from pathlib import Path

from rewardkit.errors import UserError, did_you_mean


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shipped_configs() -> dict[str, Path]:
    root = importlib.resources.files("rewardkit.accelerate_configs")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config(name_or_path: str) -> Path:
    """A shipped configuration by name, or the user's accelerate YAML by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise UserError(f"accelerate config {path}: no such file")
        return path
    configs = shipped_configs()
    if name_or_path not in configs:
        raise UserError(
            f"no shipped accelerate config named '{name_or_path}'{did_you_mean(name_or_path, configs)}; "
            f"shipped: {', '.join(sorted(configs))}, or give the path of your own accelerate YAML"
        )
    return configs[name_or_path]


def check(batch_size: int, num_processes: int, config: str) -> Path | None:
    """Validate a distributed request before any process starts; returns the config to use."""
    if num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {num_processes}")
    if batch_size % num_processes:
        raise UserError(
            f"run.batch_size = {batch_size} does not divide evenly over {num_processes} processes; "
            f"use a batch size that is a multiple of {num_processes}"
        )
    config_path = resolve_config(config)
    settings = _read_config(config_path)
    kind = str(settings.get("distributed_type", "NO")).upper()
    if kind not in (*DATA_PARALLEL, "FSDP"):
        raise UserError(
            f"run.accelerate_config {config}: distributed_type {kind} is not supported (DeepSpeed is not yet); "
            "use data parallelism ('ddp') or sharded data parallelism ('fsdp')"
        )
    if kind == "FSDP":
        fsdp = settings.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) != 2:
            raise UserError(f"run.accelerate_config {config}: rewardkit runs FSDP2; set fsdp_config.fsdp_version: 2 (or use 'fsdp')")
    import torch

    if not torch.cuda.is_available():
        if config != "ddp":
            raise UserError(
                f"accelerate config '{config}' needs CUDA GPUs, and this machine has none; "
                "on CPU, data parallelism runs with the 'ddp' config (gloo)"
            )
        return None
    if num_processes > torch.cuda.device_count():
        raise UserError(f"--num-processes {num_processes} asks for more processes than the {torch.cuda.device_count()} GPUs here")
    return config_path


DATA_PARALLEL = ("NO", "MULTI_GPU", "MULTI_CPU")


def _read_config(path: Path) -> dict:
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"accelerate config {path}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"accelerate config {path}: expected a mapping of settings")
    return data


def launch(rewardkit_args: list[str], num_processes: int, config_path: Path | None) -> int:
    """Start `rewardkit ARGS` in `num_processes` processes; returns the exit code."""
    port = str(_free_port())
    env = dict(os.environ)
    if config_path is None:  # CPU: torchrun + accelerate's CPU mode, gloo backend
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(num_processes),
               "--master-addr", "127.0.0.1", "--master-port", port]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
               "--num_processes", str(num_processes), "--main_process_port", port]
    cmd += ["-m", "rewardkit", *rewardkit_args]
    return subprocess.call(cmd, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
