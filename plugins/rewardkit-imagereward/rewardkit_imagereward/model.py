"""ImageReward v1.0 re-expressed on transformers' BLIP classes.

The published checkpoint (hub repo THUDM/ImageReward, file ImageReward.pt) is
the state dict of ImageReward's own BLIP code: a ViT-L/16 image encoder
(``blip.visual_encoder.*``), a BERT-base text encoder with cross-attention to
the image in every layer (``blip.text_encoder.*``, vocabulary 30524), two
projections ImageReward does not use for scoring, and a 5-layer MLP head
(``mlp.layers.*``). transformers' BlipVisionModel and BlipTextModel compute
the same functions; `checkpoint_key_to_ours` renames every tensor.

Score: reward = (MLP(text_encoder(prompt | image)[CLS]) - MEAN) / STD.
"""

from __future__ import annotations

import re

import torch

from rewardkit.rewards.heads import LinearStackHead

MEAN = 0.16717362830052426
STD = 1.0333394966054072
HEAD_DIM = 64  # BLIP's ViT-L (1024 / 16 heads) and BERT-base (768 / 12 heads) both use 64-wide heads
MAX_PROMPT_TOKENS = 35  # ImageReward tokenizes with padding='max_length', truncation, max_length=35
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# checkpoint tensors ImageReward holds but never uses for the reward
IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

_VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.fc([12])\.", r"vision.encoder.layers.\1.mlp.fc\2."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    # the text encoder's names already match BlipTextModel's (both descend from BERT)
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.layers\.", "mlp.layers."),
]


def checkpoint_key_to_ours(key: str) -> str | None:
    """The name in `ImageRewardModel` of checkpoint tensor `key`; None for tensors the reward ignores.

    Raises KeyError for a name this mapping does not know.
    """
    if IGNORED.search(key):
        return None
    for pattern, replacement in _VISION_RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    raise KeyError(key)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {new: v for k, v in state.items() if (new := checkpoint_key_to_ours(k)) is not None}


def full_size_shapes() -> dict:
    """The sizes of ImageReward v1.0 (BLIP ViT-L image encoder + BERT-base med text encoder)."""
    return dict(
        vision_hidden=1024, vision_layers=24, vision_intermediate=4096, image_size=224, patch_size=16,
        text_hidden=768, text_layers=12, text_intermediate=3072, vocab_size=30524, max_positions=512,
    )  # fmt: skip


def shapes_from_checkpoint(state: dict) -> dict:
    """Architecture sizes read off a checkpoint in ImageReward's layout (heads: width / 64)."""

    def count(prefix):
        depth = len(prefix.rstrip(".").split("."))
        return len({k.split(".")[depth] for k in state if k.startswith(prefix)})

    vision_hidden = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    n_pos = state["blip.visual_encoder.pos_embed"].shape[1] - 1
    return dict(
        vision_hidden=vision_hidden,
        vision_layers=count("blip.visual_encoder.blocks."),
        vision_intermediate=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=int(round(n_pos**0.5)) * patch,
        patch_size=patch,
        text_hidden=state["blip.text_encoder.embeddings.word_embeddings.weight"].shape[1],
        text_layers=count("blip.text_encoder.encoder.layer."),
        text_intermediate=state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0],
        vocab_size=state["blip.text_encoder.embeddings.word_embeddings.weight"].shape[0],
        max_positions=state["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0],
    )


class ImageRewardModel(torch.nn.Module):
    """BlipVisionModel + BlipTextModel (cross-attention, no pooler) + the reward MLP."""

    def __init__(self, s: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        vision = BlipVisionConfig(
            hidden_size=s["vision_hidden"], intermediate_size=s["vision_intermediate"], num_hidden_layers=s["vision_layers"],
            num_attention_heads=s["vision_hidden"] // HEAD_DIM, image_size=s["image_size"], patch_size=s["patch_size"],
            layer_norm_eps=1e-6, hidden_act="gelu",
        )  # fmt: skip
        text = BlipTextConfig(
            vocab_size=s["vocab_size"], hidden_size=s["text_hidden"], encoder_hidden_size=s["vision_hidden"],
            intermediate_size=s["text_intermediate"], num_hidden_layers=s["text_layers"],
            num_attention_heads=s["text_hidden"] // HEAD_DIM, max_position_embeddings=s["max_positions"],
            layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True,  # is_decoder: build the cross-attention layers
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        )  # fmt: skip
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = LinearStackHead(s["text_hidden"])  # ImageReward's MLP, as published
        self.image_size = s["image_size"]
        self.checkpointing = False
        for layer in [*self.vision.encoder.layers, *self.text.encoder.layer]:
            _checkpoint_when_asked(layer, self)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        features = out.last_hidden_state[:, 0, :].float()
        with torch.autocast(features.device.type, enabled=False):  # the head stays float32 (see load_model), autocast or not
            rewards = self.mlp(features).squeeze(-1)
        return (rewards - MEAN) / STD


def _checkpoint_when_asked(layer: torch.nn.Module, owner: ImageRewardModel) -> None:
    """Recompute `layer` in backward when owner.checkpointing is set (also in eval mode,
    where transformers' own gradient checkpointing does nothing)."""
    from torch.utils.checkpoint import checkpoint

    plain = layer.forward

    def forward(*args, **kwargs):
        if owner.checkpointing and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    layer.forward = forward
