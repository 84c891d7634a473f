"""Writes hpsv3_checkpoint_layout.json: the tensor names and shapes of HPSv3.safetensors (hub repo MizzenAI/HPSv3).

Not a test. It runs in a side environment holding the `hpsv3` 1.0.0 package and the transformers it pins
(4.45.2), e.g. a venv made with `python -m venv` whose site-packages also see torch, plus
`pip install transformers==4.45.2 trl==0.11.4 "huggingface_hub<1.0" "datasets<4" omegaconf fire matplotlib pandas`:

    python make_hpsv3_layout.py [path/to/unpacked/hpsv3/wheel]

HPSv3's inference (hpsv3/inference.py) builds its model with hpsv3.train.create_model_and_processor and loads the
checkpoint with load_state_dict(strict=True), so the checkpoint holds exactly that model's state dict. This script
builds the same model on the meta device (no weights, no download) from the published sizes:
- Qwen2VLRewardModelBT(config, output_dim=2, reward_token="special", special_token_ids=[<|Reward|>],
  rm_head_type="ranknet", rm_head_kwargs=None), as hpsv3/config/HPSv3_7B.yaml asks;
- config: Qwen/Qwen2-VL-7B-Instruct's config.json (values below);
- resize_token_embeddings(len(tokenizer)) after adding <|Reward|>: Qwen2-VL-7B-Instruct's tokenizer has
  151,643 BPE tokens + 14 added tokens (ids 151643-151656, its added_tokens.json), so <|Reward|> is 151657 and
  the embeddings (and lm_head) shrink from 152,064 rows to 151,658.
"""

import json
import sys
from pathlib import Path

import torch

QWEN2_VL_7B_INSTRUCT_CONFIG = {
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
TOKENIZER_LENGTH_WITH_REWARD_TOKEN = 151658


def main(wheel: str = "/tmp/dl/hpsv3w") -> None:
    sys.path.insert(0, wheel)
    import transformers
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
    from transformers import Qwen2VLConfig

    assert transformers.__version__ == "4.45.2", transformers.__version__
    config = Qwen2VLConfig(**QWEN2_VL_7B_INSTRUCT_CONFIG)
    with torch.device("meta"):
        model = Qwen2VLRewardModelBT(
            config, output_dim=2, reward_token="special", special_token_ids=[TOKENIZER_LENGTH_WITH_REWARD_TOKEN - 1],
            rm_head_type="ranknet", rm_head_kwargs=None,
        )  # fmt: skip
        model.resize_token_embeddings(TOKENIZER_LENGTH_WITH_REWARD_TOKEN)
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    out = Path(__file__).with_name("hpsv3_checkpoint_layout.json")
    out.write_text(json.dumps(layout, indent=1) + "\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"{len(layout)} tensors, {n:,} parameters -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
