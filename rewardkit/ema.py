"""An exponential moving average of the trainable weights, kept in float32.

    e_0 = theta_0,    e_t = d_t e_{t-1} + (1 - d_t) theta_t,    d_t = min(decay, (1 + t) / (10 + t))

after the optimizer step of training step t (a skipped, non-finite step does not update the
average, but t counts it, so a resumed run continues the same sequence). The warm-up factor
(1 + t) / (10 + t) is the classic one (TensorFlow's ExponentialMovingAverage
with num_updates, diffusers' EMAModel without `use_ema_warmup`): early on the
average follows the weights, so it is not dominated by theta_0. Under FSDP
each process averages its own shards. Saved in every checkpoint as
generator_ema.safetensors; `rewardkit sample / export / eval --ema` use it.
"""

from __future__ import annotations

import torch

from rewardkit.distributed import full_tensor


class EMA:
    def __init__(self, named_parameters, decay: float, device: str = "accelerator"):
        self.decay, self.device = decay, device
        self.shadow = {n: self._place(p.detach().float().clone()) for n, p in named_parameters}

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu") if self.device == "cpu" else t

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, named_parameters, step: int) -> None:
        d = self.decay_at(step)
        for n, p in named_parameters:
            e = self.shadow[n]
            e.lerp_(p.detach().to(e.device, torch.float32), 1 - d)  # e + (1 - d) (p - e) = d e + (1 - d) p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors (gathered from shards under FSDP: every process must call it)."""
        return {n: full_tensor(e) for n, e in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(f"EMA weights do not match the trainable weights: {sorted(set(state) ^ set(self.shadow))[:5]}")
        for n, e in self.shadow.items():
            whole = state[n].to(torch.float32)
            if hasattr(e, "device_mesh"):  # an FSDP shard: take this process's part of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                e.copy_(distribute_tensor(whole.to(e.device_mesh.device_type), e.device_mesh, e.placements))
            else:
                e.copy_(whole)
