#!/usr/bin/env bash
# Reproduce ComPEFT Table 7 / LoraHub on Big-Bench Hard: google/flan-t5-large, the 196 public
# LoraHub experts, N=20 sampled per seed, 5 seeds, 27 tasks, 5 few-shot examples, budget 40.
#
# Needs: Hugging Face Hub access (flan-t5-large, ~3 GB; 196 experts x 18.9 MB; lukaemon/bbh) and
# a CUDA GPU (16 GB is plenty). 27 tasks x 5 seeds x 2 composition methods = 270 compositions of
# 40 forward passes each, plus generation over ~6,500 examples per method and seed. Timing on a
# GPU has not been measured in this repository yet; on a 2-core CPU it is days, not hours.
#
# Usage: scripts/reproduce_bbh.sh [OUT_DIR] [EXPERTS_FILE]
set -euo pipefail
OUT=${1:-results/flan-t5-large}
EXPERTS=${2:-../shared/data/lorahub_flan_t5_large_modules.txt}
lorahub-compeft bbh --model google/flan-t5-large --experts-file "$EXPERTS" \
    --methods zeroshot,icl,lorahub,compeft --seeds 1-5 --n-experts 20 \
    --density 0.1 --alpha 1 --budget 40 --out "$OUT"
lorahub-compeft report "$OUT"
