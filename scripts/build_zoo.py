#!/usr/bin/env python
"""Build the project's zoo: a word-level tokenizer, a tiny T5 instruction-tuned on the
upstream tasks, one LoRA expert per upstream task, an exact-match report, and then the
shipped artifacts (base, fp16 dense experts, the ComPEFT library calibrated on validation
data, calibration.json, manifest.json with every file's sha256).

    python scripts/build_zoo.py --out zoo_build            # full build, ships into the package
    python scripts/build_zoo.py --out zoo_build --ship-only  # recalibrate and ship an old build
    python scripts/build_zoo.py --out /tmp/zoo --quick     # smoke build in seconds

Layout of --out: base/ (config.json, model.safetensors, tokenizer files), experts/<task>/
(standard PEFT LoRA dirs whose base_model_name_or_path is base/), report.json (spec, timings,
EM of the base on every task and of each expert on its own task).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from zoo_build.build import BaseSpec, BuildSpec, ExpertSpec, build
from zoo_build.ship import ARTIFACTS, calibration_table, ship

DEFAULT_BBH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh"


def quick_spec(seed: int, bbh_dir: str | None) -> BuildSpec:
    """A build small enough for tests: shapes and files as in the real one, skills not."""
    return BuildSpec(
        seed=seed, bbh_dir=bbh_dir, eval_examples=8,
        base=BaseSpec(d_model=32, d_ff=64, num_layers=1, num_heads=2, steps=10,
                      batch_size=16, warmup=2, examples_per_task=40),
        expert=ExpertSpec(r=2, alpha=4, steps=3, batch_size=8, examples=32),
        upstream=("bool_value", "list_name_food", "pair_sum"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke build")
    p.add_argument("--bbh-dir", default=None,
                   help="BBH data (tasks/, cot-prompts/) whose vocabulary the tokenizer "
                        "should cover; default: ../shared/data/bbh beside the repository, if present")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ship-to", default=None,
                   help=f"where the shipped artifacts go (default {ARTIFACTS}; with --quick, "
                        "OUT/artifacts)")
    p.add_argument("--ship-only", action="store_true",
                   help="skip training: calibrate, compress and ship the build already in --out")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    bbh = args.bbh_dir or (str(DEFAULT_BBH) if DEFAULT_BBH.exists() else None)
    spec = quick_spec(args.seed, bbh) if args.quick else BuildSpec(seed=args.seed, bbh_dir=bbh)
    start = time.time()
    out = Path(args.out)
    if not args.ship_only:
        build(out, spec)
    report = json.loads((out / "report.json").read_text())
    for task, row in report["em"].items():
        cells = "  ".join(f"{k}={v:.2f}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['split']:8s} {task:26s} {cells}")
    ship_to = Path(args.ship_to) if args.ship_to else (out / "artifacts" if args.quick else ARTIFACTS)
    grid = {"densities": (0.1, 0.3), "alphas": (1, 2), "min_ratio": 1.0, "n_val": 8} if args.quick else {}
    manifest = ship(out, ship_to, seed=args.seed, build_info=report["timing"], **grid)
    print(calibration_table(json.loads((ship_to / "calibration.json").read_text())))
    print(f"shipped {len(manifest['files'])} files, {manifest['total_bytes'] / 1e6:.2f} MB, to "
          f"{ship_to} (density {manifest['density']}, alpha {manifest['alpha']})")
    print(f"this run: {(time.time() - start) / 60:.1f} min (training {report['timing']['total_s'] / 60:.1f} "
          f"min, shipping {manifest['ship_s'] / 60:.1f} min)")
    return {"base": out / "base", "experts": {p.name: p for p in sorted((out / "experts").iterdir())},
            "report": out / "report.json", "artifacts": ship_to, "manifest": manifest}


if __name__ == "__main__":
    main()
