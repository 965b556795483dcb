#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): MAE and DINO at ViT-B/16 224 px, bf16 + torch.compile, DDP over
# every visible GPU, kill + resume, feature extraction; images/s and MFU per method. Non-zero exit on any failure.
#   bash benchmarks/gpu_check.sh          # GPU machine, under 5 minutes, no downloads
#   bash benchmarks/gpu_check.sh --cpu    # anywhere (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
