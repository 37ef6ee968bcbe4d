"""`bbh`, `report` and `demo`: evaluations through the runner."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from lorahub_compeft.cli.options import (add_codec_flags, add_dtype_option, add_threads_option,
                                         apply_threads, bounded_int, count_option, finite_float,
                                         parse_seeds, shown, WholeWordsHelp)
from lorahub_compeft.cli.compose import budget_flag
from lorahub_compeft.codecs.base import choose
from lorahub_compeft.config import PAPER_COMPEFT, CompeftOptions

# The ComPEFT options the compeft methods take; each defaults to the method's own setting.
BBH_COMPRESSION = ("density", "alpha", "per_tensor")
# Caps of bbh's own counts (ComposeConfig's are config.COUNT_LIMITS): far above any real run.
MAX_STEPS, MAX_SHOTS, MAX_BATCH, MAX_WORKERS = 100_000, 1000, 4096, 1024


def add_parsers(sub) -> None:
    _add_bbh_parsers(sub)
    _add_demo_parser(sub)


def add_mix_option(p: argparse.ArgumentParser) -> None:
    from lorahub_compeft.config import MIXES
    p.add_argument("--mix", choices=MIXES,
                   help="how w combines the experts: factors (LoraHub's: A = sum w_i A_i, B = "
                        "sum w_i B_i) or product (the update sum w_i s B_i A_i, exactly); "
                        "default: factors for lorahub/compeft (the paper's protocol), the "
                        "package's default for select/select-compeft")


def add_start_option(p: argparse.ArgumentParser) -> None:
    from lorahub_compeft.config import STARTS
    p.add_argument("--start", choices=STARTS,
                   help="where the search starts: best (the chosen expert with the lowest "
                        "few-shot loss alone) or zero (w = 0, LoraHub's); default: zero for "
                        "lorahub/compeft (the paper's protocol), best for select/select-compeft")


def _add_bbh_parsers(sub) -> None:
    from lorahub_compeft.eval.methods import METHODS
    # The default reproduces the paper's Table 7; add select,select-compeft for the package's
    # protocol beside it.
    names = [m for m in METHODS if m in ("zeroshot", "icl", "lorahub", "compeft")]
    p = sub.add_parser("bbh", help="evaluate zero-shot, ICL, LoraHub and ComPEFT on Big-Bench Hard",
                       formatter_class=WholeWordsHelp,
                       description="Per task and seed: 5 seeded few-shot examples, the rest "
                                   "evaluated by exact match. Results go to OUT/results.jsonl, "
                                   "one line per cell keyed by its whole setting (method and its "
                                   "parameters, model, experts, data, seed); a rerun computes only "
                                   "the cells not there yet, so another --density or --alpha adds "
                                   "new cells beside the old ones.")
    p.add_argument("--model", required=True, help="base model, e.g. google/flan-t5-large")
    p.add_argument("--experts-file", help="file with one expert (Hub id, PEFT dir or expert "
                                          "file) per line")
    p.add_argument("--experts", nargs="*", default=[],
                   help="experts: Hub ids, PEFT dirs, expert files, or files of one per line")
    p.add_argument("--methods", default=",".join(names),
                   help=f"comma-separated, of {', '.join(METHODS)} (default {','.join(names)})")
    p.add_argument("--tasks", default="all", help="comma-separated BBH task names (default all 27)")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5], help="e.g. 1-5 (default)")
    # Each method's own defaults unless given: lorahub/compeft are the paper's protocol (random
    # 20; PAPER_COMPEFT), select/select-compeft the package's (3 chosen by loss; CompeftOptions()).
    p.add_argument("-n", "--n-experts", type=count_option("n_experts"),
                   help="experts per composition (default: 20 for lorahub/compeft, 3 for select*)")
    package = CompeftOptions()
    add_codec_flags(p, choose(None, package), BBH_COMPRESSION, note=lambda f: (
        f"default: {shown(getattr(PAPER_COMPEFT, f.name))} for compeft, "
        f"{shown(getattr(package, f.name))} for select-compeft"),
        title="ComPEFT compression of the compeft methods")
    p.add_argument("--restarts", type=count_option("restarts"),
                   help="select*: searches from different starts, kept by few-shot loss (default 1)")
    p.add_argument("--budget", type=budget_flag,
                   help="optimizer evaluations per search, or auto (default: 40 for "
                        "lorahub/compeft, auto for select*)")
    p.add_argument("--objective", choices=("paper", "lorahub"), default="paper",
                   help="composition objective (default paper)")
    p.add_argument("--optimizer", help="nevergrad optimizer (default: the objective's)")
    add_mix_option(p)
    add_start_option(p)
    add_dtype_option(p)
    p.add_argument("--steps", type=bounded_int(1, MAX_STEPS, "Adam steps"),
                   help="lora-tune/fft: Adam steps on the few shots (default: each method's, "
                        "chosen on the zoo's validation seeds)")
    p.add_argument("--lr", type=finite_float(0, "a learning rate", above=True), help="lora-tune/fft: Adam's learning rate (default: each "
                                            "method's)")
    p.add_argument("--shots", type=bounded_int(1, MAX_SHOTS, "examples"), default=5, help="few-shot examples per cell (default 5)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files (else $LORAHUB_COMPEFT_BBH_DIR, "
                                     "else the Hub's lukaemon/bbh)")
    p.add_argument("--max-eval", type=bounded_int(1, None, "examples"), help="evaluate at most this many examples per cell")
    p.add_argument("--batch-size", type=bounded_int(1, MAX_BATCH, "answers at once"), default=16,
                   help="generation batch (default 16)")
    p.add_argument("--workers", type=bounded_int(1, MAX_WORKERS, "processes"), default=1,
                   help="cells at once: processes (local) or actors (ray), one model each")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--address", help="Ray cluster address with --backend ray (default: start "
                                     "Ray on this machine)")
    p.add_argument("--gpus-per-cell", type=finite_float(0, "GPUs"),
                   help="GPUs each Ray actor asks for (default 1 when the cluster has GPUs, else 0)")
    p.add_argument("--out", required=True, help="results folder")
    add_threads_option(p)
    p.set_defaults(func=cmd_bbh)

    p = sub.add_parser("report", help="print the Table-7-style report of saved BBH results",
                       description="One table per model and data source; a column per method "
                                   "setting, with each setting's parameters listed below it.")
    p.add_argument("out", help="results folder written by `bbh`")
    p.add_argument("--force", action="store_true",
                   help="replace an existing report.md / report.png in that folder")
    p.set_defaults(func=cmd_report)


def cmd_bbh(args, on_cell=None) -> int:
    """Run the cells (runner.run; on_cell reports each one) and print the report."""
    apply_threads(args)
    if args.density is not None and not 0 < args.density <= 1:  # else in every compeft cell
        raise ValueError(f"--density must be in (0, 1], got {args.density}; e.g. 0.1 keeps the "
                         "10% largest entries")
    from lorahub_compeft.eval.bbh import BBH_TASKS
    from lorahub_compeft.eval.methods import METHODS, make_method, method_options
    from lorahub_compeft.eval.pool import ExpertPool
    from lorahub_compeft.eval.report import report
    from lorahub_compeft.io.base_models import check_model_reference
    from lorahub_compeft.eval.cells import plan
    from lorahub_compeft.eval.runner import check_run_folder, run
    from lorahub_compeft.eval.benchmarks import BBHBenchmark
    check_model_reference(args.model)
    names = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods {args.methods!r}: no method {', '.join(map(repr, unknown))}; "
                         f"give a comma-separated list of {', '.join(METHODS)}")
    check_run_folder(args.out)  # before anything is written into it (compressed experts first)
    from lorahub_compeft.eval.expert_lists import experts_from_args
    experts = experts_from_args(list(args.experts), args.experts_file)
    options = {"n_experts": args.n_experts, "restarts": args.restarts, "budget": args.budget,
               "objective": args.objective, "optimizer": args.optimizer, "dtype": args.dtype,
               "mix": args.mix, "start": args.start, "steps": args.steps, "lr": args.lr,
               **{k: getattr(args, k) for k in BBH_COMPRESSION}}
    options = {k: v for k, v in options.items() if v is not None}  # else each method's default
    methods = [make_method(m, **method_options(m, options)) for m in names]
    for method in methods:  # a composing method's settings, checked now and not in its cells
        if hasattr(method.params, "compose_config"):
            method.params.compose_config()
    out = Path(args.out)
    pool = ExpertPool.from_sources(experts, out / "compressed") if experts else None
    cells = plan(BBHBenchmark(args.bbh_dir, args.shots, args.max_eval),
                 list(BBH_TASKS) if args.tasks == "all" else args.tasks.split(","),
                 args.seeds, methods, args.model, pool)
    run(cells, out, workers=args.workers, backend=args.backend, address=args.address,
        gpus_per_cell=args.gpus_per_cell, batch_size=args.batch_size, command=args.argv,
        on_cell=on_cell)
    print(report(out))
    return 0


def cmd_report(args) -> int:
    from lorahub_compeft.eval.report import report
    print(report(args.out, force=args.force))
    return 0


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="compose the shipped zoo's experts on its held-out tasks (offline, minutes)",
        description="The offline demo, on the zoo shipped in the package: a tiny T5\n"
                    "instruction-tuned on 22 upstream tasks, one LoRA expert per upstream task\n"
                    "(dense fp16 and ComPEFT), and 7 held-out tasks the base never saw. Per task\n"
                    "and seed, 5 examples are drawn and N experts sampled; the table compares\n"
                    "the base's zero-shot exact match with composing the dense experts and\n"
                    "composing the ComPEFT experts.",
        epilog="examples:\n  lorahub-compeft demo\n  lorahub-compeft demo --seeds 1-5\n"
               "  lorahub-compeft demo --tasks heldout_pair_total -n 5 --seeds 1\n"
               "  lorahub-compeft demo --bbh-dir path/to/bbh   # also the real BBH examples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="all", help="comma-separated held-out zoo tasks (default all)")
    p.add_argument("--seeds", type=parse_seeds, default=[1], help="e.g. 1-5 (default 1)")
    p.add_argument("--select", choices=("random", "loss"),
                   help="random: LoraHub's protocol, N experts drawn with the seed (default, the "
                        "table in README); loss: the package's, every expert scored alone and "
                        "the N with the lowest few-shot loss composed (ComPEFT at the default "
                        f"compression: k={CompeftOptions().density}, alpha auto, per "
                        "tensor)")
    from lorahub_compeft.eval.methods import METHODS
    p.add_argument("--methods",
                   help="instead of --select's three, these of the runner's methods side by "
                        f"side (comma-separated, of {', '.join(METHODS)}); -n, --budget and "
                        "--mix go to those that take them, compeft compresses at the zoo's "
                        "shipped setting, every other parameter is the method's default")
    p.add_argument("-n", "--n-experts", type=count_option("n_experts"),
                   help="experts to compose (default 20 with --select random, 3 with loss; "
                        "with --methods each method's own)")
    p.add_argument("--budget", type=budget_flag,
                   help="optimizer evaluations per search, or auto (default: 40 with --select "
                        "random, auto with loss; with --methods each method's own)")
    add_mix_option(p)
    add_start_option(p)
    p.add_argument("--eval", type=bounded_int(1, None, "examples"), default=100, dest="n_eval",
                   help="evaluation examples per task (default 100)")
    p.add_argument("--bbh-dir", help="folder of BBH <task>.json files: also run the tasks that "
                                     "mirror BBH on its real examples")
    p.add_argument("--max-bbh-eval", type=bounded_int(1, None, "examples"), help="evaluate at most this many real BBH examples")
    p.add_argument("--zoo", help="zoo artifacts folder (default: the one shipped in the package)")
    p.add_argument("--json", help="also write the per-seed rows as JSON here (a new file)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    add_threads_option(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    apply_threads(args)
    from lorahub_compeft.io.files import atomic_write_text, check_file_target
    from lorahub_compeft.zoo.artifacts import ARTIFACTS, Zoo
    from lorahub_compeft.zoo.demo import check_methods, format_methods_table, format_table, run_demo
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    if methods is not None:  # before loading anything
        check_methods(methods)
        if args.select:
            raise ValueError("--select picks the demo's three methods and --methods names its "
                             "own; give one of them (select or lorahub in --methods)")
    if args.json:  # before minutes of work, not after
        check_file_target(args.json, args.force)
    start = time.perf_counter()
    tasks = None if args.tasks == "all" else args.tasks.split(",")
    zoo = Zoo.load(args.zoo or ARTIFACTS)  # checks every file against the manifest
    from lorahub_compeft.config import DEFAULT_N
    select = args.select or "random"
    n_experts = args.n_experts if methods else args.n_experts or DEFAULT_N[select]
    rows = run_demo(zoo, tasks, args.seeds, n_experts, args.budget, n_eval=args.n_eval,
                    bbh_dir=args.bbh_dir, max_bbh_eval=args.max_bbh_eval, select=select,
                    mix=args.mix, start=args.start, methods=methods)
    if methods:
        print(format_methods_table(rows, methods))
    else:
        c = zoo.compression if select == "random" else dataclasses.asdict(CompeftOptions())
        setting = f"k={c['density']}, α={c['alpha']}" + (", per tensor" if c["per_tensor"] else "")
        setting += "; N chosen by few-shot loss" if select == "loss" else "; N drawn at random"
        setting += f"; mix {args.mix}" if args.mix else ""
        setting += f"; start {args.start}" if args.start else ""
        print(format_table(rows, setting))
    experts = f"N={n_experts} experts" if n_experts else "N each method's default"
    print(f"\n{len(rows)} cells, {experts}, budget {args.budget or 'default'}, "
          f"{f'mix {args.mix}, ' if args.mix else ''}seeds "
          f"{','.join(map(str, args.seeds))}; {time.perf_counter() - start:.0f} s in all")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(rows, indent=1) + "\n")
    return 0
