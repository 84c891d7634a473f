"""Tiny random-weight HPSv3 files, offline: a processor folder and a checkpoint in the published naming.

For the tests and bench/rewards.py. The processor folder holds what the plugin reads from Qwen/Qwen2-VL-7B-Instruct
(tokenizer files, Qwen2-VL's chat template, its published preprocessor_config.json) and a tiny Qwen2-VL config.json
(2 vision blocks of width 32, 2 decoder layers of width 64); HPSv3.safetensors holds random weights under the names
of the published HPSv3.safetensors (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.*``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json and chat template (chat_template.json), as published
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}  # fmt: skip
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video'"
    " or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_tokenizer():
    """A byte-level Qwen2 BPE tokenizer built in memory (the tokenizers library's byte-level alphabet) with Qwen2-VL's special
    tokens, plus merges for the words of HPSv3's prompt and the chat template so that the ~2,600 characters of
    HPSv3's text are ~540 tokens, about what Qwen's real vocabulary gives (bytes alone would be 2,600 tokens and
    make the tiny language model five times slower). Any text still tokenizes (every byte is a token)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    from rewardkit_hpsv3.model import hpsv3_text

    chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE stands for bytes with
    vocab = {c: i for i, c in enumerate(chars)}
    splitter = Qwen2Tokenizer(vocab=dict(vocab), merges=[]).backend_tokenizer.pre_tokenizer
    merges = []
    for piece, _ in splitter.pre_tokenize_str(hpsv3_text("") + "system\nYou are a helpful assistant.\nuser\nassistant\n"):
        for j in range(2, len(piece) + 1):
            if piece[:j] not in vocab:
                vocab[piece[:j]] = len(vocab)
                merges.append((piece[: j - 1], piece[j - 1]))
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def tiny_config(tok) -> dict:
    """A config.json in Qwen2-VL-7B-Instruct's (flat) format, tiny; vocabulary = tokenizer + <|Reward|>."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": len(tok) + 1, "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"], "vision_token_id": ids["<|vision_pad|>"],
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 64, "in_chans": 3,
            "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
    }  # fmt: skip


def ours_key_to_checkpoint(name: str) -> str:
    """The published checkpoint's name of `HPSv3Model` tensor `name` (the inverse of checkpoint_key_to_ours)."""
    for pattern, replacement in ((r"^model\.visual\.", "visual."), (r"^model\.language_model\.", "model."), (r"^rm_head\.", "rm_head.")):
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    raise KeyError(name)


def write_tiny_files(folder: str | Path, seed: int = 0) -> Path:
    """Write `folder`/processor/ and `folder`/HPSv3.safetensors (random weights, float32); returns `folder`."""
    from safetensors.torch import save_file

    from rewardkit_hpsv3.model import HPSv3Model, architecture_config

    folder = Path(folder)
    processor = folder / "processor"
    tok = tiny_tokenizer()
    tok.save_pretrained(processor)
    cfg = tiny_config(tok)
    (processor / "config.json").write_text(json.dumps(cfg))
    (processor / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    torch.manual_seed(seed)
    state = HPSv3Model(architecture_config(cfg, cfg["vocab_size"])).state_dict()
    for v in state.values():  # norms start at 1 / biases at 0: randomize so that a wrong mapping shows
        v.add_(0.02 * torch.randn_like(v))
    published = {ours_key_to_checkpoint(k): v.contiguous() for k, v in state.items()}
    published["lm_head.weight"] = torch.randn(cfg["vocab_size"], cfg["hidden_size"])  # in the published file, unused
    save_file(published, str(folder / "HPSv3.safetensors"))
    return folder
