"""Rehearse the paper's reproduction at full scale without a download: into a temporary
Hugging Face cache, a base with google/flan-t5-large's config and random weights (cached as
google/flan-t5-large), experts under the ids of a list file (LoraHub's 196) in LoraHub's
own format (a pickled state dict adapter_model.bin, a PEFT-0.3-era adapter_config.json with
enable_lora and merge_weights, r=16 on q and v), and one BBH task in the datasets cache as
lukaemon/bbh. Then the command a user types, offline (HF_HUB_OFFLINE=1):

    lorahub-compeft reproduce --cache CACHE --out OUT --tasks T --seeds 1 --methods ...

and, per method, the wall time of its cell, the search's forwards, the cell's peak RSS, and
the time of the whole experiment (27 tasks x 5 seeds) extrapolated on this machine.

    python scripts/rehearse_reproduction.py                       # full scale (GBs, an hour)
    python scripts/rehearse_reproduction.py --shape small --experts 24 --max-eval 3

The cache is written by huggingface_hub's own helpers (repo_folder_name, _create_symlink,
_cache_commit_hash_for_specific_revision: no public function writes one from local files) and
the datasets cache by datasets' own json builder, renamed to lukaemon/bbh's cache folder; both
are then read only through the real loaders.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorahub_compeft.cli.reproduce import PAPER_METHODS
from lorahub_compeft.eval.expert_lists import read_experts_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # zoo_build's word-level tokenizer
SHARED_BBH = REPO.parent / "shared" / "data" / "bbh"
SHARED_LIST = REPO.parent / "shared" / "data" / "lorahub_flan_t5_large_modules.txt"

# google/flan-t5-large's config.json (docs: DESIGN facts); "small" keeps its structure.
SHAPES = {
    "flan-t5-large": dict(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24,
                          num_decoder_layers=24),
    "small": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                  num_decoder_layers=2),
}
BASE_ID = "google/flan-t5-large"
RANK, ALPHA = 16, 32
BBH_EVAL_ROWS = 6511 - 27 * 5  # every example of the 27 tasks but each cell's 5 shots
TASKS, SEEDS, PAPER_BUDGET = 27, 5, 40


# --- a Hugging Face cache, written by huggingface_hub's own helpers ---------------------------
def cache_folder(repo_id: str, folder: Path, cache_dir: Path, repo_type: str = "model",
                 move: bool = False) -> Path:
    """`folder`'s files as the snapshot of `repo_id` at refs/main in the hub cache `cache_dir`
    (models--org--name/{blobs,snapshots,refs}), as hf_hub_download leaves them: each file a
    blob named by its sha256, linked from snapshots/<commit>/. Returns the snapshot folder."""
    from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision,
                                               _create_symlink, repo_folder_name)
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: _sha256(p) for p in files}
    commit = hashlib.sha1("".join(f"{p.relative_to(folder)}:{d}\n" for p, d in
                                  digests.items()).encode()).hexdigest()
    for path, digest in digests.items():
        blob = storage / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            (shutil.move if move else shutil.copyfile)(path, blob)
        pointer = storage / "snapshots" / commit / path.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)
    return storage / "snapshots" / commit


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def cache_bbh_task(task: str, rows: list[dict], datasets_cache: Path, work: Path) -> None:
    """`rows` as lukaemon/bbh's config `task`, split test, in the datasets cache: built by
    datasets' json builder, in the folder load_dataset looks in offline
    (lukaemon___bbh/<task>/<version>/<hash>)."""
    from datasets.packaged_modules.json.json import Json
    source = work / f"{task}.jsonl"
    source.write_text("".join(json.dumps({"input": r["input"], "target": r["target"]}) + "\n"
                              for r in rows))
    builder = Json(cache_dir=str(work / "build"), config_name=task, dataset_name="bbh",
                   data_files={"test": str(source)})
    builder.download_and_prepare()
    target = datasets_cache / "lukaemon___bbh" / task / str(builder.config.version) / \
        _sha256(source)[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(builder.cache_dir, target)


# --- the base and the experts -----------------------------------------------------------------
def t5_config(shape: str, vocab_size: int = 32128):
    from transformers import T5Config
    return T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1, **SHAPES[shape])


def build_base(folder: Path, shape: str, texts: list[str]) -> None:
    """A T5 of `shape` with random weights and a word-level tokenizer over `texts`."""
    import torch
    from transformers import T5ForConditionalGeneration
    from zoo_build.tokenizer import build_tokenizer
    tokenizer = build_tokenizer(texts, model_max_length=4096)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config(shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def lorahub_state_dict(shape: str, seed: int) -> dict:
    """A LoRA of LoraHub's shape (r=16 on every q and v) under PEFT 0.3's saved key names."""
    import torch
    s = SHAPES[shape]
    inner, d = s["num_heads"] * s["d_kv"], s["d_model"]
    names = [f"encoder.block.{i}.layer.0.SelfAttention" for i in range(s["num_layers"])]
    names += [f"decoder.block.{i}.layer.{j}.{kind}" for i in range(s["num_decoder_layers"])
              for j, kind in ((0, "SelfAttention"), (1, "EncDecAttention"))]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        for m in ("q", "v"):
            key = f"base_model.model.{name}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, d, generator=g) / d ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(inner, RANK, generator=g) * 0.01
    return tensors


LORAHUB_CONFIG = {  # as PEFT 0.3 wrote it for LoraHub's modules
    "base_model_name_or_path": BASE_ID, "bias": "none", "enable_lora": None,
    "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": ALPHA, "lora_dropout": 0.1,
    "merge_weights": False, "modules_to_save": None, "peft_type": "LORA", "r": RANK,
    "target_modules": ["q", "v"], "task_type": "SEQ_2_SEQ_LM"}


def build_expert(folder: Path, shape: str, seed: int) -> None:
    import torch
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(LORAHUB_CONFIG, indent=2))
    torch.save(lorahub_state_dict(shape, seed), folder / "adapter_model.bin")  # pickled


def expert_ids(list_file: str | None, n_experts: int) -> list[str]:
    """The first n_experts ids of the list file; without one, ids of the same form."""
    if list_file:
        return read_experts_file(list_file)[:n_experts]
    return [f"lorahub/flan_t5_large-rehearsal_{i:03d}" for i in range(n_experts)]


def build_cache(root: Path, shape: str, ids: list[str], task: str, bbh_dir: Path) -> None:
    """HF_HOME at `root`: the base, the experts under `ids`, BBH `task`."""
    work, hub = root / "work", root / "hub"
    work.mkdir(parents=True)
    rows = json.loads((_task_file(bbh_dir, task)).read_text())["examples"]
    instruction = json.loads((REPO / "tasks" / "bbh" / f"{task}.json").read_text())["instruction"]
    build_base(work / "base", shape, [instruction] + [r["input"] + " " + r["target"]
                                                      for r in rows])
    cache_folder(BASE_ID, work / "base", hub, move=True)
    for i, repo_id in enumerate(ids):
        build_expert(work / "expert", shape, seed=i)
        cache_folder(repo_id, work / "expert", hub, move=True)
        shutil.rmtree(work / "expert")
    cache_bbh_task(task, rows, root / "datasets", work)
    shutil.rmtree(work)


def _task_file(bbh_dir: Path, task: str) -> Path:
    for path in (bbh_dir / f"{task}.json", bbh_dir / "tasks" / f"{task}.json"):
        if path.is_file():
            return path
    raise SystemExit(f"error: no {task}.json in {bbh_dir}; pass --bbh-dir, a folder of BBH "
                     "<task>.json files")


# --- the run and its figures ------------------------------------------------------------------
def all_methods() -> list[str]:
    from lorahub_compeft.eval.methods import METHODS  # the package's eval/ registers them all
    return list(METHODS)


def reproduce_argv(cache: Path, out: Path, task: str, methods: list[str], max_eval: int | None,
                   threads: int, experts: list[str], extra: list[str] = ()) -> list[str]:
    """The user's command."""
    argv = [sys.executable, "-m", "lorahub_compeft.cli", "reproduce", "--cache", str(cache),
            "--out", str(out), "--tasks", task, "--seeds", "1", "--methods", ",".join(methods),
            "--threads", str(threads),
            "--experts", *experts]
    argv += ["--max-eval", str(max_eval)] if max_eval else []
    return argv + list(extra)


