"""`download` and `reproduce`: the paper's BBH experiment as two commands. `download` fills a
Hugging Face cache where there is network (the base, the experts, lukaemon/bbh); `reproduce`
runs offline from that cache: `bbh` with the paper's protocol, progress over the whole run
(cells done, each cell's time, ETA), resumable, and ends by printing the report."""
from __future__ import annotations

import argparse
import os
import sys
import time

from lorahub_compeft.cli.options import WholeWordsHelp, add_threads_option, parse_seeds

PAPER_METHODS = ("zeroshot", "icl", "lorahub", "compeft")  # the rows of ComPEFT's Table 7
DEFAULT_MODEL = "google/flan-t5-large"
# What `download` fetches of a model and of an expert (not a model's other frameworks' weights).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
EXPERT_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]


def add_parsers(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"base model: a Hub id or a folder (default {DEFAULT_MODEL})")
    common.add_argument("--experts", nargs="+", required=True,
                        help="Hub ids, PEFT dirs, or files of one per line (for the paper: "
                             "the file of LoraHub's 196 flan-t5-large ids)")
    common.add_argument("--cache", help="Hugging Face cache folder, as HF_HOME (default: "
                                        "HF_HOME, else ~/.cache/huggingface)")
    p = sub.add_parser("download", parents=[common], formatter_class=WholeWordsHelp,
                       help="fill a Hugging Face cache for `reproduce` (needs network)",
                       description="Downloads the base model, every expert and the 27 BBH tasks "
                                   "(lukaemon/bbh, into the datasets cache) once, where there is "
                                   "network; `reproduce` then runs with HF_HUB_OFFLINE=1.")
    p.add_argument("--no-bbh", action="store_true",
                   help="skip BBH (reproduce then reads it from --bbh-dir)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("reproduce", parents=[common], formatter_class=WholeWordsHelp,
                       help="the paper's BBH experiment, offline, resumable, ending with its report",
                       description="ComPEFT Table 7 / LoraHub on Big-Bench Hard: per task and "
                                   "seed, 5 few-shot examples, N=20 experts drawn, budget 40; "
                                   f"methods {', '.join(PAPER_METHODS)}. Runs `bbh` with those "
                                   "settings (rerun the same command to resume) and prints the "
                                   "report at the end.")
    p.add_argument("--out", required=True, help="results folder (a rerun resumes it)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files (default: lukaemon/bbh "
                                     "from the cache)")
    p.add_argument("--methods", default="",
                   help="methods to run besides the paper's, comma-separated (e.g. "
                        "select,select-compeft)")
    p.add_argument("--tasks", default="all", help="comma-separated BBH tasks (default all 27)")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5],
                   help="e.g. 1-5 (default)")
    p.add_argument("--max-eval", type=int, help="evaluate at most this many examples per cell "
                                                "(a rehearsal; the paper evaluates all)")
    p.add_argument("-n", "--n-experts", type=int,
                   help="experts per composition (default: each method's; the paper's 20)")
    p.add_argument("--budget", type=int, help="optimizer evaluations (default: the paper's 40)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch (default 16)")
    p.add_argument("--online", action="store_true",
                   help="let the loaders reach the Hub (default: HF_HUB_OFFLINE=1, the cache only)")
    add_threads_option(p)
    p.set_defaults(func=cmd_reproduce)


def _use_cache(args, offline: bool) -> None:
    """Point the Hugging Face libraries at --cache (and offline), before any of them is
    imported: they read these variables once, at import."""
    if args.cache:
        os.environ["HF_HOME"] = os.path.abspath(os.path.expanduser(args.cache))
        os.environ.pop("HF_HUB_CACHE", None)
        os.environ.pop("HF_DATASETS_CACHE", None)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def _hub_ids(items: list[str], what: str = "expert") -> list[str]:
    """The items to find on the Hub; an item that is neither a local path nor a Hub id is
    refused by name (eval/expert_lists.check_source)."""
    from pathlib import Path

    from lorahub_compeft.eval.expert_lists import check_source
    for item in items:
        check_source(item, what)
    return [s for s in items if not Path(s).exists()]


