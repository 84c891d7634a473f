"""A one-off check of the plugin against the hpsv3 package's own model, not a test (it needs a second environment).

    python crosscheck_hpsv3_package.py ours OUT            # rewardkit's environment (transformers 5)
    python crosscheck_hpsv3_package.py theirs OUT [WHEEL]  # an environment with hpsv3 1.0.0's transformers 4.45.2
                                                           # (see make_hpsv3_layout.py); WHEEL: the unpacked wheel

`ours` writes the tiny files (rewardkit_hpsv3.tiny) to OUT, the plugin's inputs for three images and prompts
(input_ids, attention_mask, pixel_values, image_grid_thw) and its (mu, log sigma) in float32 and bfloat16.
`theirs` loads the same checkpoint into hpsv3's Qwen2VLRewardModelBT (output_dim=2, reward_token='special',
rm_head_type='ranknet', load_state_dict strict=True), runs its forward on the same inputs and prints the differences:
in float32 with the rotary frequencies rounded to bfloat16 (what HPSv3's model.to(torch.bfloat16) leaves them), in
float32 with exact frequencies, and as HPSv3 runs (bfloat16, head float32).

Result (2026-12-02, CPU): float32 vs hpsv3 float32 with bf16-rounded frequencies: max 8e-8; vs exact frequencies:
3e-5; plugin bfloat16 vs hpsv3 bfloat16: 7e-4 (hpsv3 bfloat16 vs its float32: 2e-3).
"""

import json
import sys
from pathlib import Path

import torch

PROMPTS = ["a red cat on the beach", "a painting of a blue house by the sea at sunset, oil on canvas", "a small bird"]


def ours(out: str) -> None:
    from rewardkit_hpsv3 import HPSv3
    from rewardkit_hpsv3.model import preprocess
    from rewardkit_hpsv3.tiny import write_tiny_files

    folder = write_tiny_files(out)
    x = torch.rand(3, 3, 300, 420, generator=torch.Generator().manual_seed(5))
    result = {"folder": str(folder)}
    for dtype in ("float32", "bfloat16"):
        r = HPSv3(weights=str(folder / "HPSv3.safetensors"), processor=str(folder / "processor"), dtype=dtype)
        with torch.no_grad():
            result[dtype] = r.mu_and_log_sigma(x, PROMPTS)
    p = r.processor
    pixel_values, grid = preprocess(x, p.image_mean, p.image_std)
    ids, mask, _ = p.encode(PROMPTS, int(grid[0].prod()) // p.merge_size**2)
    result.update(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid, reward_id=p.reward_token_id, pad_id=p.pad_token_id)
    torch.save(result, Path(out) / "io.pt")


def theirs(out: str, wheel: str = "/tmp/dl/hpsv3w") -> None:
    sys.path.insert(0, wheel)
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT
    from safetensors.torch import load_file
    from transformers import Qwen2VLConfig

    io = torch.load(Path(out) / "io.pt")
    config = Qwen2VLConfig(**json.loads((Path(io["folder"]) / "processor" / "config.json").read_text()))
    config._attn_implementation = "sdpa"
    got = {}
    for mode in ("float32, bf16-rounded rope", "float32, exact rope", "bfloat16"):
        model = Qwen2VLRewardModelBT(config, output_dim=2, reward_token="special", special_token_ids=[io["reward_id"]], rm_head_type="ranknet", rm_head_kwargs=None)
        model.load_state_dict(load_file(str(Path(io["folder"]) / "HPSv3.safetensors")), strict=True)
        model.config.pad_token_id = io["pad_id"]  # as create_model_and_processor
        if mode == "bfloat16":  # as create_model_and_processor with bf16: True
            model.to(torch.bfloat16)
            model.rm_head.to(torch.float32)
            model.rm_head.register_forward_pre_hook(lambda mod, args: (args[0].float(),))  # its CUDA autocast, on CPU
        elif mode.endswith("bf16-rounded rope"):
            for m in model.modules():
                if hasattr(m, "inv_freq"):
                    m.inv_freq = m.inv_freq.bfloat16().float()
        with torch.no_grad():
            got[mode] = model.eval()(
                input_ids=io["input_ids"], attention_mask=io["attention_mask"], pixel_values=io["pixel_values"], image_grid_thw=io["image_grid_thw"]
            )["logits"].float()
    for mode, value in got.items():
        mine = io["bfloat16" if mode == "bfloat16" else "float32"]
        print(f"max |plugin - hpsv3| ({mode}): {(mine - value).abs().max().item():.2g}")
    print(f"max |hpsv3 bfloat16 - hpsv3 float32|: {(got['bfloat16'] - got['float32, bf16-rounded rope']).abs().max().item():.2g}")


if __name__ == "__main__":
    {"ours": ours, "theirs": theirs}[sys.argv[1]](*sys.argv[2:])
