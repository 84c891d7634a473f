"""A trained generator with a ControlNet, at sampling time (the paper's Fig. 16: downstream use of a few-step generator).

A diffusers ControlNetModel made for the base model (SD 1.5's or SDXL's)
sees the noisy latents, the prompt and a control image (edges, depth, pose:
whatever the ControlNet was trained on) and returns residuals that are added
to the UNet's skip connections, exactly as StableDiffusionControlNetPipeline
and StableDiffusionXLControlNetPipeline add them. The few-step generator is
used as it was trained; nothing is retrained. Used by `rewardkit sample
--controlnet MODEL --control-image IMG`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardkit.errors import UserError


@dataclass
class Control:
    model: torch.nn.Module
    """A diffusers ControlNetModel."""
    image: torch.Tensor
    """(1 or B, 3, H, W) in [0, 1], at the generator's image size (the pipelines' control image, not normalized)."""
    scale: float = 1.0
    """The pipelines' controlnet_conditioning_scale: the residuals' weight."""

    def residuals(self, x: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, added_cond_kwargs: dict | None = None) -> dict:
        """The UNet's extra keyword arguments for latents x (B rows; under guidance [unconditional; conditional])."""
        image = self.image.to(x.device, self.model.dtype)
        image = image.expand(x.shape[0], -1, -1, -1) if len(image) == 1 else image.repeat(x.shape[0] // len(image), 1, 1, 1)
        down, mid = self.model(
            x.to(self.model.dtype), timesteps, encoder_hidden_states=embeds.to(self.model.dtype), controlnet_cond=image,
            conditioning_scale=self.scale, added_cond_kwargs=added_cond_kwargs, return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def check_matches(net, unet) -> None:
    """A ControlNet made for another base model (SD 1.5's on SDXL, or the reverse) would fail mid-sampling on a shape:
    refuse it up front, naming what differs."""
    keys = ("cross_attention_dim", "addition_embed_type", "in_channels", "block_out_channels")
    differ = [f"{k} {net.config.get(k)!r} (the UNet's: {unet.config.get(k)!r})" for k in keys
              if _plain(net.config.get(k)) != _plain(unet.config.get(k))]
    if differ:
        raise UserError(f"--controlnet was made for another base model than this generator's: {'; '.join(differ)}; "
                        "give a ControlNet trained for the generator's base model")


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def load_controlnet(model: str, dtype: torch.dtype = torch.float32):
    """A ControlNetModel from a local diffusers folder, a single .safetensors file or a hub id (cache first)."""
    from diffusers import ControlNetModel

    path = Path(model).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"--controlnet {model!r}: no such file")
        try:
            net = ControlNetModel.from_single_file(str(path), torch_dtype=dtype)
        except OSError:
            raise UserError(
                f"--controlnet {model!r}: a single-file ControlNet needs its architecture's config, which diffusers fetches "
                "from the hub (not reachable, or HF_HUB_OFFLINE=1); give the ControlNet as a diffusers folder "
                "(config.json + weights), or load the file once with network access"
            ) from None
        return net.requires_grad_(False).eval()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"--controlnet {model!r}: the folder has no config.json, so it is not a diffusers ControlNet folder")
            net = ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
        else:
            net = ControlNetModel.from_pretrained(model, torch_dtype=dtype)
    except OSError as exc:
        raise UserError(
            f"--controlnet {model!r} could not be loaded: it is neither a local folder or file nor in the Hugging Face cache, "
            f"and it could not be downloaded; give a local diffusers folder, or run `huggingface-cli download {model}` on a "
            f"machine with network. Cause: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return net.requires_grad_(False).eval()
