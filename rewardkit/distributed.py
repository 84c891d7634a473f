"""Everything distributed, in one module: launching processes, and the helpers for sharded tensors.

Launching (`rewardkit run RECIPE --num-processes N`). The training loop is
the same code for one process or many (accelerate); on a CUDA machine this hands over to
`accelerate launch` with a configuration shipped in
rewardkit/accelerate_configs/ (or a path to the user's own); on a CPU-only
machine it uses torchrun with accelerate's CPU mode (gloo), which is what
the tests run. Under `accelerate launch` or torchrun started by the user,
`rewardkit run` is already one of the processes and launches nothing.

Everything that can be checked before processes start is checked here, so
bad input exits 2 with one message instead of N tracebacks.

Sharded tensors (FSDP2). FSDP replaces each parameter by a DTensor that holds
this process's shard. Generators, regularizers and the optimizer never touch
DTensor themselves: they call `full_tensor`, `squared_distance`,
`lora_squared_norm`, `reshard` and the optimizer-state functions below, which
do the plain thing for ordinary tensors. Each process draws the global batch
and keeps its slice (`batch_shard`, `shard_options`), so 1 process and N
processes see the same samples.
"""

from __future__ import annotations

import importlib.resources
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rewardkit.errors import UserError, did_you_mean


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def end_process_group() -> None:
    """Destroy the process group of a process rewardkit launched (`rewardkit run --num-processes N`'s children),
    whatever way its run ended: one left to the interpreter's exit can abort it ("terminate called without an
    active exception" from a gloo thread), turning exit 0 or 2 into SIGABRT. A Python caller's own group is theirs."""
    import torch.distributed as dist

    if launched() and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


@dataclass(frozen=True)
class Machines:
    """The machines of a multi-node run (count 1: this machine alone)."""

    count: int = 1
    rank: int = 0
    main_ip: str | None = None
    main_port: int = 29500

    @classmethod
    def check(cls, count: int, rank: int, main_ip: str | None, main_port: int) -> "Machines":
        if rank >= count:
            raise UserError(f"--machine-rank {rank} is not one of the {count} machines (0..{count - 1})")
        if count > 1 and not main_ip:
            raise UserError("--num-machines > 1 needs --main-process-ip, the address of machine 0 (the same on every machine)")
        return cls(count, rank, main_ip, main_port)


def check(batch_size: int, num_processes: int, config: str, accumulation: int = 1, local_processes: int | None = None) -> Path | None:
    """Validate a distributed request before any process starts; returns the config to use.

    `num_processes` counts every process of the run (all machines); `local_processes` those of this machine."""
    local = num_processes if local_processes is None else local_processes
    if batch_size % num_processes:
        raise UserError(
            f"run.batch_size = {batch_size} does not divide evenly over {num_processes} processes; "
            f"use a batch size that is a multiple of {num_processes}"
        )
    config_path = resolve_config(config)
    settings = _read_config(config_path)
    if "gradient_accumulation_steps" in settings and int(settings["gradient_accumulation_steps"]) != accumulation:
        raise UserError(
            f"accelerate config {config_path}: gradient_accumulation_steps = {settings['gradient_accumulation_steps']}, but the recipe has "
            f"run.gradient_accumulation_steps = {accumulation}; rewardkit draws each update's batch itself, so set the accumulation "
            "in the recipe and remove the key from the YAML"
        )
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
    if local > torch.cuda.device_count():
        raise UserError(f"--num-processes {local} asks for more processes than the {torch.cuda.device_count()} GPUs here")
    return config_path


DATA_PARALLEL = ("NO", "MULTI_GPU", "MULTI_CPU")


