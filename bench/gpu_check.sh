#!/usr/bin/env bash
# The GPU measurements docs/scaling.md asks for, in one call: about 10 minutes on one H100 / H200.
#
#   bash bench/gpu_check.sh [OUT]     # OUT: where the tables go (default: bench-gpu/)
#
# Needs an environment with rewardkit and the paper's reward plugins installed
# (pip install -e . -e plugins/rewardkit-clip -e plugins/rewardkit-hps -e plugins/rewardkit-imagereward);
# nothing is downloaded: every model is built from bench/configs with random weights.
# Writes OUT/full_size.md (SD 1.5 at 512 px; SD3-Medium, SDXL, SD3.5-Medium and FLUX.1-dev with LoRA at 1024 px;
# R0 steps in bf16), OUT/encoders.md
# (what the prompt cache saves per prompt and step) and OUT/rewards.md (the reward models alone).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
py=${PYTHON:-python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
{
  "$py" bench/full_size.py --rows sd15:512 --training lora,full --checkpointing on,off --precision bf16 --batch 1 --steps 3 --json "$out/sd15_512.json"
  "$py" bench/full_size.py --rows sd3:1024 --training lora,full --checkpointing on --precision bf16 --batch 1 --steps 2 --json "$out/sd3_1024.json"
  "$py" bench/full_size.py --rows sdxl:1024,sd35:1024,flux:1024,zimage:1024 --training lora --checkpointing on --precision bf16 --batch 1 --steps 2 --json "$out/families_1024.json"
} | tee "$out/full_size.md"
"$py" bench/full_size.py --encoders --precision bf16 --steps 5 | tee "$out/encoders.md"
"$py" bench/rewards.py --full --device cuda --size 512 --dtype bfloat16 | tee "$out/rewards.md"
echo "tables in $out/: paste them into docs/scaling.md (full_size, encoders) and docs/rewards.md (rewards)"
