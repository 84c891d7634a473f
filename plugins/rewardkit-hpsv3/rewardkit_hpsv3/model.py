"""HPSv3 (MizzenAI, ICCV 2025) re-expressed on transformers 5's Qwen2-VL classes.

HPSv3 is Qwen2-VL-7B-Instruct fine-tuned as a preference model (the `hpsv3` 1.0.0 package:
hpsv3/model/qwen2vl_trainer.py `Qwen2VLRewardModelBT`, hpsv3/train.py `create_model_and_processor`,
hpsv3/config/HPSv3_7B.yaml). What this module reproduces, read off that code:

- the prompt: a user turn holding the image, then HPSv3's instruction with the text prompt filled in, then the query
  ending in the added special token ``<|Reward|>`` (`use_special_tokens: true`); rendered with the processor's chat
  template (``add_generation_prompt=True``), padded on the right (``padding_side="right"``);
- the image: resized to HPSv3's fixed budget (``min_pixels = max_pixels = 256 * 28 * 28``), Qwen2-VL's patches;
- the network: Qwen2-VL's vision tower and language model. HPSv3 overrides the forward of
  Qwen2VLForConditionalGeneration: it embeds the tokens, scatters the vision tower's merged features into the
  ``<|image_pad|>`` positions and calls the *text* model with ``position_ids=None``, so the language model runs with
  plain sequential positions 0..L-1 on all three M-RoPE axes (transformers 4.45.2's Qwen2VLModel.forward), never the
  3-D M-RoPE positions of Qwen2VLForConditionalGeneration.get_rope_index; this module does the same;
- the head (`rm_head_type: ranknet`, `rm_head_kwargs` unset): Linear(3584, 1024) ReLU Dropout(0.05) Linear(1024, 16)
  ReLU Linear(16, 2), run in float32 on the final-norm hidden state at the ``<|Reward|>`` token
  (`reward_token: special`); its two outputs are (mu, log sigma) of the uncertainty-aware loss
  (`loss_type: uncertainty`: sigma = exp(output 1)); the score is mu (hpsv3/inference.py: "we select miu");
- precision: HPSv3 casts the whole model with ``model.to(torch.bfloat16)`` (`bf16: True`), buffers included, so it was
  trained and is run with the rotary inverse frequencies rounded to bfloat16; `rope_frequencies_as_hpsv3` keeps
  that rounding (in float32 buffers) whatever dtype this model computes in.

The checkpoint (hub repo MizzenAI/HPSv3, HPSv3.safetensors) is the state dict of transformers 4.45.2's
Qwen2VLForConditionalGeneration subclass: ``visual.*`` (vision tower), ``model.*`` (language model), ``lm_head.weight``
(unused here: the reward never reads next-token logits) and ``rm_head.*``. transformers 5 moved the towers under
``model.visual`` / ``model.language_model``; `checkpoint_key_to_ours` renames every tensor.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F

PIXELS = 256 * 28 * 28
"""HPSv3's image budget: min_pixels = max_pixels = 200,704 (about 448 x 448, 256 merged visual tokens)."""
REWARD_TOKEN = "<|Reward|>"
FULL_VOCAB = 151658
"""Rows of HPSv3's token embeddings: Qwen2-VL-7B-Instruct's tokenizer (151,643 BPE + 14 added tokens) + <|Reward|>."""
# Qwen/Qwen2-VL-7B-Instruct's config.json (published values): the full-size architecture, for counting parameters
# on the meta device and for benchmarks with random weights; loading reads the processor folder's config.json.
FULL_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}  # fmt: skip

HEAD_WIDTHS = (1024, 16)
OUTPUTS = 2  # (mu, log sigma)

# HPSv3's prompt, verbatim from hpsv3 1.0.0 (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and
# prompt_with_special_token); the tests check its SHA-256 against the package's.
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)
REWARD_QUERY = '\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n'


def hpsv3_text(prompt: str) -> str:
    """The text part of HPSv3's user turn for `prompt` (INSTRUCTION.format(text_prompt=...) + the reward query)."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_QUERY


def hpsv3_messages(prompt: str) -> list[dict]:
    """HPSv3's chat for one image and prompt: one user turn, the image first, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_text(prompt)}]}]