def _read_config(path: Path) -> dict:
    import json

    import yaml

    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
        raise UserError(f"accelerate config {path}: cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"accelerate config {path}: expected a mapping of settings")
    return data


def launch(rewardkit_args: list[str], num_processes: int, config_path: Path | None, machines: Machines = Machines()) -> int:
    """Start `rewardkit ARGS` in `num_processes` processes on this machine (of `machines.count`); returns the exit code."""
    multi = machines.count > 1
    port = str(machines.main_port if multi else _free_port())
    address = machines.main_ip if multi else "127.0.0.1"
    env = dict(os.environ)
    if config_path is None:  # CPU: torchrun + accelerate's CPU mode, gloo backend
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(machines.count), "--node-rank", str(machines.rank),
               "--nproc-per-node", str(num_processes), "--master-addr", address, "--master-port", port]
    else:  # accelerate counts processes over all machines
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
               "--num_processes", str(num_processes * machines.count), "--main_process_port", port]
        if multi:
            cmd += ["--num_machines", str(machines.count), "--machine_rank", str(machines.rank), "--main_process_ip", address]
    cmd += ["-m", "rewardkit", *rewardkit_args]
    return subprocess.call(cmd, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the batch over processes
def batch_shard(process_index: int, num_processes: int, batch_size: int) -> slice:
    """This process's part of a global batch (the batch size divides evenly: checked before launch)."""
    return slice(process_index * batch_size // num_processes, (process_index + 1) * batch_size // num_processes)


def shard_options(options, shard: slice):
    """Slice the per-sample tensors of SampleOptions to this process's part of the batch."""
    import torch

    changes = {k: v[shard] for k, v in vars(options).items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    return options.replace(**changes) if changes else options


# --------------------------------------------------------------------------- sharded tensors (FSDP2)
def is_sharded(t) -> bool:
    """True for a DTensor: a parameter sharded by FSDP."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_wrapped(module) -> bool:
    """Whether FSDP2 has wrapped `module`: fully_shard turns what it wraps into an FSDPModule, and accelerate wraps
    the whole model. One isinstance, where asking every parameter whether it is sharded, at every step, cost
    ~10 ms a step on the testbed (bench/peers.py)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it under _composable
        from torch.distributed._composable.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def full_tensor(t):
    """The whole tensor of an FSDP shard (a collective: every process calls it), else t itself."""
    return t.full_tensor() if is_sharded(t) else t


def squared_distance(p, reference, cache: dict, name: str):
    """||p - p_0||^2, differentiable in p; `reference` is the whole p_0.

    For an FSDP shard: the whole parameter's value (all-reduced), with the gradient of this process's
    shard only, since FSDP adds each process's gradient into its own shard (the gradient must have the
    shard's shape). `cache` keeps p_0 split like p, keyed by `name`, so it is split once.
    """
    if not is_sharded(p):
        return ((p - reference) ** 2).sum()
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    if name not in cache:
        cache[name] = distribute_tensor(reference.to(p.device), p.device_mesh, p.placements).to_local()
    local = ((p.to_local() - cache[name]) ** 2).sum()
    total = local.detach().clone()
    dist.all_reduce(total, group=p.device_mesh.get_group())
    return total + local - local.detach()


def lora_squared_norm(A, B, scale: float):
    """||scale * B A||_F^2 of a LoRA layer, from rank x rank products only (the full delta is never formed).

    ||B A||_F^2 = sum((B^T B) * (A A^T)). For FSDP shards: the value of the whole layer, the gradient of
    this process's rows only (d/dB = 2 s^2 B (A A^T), d/dA = 2 s^2 (B^T B) A, with the rank x rank factors
    gathered without gradient), attached through a surrogate.
    """
    if not is_sharded(A):
        a, b = A.float().flatten(1), B.float().flatten(1)  # (r, in * k * k), (out, r)
        return scale**2 * ((b.T @ b) * (a @ a.T)).sum()
    import torch
    from torch.distributed.tensor import DTensor, Replicate

    s2 = scale**2
    a_loc, b_loc = A.to_local().float().flatten(1), B.to_local().float().flatten(1)
    with torch.no_grad():
        a_full, b_full = A.full_tensor().float().flatten(1), B.full_tensor().float().flatten(1)
        G, H = b_full.T @ b_full, a_full @ a_full.T
        value = s2 * (G * H).sum()
        grad_a_full = (2 * s2 * G @ a_full).view(A.shape)
        # this process's rows of dA, laid out exactly as A is sharded
        grad_a = DTensor.from_local(grad_a_full, A.device_mesh, [Replicate()] * A.device_mesh.ndim).redistribute(placements=A.placements).to_local()
        grad_b = 2 * s2 * b_loc @ H
    surrogate = (grad_a.float().flatten(1) * a_loc).sum() + (grad_b * b_loc).sum()
    return value + surrogate - surrogate.detach()


def agree_max(t):
    """The elementwise maximum of an integer tensor over all processes (a collective), so that every process
    takes the same branch; the tensor itself in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def reshard(model) -> None:
    """FSDP leaves parameters gathered after a forward without gradient (the root's always): shard them
    again, so the optimizer and the checkpoint see the shards they hold. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state keyed by parameter name (gathered from shards under FSDP; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, saved: dict) -> None:
    """Load name-keyed optimizer state into this process's shards (or an index-keyed one from before)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(i, int) for group in saved["param_groups"] for i in group["params"]):
        optimizer.load_state_dict(saved)  # a checkpoint from before name-keyed optimizer state (single process or DDP)
        return
    if not saved["state"]:  # a stateless optimizer (SGD without momentum): torch's loader cannot place an empty state
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        return
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