def cmd_download(args) -> int:
    _use_cache(args, offline=False)
    from huggingface_hub import snapshot_download

    from lorahub_compeft.io.adapters import HubOfflineError, hub_unreachable
    if (why := hub_unreachable()) is not None:
        raise HubOfflineError(f"download needs the Hugging Face Hub, which cannot be reached "
                              f"({why}); run it where there is network and bring the cache "
                              "folder (--cache) here")

    from lorahub_compeft.eval.bbh import BBH_HUB_DATASET, BBH_TASKS, load_examples
    from lorahub_compeft.eval.expert_lists import experts_from_args
    experts = _hub_ids(experts_from_args(args.experts))
    models = _hub_ids([args.model], "model")
    for i, repo in enumerate(models + experts, 1):
        patterns = MODEL_FILES if repo in models else EXPERT_FILES
        path = snapshot_download(repo, allow_patterns=patterns)
        print(f"[{i}/{len(models) + len(experts)}] {repo}: {path}", flush=True)
    if not args.no_bbh:
        for i, task in enumerate(BBH_TASKS, 1):
            rows = load_examples(task)
            print(f"[{i}/{len(BBH_TASKS)}] {BBH_HUB_DATASET} {task}: {len(rows)} examples",
                  flush=True)
    from huggingface_hub import constants
    print(f"done: the cache is {constants.HF_HOME}; run `lorahub-compeft reproduce"
          f"{' --cache ' + args.cache if args.cache else ''} --out DIR` (offline)")
    return 0


def missing_from_cache(model: str, experts: list[str], bbh_dir: str | None, tasks) -> list[str]:
    """What of the run is not in the Hugging Face cache (each Hub id's first file, each BBH
    task through load_dataset): one entry per missing kind."""
    from huggingface_hub import try_to_load_from_cache

    from lorahub_compeft.eval.bbh import BBH_HUB_DATASET, load_examples

    def cached(repo, name):
        return isinstance(try_to_load_from_cache(repo, name), str)
    missing = [f"the model {m}" for m in _hub_ids([model], "model") if not cached(m, "config.json")]
    lost = [e for e in _hub_ids(experts) if not cached(e, "adapter_config.json")]
    if lost:
        shown = ", ".join(lost[:3]) + (", ..." if len(lost) > 3 else "")
        missing.append(f"{len(lost)} of {len(experts)} experts ({shown})")
    if bbh_dir is None:
        gone = []
        for task in tasks:
            try:
                load_examples(task)
            except Exception:
                gone.append(task)
        if gone:
            missing.append(f"{BBH_HUB_DATASET} tasks {', '.join(gone[:3])}"
                           f"{', ...' if len(gone) > 3 else ''} ({len(gone)} of {len(tasks)})")
    return missing


def bbh_argv(args, experts: list[str]) -> list[str]:
    """The `bbh` command that reproduce runs."""
    methods = list(PAPER_METHODS) + [m.strip() for m in args.methods.split(",")
                                     if m.strip() and m.strip() not in PAPER_METHODS]
    argv = ["bbh", "--model", args.model, "--experts", *experts, "--methods", ",".join(methods),
            "--tasks", args.tasks, "--seeds", ",".join(map(str, args.seeds)),
            "--batch-size", str(args.batch_size), "--out", args.out]
    argv += ["--bbh-dir", args.bbh_dir] if args.bbh_dir else []
    argv += ["--max-eval", str(args.max_eval)] if args.max_eval else []
    argv += ["--n-experts", str(args.n_experts)] if args.n_experts else []
    argv += ["--budget", str(args.budget)] if args.budget else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    return argv


class Progress:
    """One line per cell on stderr: cells done of all, this cell's time, and the ETA from the
    mean time of the cells this run computed."""

    def __init__(self):
        self.start, self.count = time.perf_counter(), 0

    def __call__(self, row: dict, done: int, total: int, todo: int) -> None:
        self.count += 1
        mean = (time.perf_counter() - self.start) / self.count
        eta = mean * (todo - self.count)
        print(f"[{done}/{total}] {row['task']} seed {row['seed']} {row['method']}: EM "
              f"{row['em']:.1f} in {row['seconds']:.0f} s; ETA {_duration(eta)}",
              file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def cmd_reproduce(args) -> int:
    _use_cache(args, offline=not args.online)
    from lorahub_compeft.cli import evaluate
    from lorahub_compeft.eval.bbh import BBH_TASKS
    from lorahub_compeft.eval.expert_lists import experts_from_args
    experts = experts_from_args(args.experts)
    if not args.online:
        tasks = list(BBH_TASKS) if args.tasks == "all" else args.tasks.split(",")
        missing = missing_from_cache(args.model, experts, args.bbh_dir, tasks)
        if missing:
            from huggingface_hub import constants

            from lorahub_compeft.io.adapters import HubOfflineError
            raise HubOfflineError(
                f"not in the Hugging Face cache {constants.HF_HOME} (offline): "
                f"{'; '.join(missing)}; fill it where there is network with `lorahub-compeft "
                f"download{' --cache ' + args.cache if args.cache else ''}` (same --model and "
                "--experts), or pass local folders (--model DIR, --experts DIRS, --bbh-dir DIR)")
    parser = argparse.ArgumentParser(prog="lorahub-compeft")
    evaluate.add_parsers(parser.add_subparsers(dest="command"))
    bbh = parser.parse_args(bbh_argv(args, experts))
    bbh.argv = args.argv
    return evaluate.cmd_bbh(bbh, on_cell=Progress())
