"""The testbed's networks, all small enough to train on a CPU in minutes.

- the teacher: a real diffusers StableDiffusionPipeline (UNet2DConditionModel,
  AutoencoderKL, CLIPTextModel, a CLIPTokenizer built in memory, DDIM
  scheduler with SD 1.5's noise schedule), so the `sd` generator code
  parameterizes it exactly as it does Stable Diffusion;
- the reward classifier (`DigitCNN`, trained on split A);
- the evaluator (`DigitMLP`, a different architecture and seed, trained on
  split B), whose penultimate features also define the Frechet distance.
"""

from __future__ import annotations

from torch import nn

TOKENIZER_MAX_LENGTH = 40


def byte_characters() -> list[str]:
    """The 256 characters byte-level BPE tokenizers (GPT-2's, CLIP's, Qwen's) stand for the bytes with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """A character-level CLIP BPE tokenizer built in memory (no vocabulary download).

    Every printable byte is a token, alone and word-final ("7</w>"), with no
    merges: any prompt tokenizes, and the jointly trained text encoder learns
    what the characters mean.
    """
    from transformers import CLIPTokenizer

    chars = byte_characters()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def qwen_tokenizer(max_length: int):
    """A byte-level Qwen BPE tokenizer built in memory (Z-Image's text encoder is Qwen3): every byte a token, no merges,
    Qwen's special tokens, and a chat template of Qwen3's form (the user's turn, then the assistant's turn opened; an
    empty thought when thinking is off)."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate([*byte_characters(), *specials])}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    return tokenizer


def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=520,
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH, projection_dim=64,
    )
    return CLIPTextModel(config)


def vae():
    """16x16 images <-> 4x8x8 latents (one downsampling level, as SD's VAE has three)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=16, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )


def unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        # The prompt also enters every ResNet block through the time embedding (attention-pooled text,
        # diffusers' addition_embed_type="text"): a strong global signal for a model this small.
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def scheduler():
    """SD 1.5's training noise schedule (scaled-linear betas, 1000 steps, epsilon prediction)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


class DigitCNN(nn.Module):
    """The reward classifier: a small CNN on (B, 1, 16, 16) grayscale digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


class DigitMLP(nn.Module):
    """The evaluator: an MLP on the flattened (B, 1, 16, 16) digit; `features` feeds the Frechet distance."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 64), nn.GELU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))
