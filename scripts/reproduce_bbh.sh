#!/usr/bin/env bash
# Reproduce ComPEFT Table 7 / LoraHub on Big-Bench Hard: google/flan-t5-large, LoraHub's 196
# public experts (--experts FILE: their Hub ids, one per line), N=20 drawn per
# seed, 5 seeds, 27 tasks, 5 few-shot examples, budget 40; zero-shot, ICL, LoraHub, ComPEFT.
#
# First, once, where there is network (base ~3 GB, 196 experts x 18.9 MB, lukaemon/bbh):
#     lorahub-compeft download --experts FILE [--cache DIR]
# Then this script runs offline from that cache; rerun it to resume, it ends with the report.
# How long it takes on a machine: python scripts/rehearse_reproduction.py (docs/results/rehearsal.md).
#
# Usage: scripts/reproduce_bbh.sh [OUT_DIR] [reproduce options: --model, --experts, --cache,
#        --bbh-dir, --methods select,select-compeft, ...; see lorahub-compeft reproduce --help]
set -euo pipefail
OUT=${1:-results/flan-t5-large}
shift || true
exec lorahub-compeft reproduce --out "$OUT" "$@"
