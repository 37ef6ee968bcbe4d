"""From a zoo build to the artifacts the package ships: the base, the dense experts in fp16,
the ComPEFT library at a (density, alpha) chosen on validation data, and a manifest.

The calibration sweeps the ComPEFT paper's grid on every expert, scoring each compressed
expert by exact match on its own task's validation examples (a seed range no evaluation
uses) asked without the instruction: the base answers most upstream tasks from the
instruction alone, so only instruction-less prompts measure what the expert itself carries,
which is what composition needs. Besides ComPEFT with a global top-k and scale it scores a
per-tensor top-k and scale, and the ablations STC (the kept values' mean magnitude instead
of alpha*sigma) and plain pruning (kept values unchanged). The chosen setting is the ComPEFT
cell (global or per tensor) with the best mean validation EM among those whose files are at
least `min_ratio` times smaller than fp16.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from transformers import AutoTokenizer

from lorahub_compeft.io.adapters import (CONFIG_NAME, WEIGHTS_NAME, Adapter, load_adapter,
                                         save_adapter)
from lorahub_compeft.codecs.compeft import (PAPER_ALPHAS, PAPER_DENSITIES, prune, sparsify,
                                            sparsify_rescaled)
from lorahub_compeft.config import CompeftOptions
from lorahub_compeft.store.expert import compress
from lorahub_compeft.io.files import atomic_dir, atomic_write_text
from lorahub_compeft.store.library import ExpertLibrary
from lorahub_compeft.zoo.artifacts import ARTIFACTS, BASE_NAME, MANIFEST, manifest_files
from zoo_build.build import answer_accuracy, load_base
from lorahub_compeft.zoo.tasks import generate

log = logging.getLogger(__name__)

VAL_SEED = 3_000        # validation examples for calibration; the demo never draws from it


def write_dense_fp16(src: Path, dst: Path) -> Path:
    """A PEFT dir as shipped: fp16 tensors, the base named by its shipped path, and
    target_modules sorted (peft writes a set, in an order that changes from run to run)."""
    adapter = load_adapter(src)
    config = dict(adapter.config, base_model_name_or_path=BASE_NAME,
                  target_modules=sorted(adapter.config["target_modules"]))
    return save_adapter(dst, {k: v.half() for k, v in adapter.tensors.items()}, config)


def shipped_adapter(dense_dir: Path) -> Adapter:
    """A shipped dense expert, its source named relative to the zoo (not the staging folder's
    random path), so that the compressed files are the same on every build."""
    adapter = load_adapter(dense_dir)
    adapter.source = {"path": f"dense/{dense_dir.name}"}
    return adapter


# ---------------------------------------------------------------------------- calibration
def _variants(tau: dict[str, torch.Tensor], densities, alphas):
    """(method, density, alpha, compressed tau) for every cell of the sweep."""
    for k in densities:
        for per_tensor, method in ((False, "compeft"), (True, "compeft_per_tensor")):
            base = sparsify(tau, k, 1.0, per_tensor)
            for a in alphas:
                yield method, k, a, sparsify_rescaled(base, tau, a, per_tensor).to_tensors()
        yield "stc", k, None, sparsify(tau, k, 1.0, magnitude="stc").to_tensors()
        yield "prune", k, None, prune(tau, k)


def calibrate_experts(base_dir: Path, dense_dirs: dict[str, Path], n_val: int, seed: int,
                      densities=PAPER_DENSITIES, alphas=PAPER_ALPHAS) -> list[dict]:
    """One row per (expert, method, density, alpha): validation EM of that compressed expert,
    plus a "dense" row per expert."""
    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = []
    for task, path in dense_dirs.items():
        start = time.time()
        model = PeftModel.from_pretrained(load_base(base_dir), path).eval()
        tau = {k: v.float() for k, v in load_adapter(path).tensors.items()}  # LoRA init is 0
        val = generate(task, n_val, seed=VAL_SEED + seed, instruction="")
        dense_em = 100 * answer_accuracy(model, tok, val)
        rows.append({"expert": task, "method": "dense", "density": 1.0, "alpha": None,
                     "em": dense_em})
        for method, k, a, tensors in _variants(tau, densities, alphas):
            result = set_peft_model_state_dict(model, tensors)
            if result.unexpected_keys:
                raise RuntimeError(f"{path}: keys the model lacks: {result.unexpected_keys[:3]}")
            rows.append({"expert": task, "method": method, "density": k, "alpha": a,
                         "em": 100 * answer_accuracy(model, tok, val)})
        log.info("calibrated %s in %.1fs (dense EM %.1f)", task, time.time() - start, dense_em)
    return rows


def summarize(rows: list[dict]) -> dict[tuple, float]:
    """Mean EM over experts per (method, density, alpha)."""
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["density"], r["alpha"]), []).append(r["em"])
    return {key: statistics.fmean(v) for key, v in cells.items()}


def size_ratios(dense_dirs: dict[str, Path], densities, tmp: Path) -> dict[float, float]:
    """Mean fp16 file bytes / compressed file bytes per density (files as written)."""
    ratios = {}
    for k in densities:
        r = []
        for task, path in dense_dirs.items():
            setting = CompeftOptions(density=k, alpha=1.0, per_tensor=False)
            out = compress(shipped_adapter(path), setting, name=task).save(
                tmp / f"{task}-{k}.safetensors", force=True)
            r.append((path / WEIGHTS_NAME).stat().st_size / Path(out).stat().st_size)
        ratios[k] = statistics.fmean(r)
    return ratios


def choose(summary: dict[tuple, float], ratios: dict[float, float], min_ratio: float
           ) -> tuple[str, float, float]:
    """Best mean validation EM over ComPEFT cells small enough; ties: smaller k, then alpha,
    then the global selection."""
    cells = [(em, -k, -a, m == "compeft", m, k, a) for (m, k, a), em in summary.items()
             if m in ("compeft", "compeft_per_tensor") and ratios[k] >= min_ratio]
    if not cells:
        raise ValueError(f"no density reaches {min_ratio}x smaller than fp16; ratios {ratios}")
    *_, m, k, a = max(cells)
    return m, k, a


# ---------------------------------------------------------------------------- ship
def ship(build_dir: Path, out: Path = ARTIFACTS, seed: int = 0, n_val: int = 64,
         min_ratio: float = 8.0, densities=PAPER_DENSITIES, alphas=PAPER_ALPHAS,
         build_info: dict | None = None) -> dict:
    """Write the artifacts into `out` (replaced whole, atomically) and return the manifest."""
    build_dir, out = Path(build_dir), Path(out)
    start = time.time()
    with atomic_dir(out, force=True, owned=("base", "dense", "experts", "calibration.json",
                                            MANIFEST)) as staging:
        shutil.copytree(build_dir / "base", staging / "base", dirs_exist_ok=True)
        dense = {p.name: write_dense_fp16(p, staging / "dense" / p.name)
                 for p in sorted((build_dir / "experts").iterdir()) if (p / CONFIG_NAME).exists()}
        rows = calibrate_experts(staging / "base", dense, n_val, seed, densities, alphas)
        summary = summarize(rows)
        with tempfile.TemporaryDirectory() as tmp:
            ratios = size_ratios(dense, densities, Path(tmp))
        method, k, a = choose(summary, ratios, min_ratio)
        per_tensor = method == "compeft_per_tensor"
        log.info("chose %s density %s alpha %s (mean validation EM %.1f)", method, k, a,
                 summary[(method, k, a)])
        library = ExpertLibrary(staging / "experts")
        for task, path in dense.items():
            library.add(shipped_adapter(path),
                        CompeftOptions(density=k, alpha=a, per_tensor=per_tensor), name=task)
        calibration = {"method": method, "density": k, "alpha": a, "min_ratio": min_ratio,
                       "n_val": n_val, "instruction": "",
                       "val_seed": VAL_SEED + seed, "size_ratio_fp16": ratios,
                       "mean_em": [{"method": m, "density": d, "alpha": al, "em": em}
                                   for (m, d, al), em in summary.items()],
                       "rows": rows}
        atomic_write_text(staging / "calibration.json", json.dumps(calibration, indent=1) + "\n")
        manifest = {"format": "lorahub-compeft-zoo", "version": 1, "seed": seed,
                    "selection": "per_tensor" if per_tensor else "global",
                    "density": k, "alpha": a, "build": build_info or {},
                    "ship_s": time.time() - start, "files": manifest_files(staging)}
        manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def calibration_table(calibration: dict) -> str:
    """The density/alpha sweep as Markdown, as in ComPEFT's Figures 5-6: mean validation EM of
    the compressed experts per k (rows) and alpha (columns), global and per tensor, with STC,
    pruning, the dense experts and the size ratio to fp16."""
    em = {(c["method"], c["density"], c["alpha"]): c["em"] for c in calibration["mean_em"]}
    ks = sorted({k for m, k, _ in em if m == "compeft"})
    alphas = sorted({a for m, _, a in em if m == "compeft"})
    dense = em[("dense", 1.0, None)]
    head = " | ".join(f"α={a:g}" for a in alphas)
    lines = [f"| k | x fp16 | selection | {head} | STC | prune |",
             "|---" * (len(alphas) + 5) + "|"]
    for k in ks:
        ratio = calibration["size_ratio_fp16"][str(k)]  # JSON keys are strings
        for method, label in (("compeft", "global"), ("compeft_per_tensor", "per tensor")):
            cells = []
            for a in alphas:
                text = f"{em[(method, k, a)]:.1f}"
                chosen = (method, k, a) == (calibration["method"], calibration["density"],
                                            calibration["alpha"])
                cells.append(f"**{text}**" if chosen else text)
            extra = (f"{em[('stc', k, None)]:.1f} | {em[('prune', k, None)]:.1f}"
                     if method == "compeft" else " | ")
            lines.append(f"| {k:g} | {ratio:.1f} | {label} | {' | '.join(cells)} | {extra} |")
    lines.append(f"\nDense experts: {dense:.1f}. Bold: the setting chosen and shipped.")
    return "\n".join(lines)
