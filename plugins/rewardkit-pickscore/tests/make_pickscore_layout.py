"""Writes pickscore_v1_checkpoint_layout.json: the tensor names and shapes of PickScore_v1's checkpoint.

    python plugins/rewardkit-pickscore/tests/make_pickscore_layout.py

The published checkpoint (hub repo yuvalkirstain/PickScore_v1, model.safetensors /
pytorch_model.bin) could not be downloaded here, so its layout is derived: the
architecture values of its config.json (laion CLIP-ViT-H-14's sizes, checked against
the published laion config.json / open_clip_config.json), built as transformers'
CLIPModel on the meta device, plus the two `*.embeddings.position_ids` buffers that
transformers < 4.31 (PickScore was trained with 4.27.3) saved with every CLIPModel.
The values are written out below, not imported from the plugin, so that a change there
does not change the reference. Run it only to regenerate the file on purpose.
"""

import json
import re
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

CONFIG = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
    },
    "vision_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
        "patch_size": 14, "image_size": 224, "hidden_act": "gelu", "layer_norm_eps": 1e-05,
    },
}  # fmt: skip


def main() -> None:
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(**CONFIG))
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    n_patches = (CONFIG["vision_config"]["image_size"] // CONFIG["vision_config"]["patch_size"]) ** 2
    tensors["text_model.embeddings.position_ids"] = [1, CONFIG["text_config"]["max_position_embeddings"]]
    tensors["vision_model.embeddings.position_ids"] = [1, n_patches + 1]
    out = {
        "about": (
            "Tensor names and shapes of yuvalkirstain/PickScore_v1 (transformers CLIPModel, CLIP-H). Derived, not "
            "dumped from the file: transformers' CLIPModel built on the meta device from the published config values "
            "below, plus the position_ids buffers that transformers < 4.31 saved. Made by make_pickscore_layout.py."
        ),
        "config": CONFIG,
        "tensors": tensors,
    }
    path = Path(__file__).with_name("pickscore_v1_checkpoint_layout.json")
    text = json.dumps(out, indent=1)
    text = re.sub(r"\[\s*([-0-9,\s]*?)\s*\]", lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]" if m.group(1) else "[]", text)
    path.write_text(text + "\n")
    print(f"{path}: {len(tensors)} tensors, {sum(torch.Size(s).numel() for s in tensors.values()):,} values")


if __name__ == "__main__":
    main()