# --- preprocessing: Qwen2-VL's image processor at HPSv3's fixed budget, on float tensors ---------------------------


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> tuple[int, int]:
    """The (height, width) HPSv3 resizes an image to: both multiples of `factor` (patch 14 x merge 2), aspect ratio
    kept as far as possible, pixel count within [min_pixels, max_pixels] (qwen_vl_utils' smart_resize, which HPSv3
    runs in hpsv3/dataset/utils.py fetch_image; Qwen2-VL's image processor then keeps that size)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"HPSv3 needs an aspect ratio below 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize(images: torch.Tensor, patch_size: int = 14, merge_size: int = 2) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] resized to HPSv3's size: bicubic with antialiasing (PIL's filter, a = -0.5,
    support widened when downsampling), skipped when the images already have that size."""
    size = smart_resize(*images.shape[-2:], factor=patch_size * merge_size)
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def patchify(x: torch.Tensor, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images (B, C, H, W) -> Qwen2-VL's `pixel_values` (B * gh * gw, C * T * p * p) and `image_grid_thw`
    (B, 3) = [1, gh, gw] each.

    Each image is one frame repeated T = temporal_patch_size times (an image is a still video); patches are listed
    merge-block by merge-block (the merge_size x merge_size patches the vision tower merges into one token are
    consecutive), each patch flattened as (C, T, p, p)."""
    b, c, h, w = x.shape
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    if gh * p != h or gw * p != w or gh % m or gw % m:
        raise ValueError(f"image size {h}x{w} is not a multiple of {patch_size * merge_size}")
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (b, gh/m, gw/m, m, m, c, p, p)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, p, p)
    pixel_values = x.reshape(b * gh * gw, c * temporal_patch_size * p * p)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
    return pixel_values, grid


def preprocess(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] -> (pixel_values, image_grid_thw), differentiably: HPSv3's resize, then Qwen2-VL's
    rescale (already done: the images are in [0, 1]), normalize with its mean/std, patchify."""
    x = resize(images, patch_size, merge_size)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return patchify((x - mean_t) / std_t, patch_size, merge_size, temporal_patch_size)


# --- checkpoint names --------------------------------------------------------------------------------------------

IGNORED = re.compile(r"^lm_head\.weight$")
_RENAMES = [
    (r"^visual\.", "model.visual."),
    (r"^model\.", "model.language_model."),
    (r"^rm_head\.(0|3|5)\.(weight|bias)$", r"rm_head.\1.\2"),
]


def checkpoint_key_to_ours(key: str) -> str | None:
    """The name in `HPSv3Model` of checkpoint tensor `key`; None for `lm_head.weight`, which the reward never uses.

    Raises KeyError for a name this mapping does not know."""
    if IGNORED.search(key):
        return None
    for pattern, replacement in _RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    raise KeyError(key)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {new: v for k, v in state.items() if (new := checkpoint_key_to_ours(k)) is not None}


def architecture_config(config: dict, vocab_size: int):
    """transformers' Qwen2VLConfig from a Qwen2-VL config.json (the processor/base repo's), with the vocabulary size of
    the checkpoint (HPSv3 resized the embeddings to its tokenizer plus <|Reward|>: 151,658 rows, not 152,064)."""
    from transformers import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_dict(dict(config))
    cfg.text_config.vocab_size = vocab_size
    cfg.text_config.use_cache = False
    return cfg


class HPSv3Model(torch.nn.Module):
    """Qwen2VLModel (vision tower + language model, no LM head) + HPSv3's reward head; returns (B, 2) = (mu, log sigma)."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2VLModel

        self.model = Qwen2VLModel(config)
        hidden = config.text_config.hidden_size
        self.rm_head = torch.nn.Sequential(
            torch.nn.Linear(hidden, HEAD_WIDTHS[0]), torch.nn.ReLU(), torch.nn.Dropout(0.05),
            torch.nn.Linear(HEAD_WIDTHS[0], HEAD_WIDTHS[1]), torch.nn.ReLU(),
            torch.nn.Linear(HEAD_WIDTHS[1], OUTPUTS),
        )  # fmt: skip
        self.image_token_id = config.image_token_id
        self.checkpointing = False
        _linear_patch_embedding(self.model.visual.patch_embed)
        for layer in [*self.model.visual.blocks, *self.model.language_model.layers]:
            _checkpoint_when_asked(layer, self)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.patch_embed.proj.weight.dtype

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reward_index: torch.Tensor,
    ) -> torch.Tensor:
        """(mu, log sigma) per sequence, read at position `reward_index` of each row of `input_ids` (right-padded)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        image_embeds = self.model.visual(pixel_values.to(self.dtype), grid_thw=image_grid_thw).pooler_output
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)
        if image_mask.sum() * embeds.shape[-1] != image_embeds.numel():
            raise ValueError(f"{int(image_mask.sum())} image tokens for {image_embeds.shape[0]} image features")
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        b, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, b, length)  # as HPSv3
        hidden = self.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        features = hidden[torch.arange(b, device=hidden.device), reward_index].float()
        with torch.autocast(features.device.type, enabled=False):  # the head stays float32, autocast or not
            return self.rm_head(features)


def load_checkpoint(model: torch.nn.Module, converted: dict[str, torch.Tensor], what: str) -> None:
    """Put the converted checkpoint tensors into `model` (assign: no copy, works for a model on the meta device);
    a UserError names what is missing, left over or of the wrong shape."""
    from rewardkit.errors import UserError

    try:
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"{what}: the checkpoint does not fit the architecture: {str(exc)[:600]}") from None
    if missing or unexpected:
        raise UserError(f"{what}: the checkpoint does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")


def rope_frequencies_as_hpsv3(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The rotary embeddings' inverse frequencies (buffers `inv_freq`, `original_inv_freq`) rounded to bfloat16 and
    held in float32: HPSv3 casts its whole model with ``model.to(torch.bfloat16)``, buffers included, so it was
    trained and is run with these values. Take them from a float32-built model."""
    return {
        name: buf.to(torch.bfloat16).to(torch.float32)
        for name, buf in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("inv_freq", "original_inv_freq")
    }


def set_buffers(model: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, value.clone())


def _linear_patch_embedding(patch_embed: torch.nn.Module) -> None:
    """Run Qwen2-VL's patch embedding (a Conv3d whose kernel and stride are the whole (T, p, p) patch, no bias) as the
    matrix product it is: the same function, without conv3d's slow backward on CPU."""
    proj = patch_embed.proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        weight = proj.weight
        return F.linear(hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1))

    patch_embed.forward = forward


def _checkpoint_when_asked(layer: torch.nn.Module, owner: HPSv3Model) -> None:
    """Recompute `layer` in backward when owner.checkpointing is set (also in eval mode, where transformers' own
    gradient checkpointing does nothing)."""
    from torch.utils.checkpoint import checkpoint

    plain = layer.forward

    def forward(*args, **kwargs):
        if owner.checkpointing and torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    layer.forward = forward
