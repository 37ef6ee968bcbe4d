"""Benchmark LoraHub composition: the `lorahub` package (reference) against ours, dense and ComPEFT.

Every method composes the same N experts (PEFT LoRA dirs with random LoRA-like tensors) on the
same base model, the same 5 examples, seed and budget, with LoraHub's objective (NGOpt, the sum of
batch mean losses / #examples + 0.05 mean|w|). Ours runs with its default settings (dtype "auto": the fastest
precision measured at the start, compose/probe.py; its seconds in probe_s), then with dtype fp32 and bf16,
and with K = 4 and 8 candidates per forward. Per method: mixing and
forward time per forward, the steps' and the whole call's wall time, peak RSS, and the memory the experts occupy -- measured on
the real objects (the reference's cache of state dicts; our [N, P] ExpertStack plus whatever
expert objects stay alive), for N=20 and for libraries of 20/50/200 experts with 20 sampled.

Each method runs in its own child process so that its peak RSS is its own; the parent builds the
inputs once and prints one side-by-side table.

    python scripts/bench_compose.py --quick                        # tiny T5, budget 5, < 2 min
    python scripts/bench_compose.py --model flan-t5-large-shape --reference-path /work/bench_env
    python scripts/bench_compose.py --n-experts 3 --library-sizes 3 --methods ours-dense,ours-compeft \
        --mix product          # a step's cost in each mix (the reference always mixes factors)

The reference is not a dependency of this project: install it beside it with
`pip install --no-deps --target DIR lorahub pandas pytz tzdata` and pass --reference-path DIR (or
set LORAHUB_REF_PATH). When `lorahub` cannot be imported its column is skipped, with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lorahub_compeft.config import MIXES

# Ours: which experts (dense PEFT dirs or ComPEFT files) and compose()'s forward options;
# "ours-compeft" is the default settings (dtype="auto", one candidate per forward).
OURS = {"ours-dense": (False, {}), "ours-compeft": (True, {}),
        "ours-compeft-fp32": (True, {"dtype": "fp32"}),
        "ours-compeft-bf16": (True, {"dtype": "bf16"}),
        "ours-compeft-k4": (True, {"candidates_per_step": 4}),
        "ours-compeft-k8": (True, {"candidates_per_step": 8})}
METHODS = ("reference", *OURS)
DEFAULT = "ours-compeft"
SELECT = "ours-select"  # choosing N of L library experts by few-shot loss, then the search
# Five short few-shot examples in the style of BBH (the same for every method).
EXAMPLES = [
    {"input": "Evaluate the boolean expression : not ( True and False ) is", "target": "True"},
    {"input": "Sort the words alphabetically : pear apple fig", "target": "apple fig pear"},
    {"input": "Is the following sentence plausible ? The goalie scored a touchdown .",
     "target": "no"},
    {"input": "Which date is one week after 01 / 10 / 2020 ? Answer in MM / DD / YYYY .",
     "target": "01 / 17 / 2020"},
    {"input": "Count the objects : I have a chair , two lamps and a table . How many objects ?",
     "target": "4"},
]
# google/flan-t5-large's figures (../shared/DESIGN.md); random weights, nothing downloaded.
FLAN_T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24,
                     num_decoder_layers=24, num_heads=16, feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
                     pad_token_id=0, eos_token_id=1)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
MB = 1e6


# --- inputs: base model, experts, libraries ----------------------------------------------------
def build_tokenizer(directory: Path):
    """A word-level tokenizer over the examples' words, saved so AutoTokenizer loads it by path.

    No T5 sentencepiece model is available offline; word-level ids stay far below 32128, and for
    these simple words the token counts are close to what T5's tokenizer gives."""
    from zoo_build.tokenizer import build_tokenizer as word_level
    tokenizer = word_level([text for e in EXAMPLES for text in e.values()])
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_inputs(work: Path, model: str, n: int, sizes: list[int], density: float,
                 seed: int) -> dict:
    """Base dir, N PEFT expert dirs, N ComPEFT expert files and one library per size.

    Built once per work dir (a marker records what was built) so that the 3 GB flan-t5-large-shaped
    base is made only once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from lorahub_compeft import PAPER_COMPEFT, ExpertLibrary, compress
    spec = {"model": model, "n": n, "sizes": sizes, "density": density, "seed": seed, "version": 1}
    paths = {"base": work / "base",
             "experts": [work / "peft" / f"expert-{i:02d}" for i in range(n)],
             "compeft": [work / "compeft" / f"expert-{i:02d}.safetensors" for i in range(n)],
             "libraries": {size: work / f"library-{size}" for size in sizes}}
    marker = work / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return paths
    print(f"building the {model} base and {n} experts in {work} ...", file=sys.stderr)
    tokenizer = build_tokenizer(paths["base"])
    torch.manual_seed(seed)
    if model == "tiny":
        config, r = T5Config(vocab_size=len(tokenizer), **TINY_T5), 4
    else:
        config, r = T5Config(**FLAN_T5_LARGE), 16
    base = T5ForConditionalGeneration(config)
    base.save_pretrained(paths["base"])
    # LoraHub's experts: LoRA on q and v, lora_alpha = 2r; filled with LoRA-like random values
    # (A larger than B, as in trained experts), one seed per expert.
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_2_SEQ_LM", r=r, lora_alpha=2 * r,
                                                 target_modules=["q", "v"], lora_dropout=0.0))
    peft_model.peft_config["default"].base_model_name_or_path = str(paths["base"])
    lora = [(name, p) for name, p in peft_model.named_parameters() if "lora_" in name]
    for i, directory in enumerate(paths["experts"]):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for name, p in lora:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.004))
        peft_model.save_pretrained(directory)
    del peft_model, base, lora
    experts = [compress(d, PAPER_COMPEFT, density=density) for d in paths["experts"]]
    for expert, path in zip(experts, paths["compeft"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        expert.save(path, force=True)
    # A library of `size` experts cycles the N compressed ones under distinct names: real files,
    # real index, and composing samples N of them (content repeats do not change time or memory).
    for size, root in paths["libraries"].items():
        library = ExpertLibrary(root)
        for i in range(size):
            library.add(experts[i % n], name=f"expert-{i:03d}", force=True)
    marker.write_text(json.dumps(spec))
    return paths


# --- measuring -----------------------------------------------------------------------------------
def held_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensors and arrays reachable from obj (dicts, lists, dataclasses), each
    storage counted once (views of one buffer, or cache entries aliasing parameters)."""
    import torch
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = ("t", storage.data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        key = ("a", obj.__array_interface__["data"][0])
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(held_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*")
                                                         if p.is_file())


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux ru_maxrss would not do: it carries over the
    parent's peak across fork and exec (the parent may have just built a 3 GB model), while
    VmHWM belongs to the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # KiB on Linux


def import_reference(path: str | None):
    """The `lorahub` package, from `path` first if given; None and the reason if it is missing."""
    if path:
        sys.path.insert(0, path)
    try:
        import lorahub.algorithm as algorithm
    except Exception as err:  # ImportError, or one of its dependencies failing to import
        return None, f"cannot import lorahub ({type(err).__name__}: {err}); install it with " \
                     "`pip install --no-deps --target DIR lorahub pandas pytz tzdata` and pass " \
                     "--reference-path DIR"
    return algorithm, None


# --- one method per child process ----------------------------------------------------------------
def run_reference(spec: dict) -> dict:
    """lorahub_learning on the PEFT dirs, with timing wrappers patched onto its module.

    lorahub_learning calls get_score by its module-global name once per step, and get_score
    rebuilds the mixed state dict, loads it with set_peft_model_state_dict, then calls get_loss
    and get_regular. So mix = get_score - get_loss - get_regular: the state-dict rebuild. Its
    wall time also covers its final rebuild and merge_and_unload (one more mix, no forward).

    Found while writing this (peft 0.21): it loads every expert with PeftModel.from_pretrained
    into the same base model, so the last expert's cached tensors are the live LoRA parameters,
    and the first set_peft_model_state_dict overwrites that expert's cache entry. Measured as
    is: the package is the reference, bugs and all."""
    algorithm, reason = import_reference(spec["reference_path"])
    if algorithm is None:
        return {"skipped": reason}
    spent = {"score": 0.0, "forward": 0.0, "regular": 0.0}
    steps, losses, held = [], [], {}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            value = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - start
            if key == "score":
                steps.append((start, time.perf_counter()))
                losses.append(float(value))
            return value
        return wrapper

    load = algorithm.load_base_model_and_lora_modules

    def keep_cache(*args, **kwargs):  # the dense cache: one state dict per expert
        model, tokenizer, cache = load(*args, **kwargs)
        held["cache"] = cache
        return model, tokenizer, cache

    algorithm.get_score = timed(algorithm.get_score, "score")
    algorithm.load_base_model_and_lora_modules = keep_cache
    start = time.perf_counter()
    algorithm.lorahub_learning(
        [str(d) for d in spec["experts"]], [e["input"] for e in spec["examples"]],
        [e["target"] for e in spec["examples"]], spec["budget"], model_name_or_path=spec["base"],
        get_loss=timed(algorithm.default_get_loss, "forward"),
        get_regular=timed(algorithm.default_l1_regularization, "regular"), seed=spec["seed"])
    wall = time.perf_counter() - start
    n = len(steps)
    return {"steps": n, "forwards": n, "dtype": "float32", "k": 1, "mix_s": (spent["score"] - spent["forward"] - spent["regular"]) / n,
            "forward_s": spent["forward"] / n, "steps_s": steps[-1][1] - steps[0][0],
            "wall_s": wall, "peak_rss_mb": peak_rss_mb(), "best_loss": min(losses),
            "expert_bytes": held_bytes(held["cache"])}


def run_ours(spec: dict, compressed: bool, forward_options: dict, libraries: bool) -> dict:
    from lorahub_compeft import ExpertLibrary, load_expert
    from lorahub_compeft import compose
    from lorahub_compeft.io.models import load_model
    # Expert files open lazily (header only); compose decodes each once into its stack and
    # releases the decoded copy. Whatever the expert objects still hold counts with the stack.
    experts = [load_expert(p) for p in spec["compeft"]] if compressed else spec["experts"]
    options = dict(n_experts=spec["n"], seed=spec["seed"], objective="lorahub", mix=spec["mix"],
                   threads=spec["threads"], progress=False)
    start = time.perf_counter()
    result = compose(experts, spec["examples"], model=spec["base"], budget=spec["budget"],
                     **options, **forward_options)
    wall = time.perf_counter() - start
    t = result.timings
    row = {"steps": t["steps"], "forwards": t["forwards"], "mix_s": t["mix"] / t["forwards"],
           "forward_s": t["forward"] / t["forwards"],
           "dtype": result.precision, "mix": result.mix,
           "k": forward_options.get("candidates_per_step", 1),
           "steps_s": t["mix"] + t["forward"] + t["optimizer"], "wall_s": wall,
           "peak_rss_mb": peak_rss_mb(), "best_loss": result.best_loss,
           "expert_bytes": held_bytes([result.stack, experts]),
           "stack_bytes": held_bytes(result.stack), "setup_s": t["setup"], "decode_s": t["decode"],
           "probe_s": t.get("probe", 0.0), "precision_measured": result.precision_measured}
    if libraries:  # after the peak RSS is read: this part loads more
        del result  # its model: a 3 GB copy at flan-t5-large shape
        row["library"] = {}
        model, tokenizer = load_model(spec["base"])
        for size, root in spec["libraries"].items():
            library = ExpertLibrary(root)
            composed = compose(library, spec["examples"], model=model, tokenizer=tokenizer,
                               budget=1, **options)
            # The stack, the sampled experts the library keeps decoded, and its index (as JSON).
            index = len(json.dumps(library.entries()))
            decoded = [library.get(name) for name in composed.experts]
            row["library"][size] = {"held_bytes": held_bytes([composed.stack, decoded]) + index,
                                    "index_bytes": index, "disk_bytes": disk_bytes(Path(root))}
            del composed, decoded
    return row


def run_select(spec: dict) -> dict:
    """select="loss" over the first L experts of the largest library, then the search: the
    selection's and the search's seconds come from the same call (same machine load)."""
    from lorahub_compeft import ExpertLibrary
    from lorahub_compeft import compose
    size = max(spec["libraries"], key=int)
    library = ExpertLibrary(spec["libraries"][size])
    names = library.names()[:spec["select_from"]]
    start = time.perf_counter()
    result = compose(library, spec["examples"], model=spec["base"], names=names,
                     n_experts=spec["select_n"], select="loss", seed=spec["seed"],
                     budget=spec["select_budget"], objective="lorahub", mix=spec["mix"],
                     threads=spec["threads"], progress=False)
    wall = time.perf_counter() - start
    t = result.timings
    search = t["mix"] + t["forward"] + t["optimizer"]
    return {"candidates": len(names), "n": len(result.experts), "select_s": t["select"],
            "search_s": search, "ratio": (t["select"] + search) / search, "wall_s": wall,
            "exact": len(result.selection.scores), "forward_s": t["forward"] / t["steps"],
            "estimate_s": result.selection.estimate_seconds, "steps": t["steps"],
            "budget": spec["select_budget"]}


def child(method: str, spec_path: str, out_path: str) -> None:
    import torch
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    # The reference imports these when `lorahub.algorithm` is imported, before its clock starts;
    # compose imports them inside. Import them up front for every method so no wall time counts
    # an import (about 3 s on this machine, more than a tiny model's whole run).
    import nevergrad  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    row = {"rss_start_mb": peak_rss_mb()}  # after imports: the interpreter, torch, transformers
    if method == "reference":
        row.update(run_reference(spec))
    elif method == SELECT:
        row.update(run_select(spec))
    else:
        compressed, forward_options = OURS[method]
        row.update(run_ours(spec, compressed, forward_options, libraries=method == DEFAULT))
    Path(out_path).write_text(json.dumps(row))


# --- the parent: inputs, children, table ---------------------------------------------------------
def run_method(method: str, spec: dict, tmp: Path) -> dict:
    spec_path, out_path = tmp / "spec.json", tmp / f"{method}.json"
    spec_path.write_text(json.dumps(spec, default=str))
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(f"running {method} ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, __file__, "--child", method, str(spec_path),
                           str(out_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dict(json.loads(out_path.read_text()), method=method)


def add_library_rows(rows: dict, paths: dict, sizes: list[int]) -> None:
    """Per library size: RAM held while composing 20 sampled, and the library on disk.

    The reference and ours-dense are given the sampled PEFT dirs, so what they hold does not
    depend on the library's size; their disk is `size` PEFT dirs (measured per dir, times size:
    200 flan-t5-large-shaped dirs would be 3.8 GB). ours-compeft's numbers are measured on the
    real libraries."""
    per_dir = np.mean([disk_bytes(d) for d in paths["experts"]])
    for method in ("reference", "ours-dense"):
        if "expert_bytes" in rows.get(method, {}):
            rows[method]["library"] = {size: {"held_bytes": rows[method]["expert_bytes"],
                                              "disk_bytes": int(per_dir * size),
                                              "disk_extrapolated": True} for size in sizes}
    if "library" in rows.get("ours-compeft", {}):  # JSON made the sizes strings
        library = rows["ours-compeft"]["library"]
        rows["ours-compeft"]["library"] = {int(k): v for k, v in library.items()}


def ratios(rows: dict) -> dict:
    ref = rows.get("reference", {})
    if "mix_s" not in ref:
        return {}
    return {m: {"mix": rows[m]["mix_s"] / ref["mix_s"], "wall": rows[m]["wall_s"] / ref["wall_s"],
                "steps": rows[m]["steps_s"] / ref["steps_s"],
                "expert_memory": rows[m]["expert_bytes"] / ref["expert_bytes"]}
            for m in OURS if "mix_s" in rows.get(m, {})}


def print_report(rows: dict, config: dict, sizes: list[int]) -> None:
    print(f"\n### LoraHub composition: {config['model']}, N={config['n']}, "
          f"{len(EXAMPLES)} examples, budget {config['budget']}, seed {config['seed']}, "
          f"{config['threads']} thread(s), ours mixing {config['mix']}\n")
    head = ["method", "dtype", "K", "forwards", "mix ms/forward", "forward ms/forward",
            "steps s", "wall s", "peak RSS MB", f"experts MB (N={config['n']})", "best loss"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for method in METHODS:
        r = rows.get(method)
        if not r:  # not asked for
            continue
        if "skipped" in r:
            print(f"| {method} | skipped: {r['skipped']} |")
            continue
        cells = [method, r["dtype"], str(r["k"]), str(r["forwards"]), f"{1e3 * r['mix_s']:.2f}",
                 f"{1e3 * r['forward_s']:.1f}",
                 f"{r['steps_s']:.2f}", f"{r['wall_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r['expert_bytes'] / MB:.2f}", f"{r['best_loss']:.4f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\n### Experts in a library of L, {config['n']} sampled: MB held in RAM while composing "
          "(MB on disk; * = per-expert size x L)\n")
    print("| method | " + " | ".join(f"L={s}" for s in sizes) + " |\n|"
          + "---|" * (len(sizes) + 1))
    for method in METHODS:
        lib = rows.get(method, {}).get("library")
        if "skipped" in rows.get(method, {}):
            print(f"| {method} | skipped |")
        elif lib:
            cells = [f"{lib[s]['held_bytes'] / MB:.2f} ({lib[s]['disk_bytes'] / MB:.2f}"
                     f"{'*' if lib[s].get('disk_extrapolated') else ''})" for s in sizes]
            print(f"| {method} | " + " | ".join(cells) + " |")
    sel = rows.get(SELECT)
    if sel:
        print(f"\n### Choosing {sel['n']} of L={sel['candidates']} experts by few-shot loss "
              f"({sel['exact']} scored exactly after the first-order estimate), then "
              f"{sel['steps']} steps (budget {sel['budget']}); one call, so both parts ran "
              "under the same load\n")
        print("| selection s (first-order estimate s) | search s | (selection + search) / search "
              "(target <= 2) | forward ms/step |\n|---|---|---|---|")
        print(f"| {sel['select_s']:.2f} ({sel['estimate_s']:.2f}) | {sel['search_s']:.2f} | "
              f"{sel['ratio']:.2f} | {1e3 * sel['forward_s']:.1f} |")
        print_pipeline_ratio(sel, rows.get("reference", {}))
    found = ratios(rows)
    if not found:
        print("\nNo ratios: the reference was skipped.")
        return
    shape = "" if config["model"] == "flan-t5-large-shape" else \
        " (the targets are for the flan-t5-large shape; this is a smoke run)"
    print(f"\nRatios to the reference{shape}:")
    for method, r in found.items():
        target = " (target <= 0.5: ours, default settings)" if method == DEFAULT else ""
        print(f"- {method}: whole learning {r['wall']:.3f}{target}, steps only {r['steps']:.3f}, "
              f"mix per forward {r['mix']:.3f}, expert memory {r['expert_memory']:.3f}")


def print_pipeline_ratio(sel: dict, ref: dict) -> None:
    """The whole default pipeline (choosing N of L, then the search: the compose call's wall
    time, setup included) against the package's composition of its random 20."""
    if "wall_s" in ref:
        print(f"\nThe default pipeline against the package: {sel['wall_s']:.2f} s / "
              f"{ref['wall_s']:.2f} s = {sel['wall_s'] / ref['wall_s']:.3f} (target <= 0.5)")


def select_budget(text: str) -> int | str:
    return text if text == "auto" else int(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny T5, budget 5 (under 2 minutes)")
    parser.add_argument("--model", choices=("tiny", "flan-t5-large-shape"),
                        default="flan-t5-large-shape")
    parser.add_argument("--n-experts", type=int, default=20)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--density", type=float, default=0.1, help="ComPEFT density of the experts")
    parser.add_argument("--library-sizes", default="20,50,200")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of every method (ours get it as compose(threads=...), "
                             "not left to the load-aware default)")
    parser.add_argument("--reference-path", default=os.environ.get("LORAHUB_REF_PATH"),
                        help="a directory holding the lorahub package (default: $LORAHUB_REF_PATH, "
                             "else a plain import)")
    parser.add_argument("--methods", default=",".join(METHODS + (SELECT,)))
    parser.add_argument("--mix", choices=MIXES, default="factors",
                        help="how our methods combine the experts: factors (LoraHub's, default) or "
                             "product (sum w_i s B_i A_i, a rank-N*r LoRA); the reference mixes "
                             "factors")
    parser.add_argument("--select-from", type=int, default=196,
                        help=f"{SELECT}: candidates L, the first L of the largest library")
    parser.add_argument("--select-n", type=int, default=3,
                        help=f"{SELECT}: experts chosen (default 3, compose.DEFAULT_N[\"loss\"])")
    parser.add_argument("--select-budget", type=select_budget, default="auto",
                        help=f"{SELECT}: the search's budget (default auto, the package's)")
    parser.add_argument("--work-dir", help="where the base and experts are built and kept "
                        "(default: ~/.cache/lorahub-compeft/bench-compose/MODEL; for tiny, a "
                        "temporary dir)")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    if args.quick:
        args.model, args.budget = "tiny", 5
    sizes = sorted(int(s) for s in args.library_sizes.split(","))
    if sizes[0] < args.n_experts:
        parser.error(f"library sizes must be at least --n-experts ({args.n_experts})")
    methods = args.methods.split(",")
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else (
            Path(tmp) / "inputs" if args.model == "tiny" else
            Path.home() / ".cache" / "lorahub-compeft" / "bench-compose" / args.model)
        paths = build_inputs(work, args.model, args.n_experts, sizes, args.density, args.seed)
        config = {"model": args.model, "n": args.n_experts, "budget": args.budget,
                  "seed": args.seed, "density": args.density, "threads": args.threads,
                  "mix": args.mix}
        spec = dict(config, examples=EXAMPLES, reference_path=args.reference_path,
                    base=str(paths["base"]), experts=[str(p) for p in paths["experts"]],
                    compeft=[str(p) for p in paths["compeft"]],
                    libraries={s: str(p) for s, p in paths["libraries"].items()})
        spec.update(select_from=min(args.select_from, sizes[-1]), select_n=args.select_n,
                    select_budget=args.select_budget)
        rows = {m: run_method(m, spec, Path(tmp)) for m in METHODS + (SELECT,) if m in methods}
        add_library_rows(rows, paths, sizes)  # reads the files: before a temporary work dir goes
    if "skipped" in rows.get("reference", {}):
        print(f"reference skipped: {rows['reference']['skipped']}", file=sys.stderr)
    print_report(rows, config, sizes)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "library_sizes": sizes,
                                               "rows": rows, "ratios": ratios(rows)}, indent=1))


if __name__ == "__main__":
    main()