def figures(rows: list[dict]) -> list[dict]:
    """Per method: seconds, forwards, peak RSS of its cell, and the whole experiment's time
    extrapolated: the cell's fixed part (composing, training: all but answering) as measured,
    and answers at the measured rate over every BBH example (BBH_EVAL_ROWS per seed). The rate
    is zeroshot's (icl: its own, longer prompts): a composed model answers with LoRA unmerged,
    a little slower, so its extrapolation is a little low."""
    rates = {r["method"]: r["seconds"] / r["n_eval"] for r in rows
             if r["method"] in ("zeroshot", "icl")}
    out = []
    for row in rows:
        rate = rates.get(row["method"], rates.get("zeroshot", 0.0))
        fixed = max(0.0, row["seconds"] - row["n_eval"] * rate)
        fixed += _missing_steps(row)
        whole = SEEDS * (TASKS * fixed + BBH_EVAL_ROWS * rate)
        out.append({"method": row["method"], "seconds": row["seconds"], "fixed": fixed,
                    "answer_per_example": rate,
                    "forwards": (row.get("compose_timings") or {}).get("forwards"),
                    "n_eval": row["n_eval"], "peak_rss_gb": row.get("peak_rss_bytes", 0) / 1e9,
                    "extrapolated_h": whole / 3600})
    return out


def _missing_steps(row: dict) -> float:
    """A search run at a smaller --budget than the paper's: the seconds of the steps it did not
    take, at its measured seconds per step (mix, forward and the optimizer's share)."""
    timings = row.get("compose_timings") or {}
    budget = (row.get("setting") or {}).get("params", {}).get("budget")
    if not timings.get("steps") or not budget or budget >= PAPER_BUDGET:
        return 0.0
    per_step = (timings["mix"] + timings["forward"] + timings["optimizer"]) / timings["steps"]
    return per_step * timings["steps"] * (PAPER_BUDGET / budget - 1)


def table(figs: list[dict]) -> str:
    lines = ["| method | cell (s) | fixed part at budget 40 (s) | answers (s/example) | search forwards | "
             "peak RSS (GB) | 27 tasks x 5 seeds (h) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for f in figs:
        lines.append(f"| {f['method']} | {f['seconds']:.1f} | {f['fixed']:.1f} | "
                     f"{f['answer_per_example']:.2f} | {f['forwards'] if f['forwards'] is not None else '-'} | "
                     f"{f['peak_rss_gb']:.2f} | {f['extrapolated_h']:.1f} |")
    paper = sum(f["extrapolated_h"] for f in figs if f["method"] in PAPER_METHODS)
    lines.append(f"| the paper's rows ({', '.join(PAPER_METHODS)}) | | | | | | {paper:.1f} |")
    lines.append(f"| all of these | | | | | | {sum(f['extrapolated_h'] for f in figs):.1f} |")
    return "\n".join(lines)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="flan-t5-large")
    p.add_argument("--experts", type=int, default=196, help="how many experts (default 196)")
    p.add_argument("--experts-file", default=SHARED_LIST if SHARED_LIST.is_file() else None,
                   help="ids for the experts, one per line (default: LoraHub's list in "
                        "../shared/data where present, else ids of the same form)")
    p.add_argument("--task", default="navigate")
    p.add_argument("--methods", default="all",
                   help="comma-separated (default all the package's methods)")
    p.add_argument("--max-eval", type=int, help="examples answered per cell (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-n", "--n-experts", type=int, help="experts per composition (default: "
                                                         "each method's, the paper's 20)")
    p.add_argument("--budget", type=int, help="optimizer evaluations (default the paper's 40)")
    p.add_argument("--bbh-dir", default=os.environ.get("LORAHUB_COMPEFT_BBH_DIR") or SHARED_BBH,
                   help="where the task's examples are read from to build the cache")
    p.add_argument("--workdir", help="keep the cache and run here (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--figures-only", metavar="RUN",
                   help="print the figures of a run folder's results.jsonl (a rehearsal that was "
                        "stopped) and run nothing")
    args = p.parse_args(argv)
    if args.figures_only:
        print(table(figures(_rows(Path(args.figures_only)))))
        return 0
    methods = all_methods() if args.methods == "all" else args.methods.split(",")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="rehearsal-"))
    cache, out = root / "hf", root / "run"
    start = time.perf_counter()
    experts = expert_ids(args.experts_file, args.experts)
    if not cache.exists():
        build_cache(cache, args.shape, experts, args.task, Path(args.bbh_dir))
    built = time.perf_counter() - start
    print(f"cache {cache} built in {built:.0f} s ({args.shape}, {args.experts} experts)",
          flush=True)
    extra = (["-n", str(args.n_experts)] if args.n_experts else []) + \
        (["--budget", str(args.budget)] if args.budget else [])
    command = reproduce_argv(cache, out, args.task, methods, args.max_eval, args.threads,
                             experts, extra)
    print("$ " + " ".join(["lorahub-compeft"] + command[3:]), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    rows = _rows(out)
    figs = figures(rows)
    print(f"\nreproduce: {wall:.0f} s for {len(rows)} cells; peak RSS of the run {peak:.2f} GB")
    print(table(figs))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figs, "wall_s": wall, "built_s": built,
                                               "peak_rss_gb": peak, "command": command[3:]},
                                              indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
