"""The measured tables of README's "Other codecs, merging and full fine-tuning" section, on the
shipped zoo.

    python scripts/codec_tables.py codecs --seeds 1-5 --json codecs.json   # codec table
    python scripts/codec_tables.py merge --json merge.json                 # merging table
    python scripts/codec_tables.py fullft --json fullft.json               # full fine-tuning

codecs: per codec and setting, every zoo expert compressed and saved (whole-file bytes), the
mean relative error of each module's B·A, and LoraHub composition on the 7 held-out tasks with
the demo's protocol (per seed: 5 shots and N=20 experts drawn with the seed, 100 evaluation
examples, budget 40).
merge: one family's experts merged (task arithmetic, TIES) from dense, ComPEFT and ERE experts;
λ (and TIES's density) chosen on validation examples (the zoo's validation seed), EM reported
on each upstream task's test examples (a seed no other zoo table uses), with the instruction.
fullft: the zoo base fully fine-tuned on one upstream task for a few hundred steps, its residual
θ_ft − θ_base stored with each codec, EM of the reconstructed model on the task.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorahub_compeft.io.adapters import WEIGHTS_NAME, load_adapter
from lorahub_compeft.cli.options import parse_seeds
from lorahub_compeft.compose.composer import compose
from lorahub_compeft.eval.bbh import accuracy
from lorahub_compeft.io.models import generate as generate_answers, load_model
from lorahub_compeft.store.expert import compress, load_expert
from lorahub_compeft.merge import merge
from lorahub_compeft.zoo.demo import task_data
from zoo_build.ship import ARTIFACTS, VAL_SEED
from lorahub_compeft.zoo.tasks import generate, task_names

TEST_SEED = 6_000  # upstream test examples for merging / full FT: no other zoo table draws it
SHIPPED = {"density": 0.2, "alpha": 3}  # the zoo manifest's ComPEFT setting
SETTINGS = {  # id -> (label, compress() options); None = the dense fp16 experts themselves
    "dense": ("fp16 dense", None),
    "ere-full": ("ERE full rank, fp16 factors (refactorized, lossless)",
                 {"codec": "ere", "budget_bits": 17, "quant_bits": 16}),
    "compeft-pt": ("ComPEFT per-tensor k=0.2 α=3 (shipped)", dict(SHIPPED, per_tensor=True)),
    "compeft-pt-bitmask": ("ComPEFT per-tensor k=0.2 α=3, bitmask",
                           dict(SHIPPED, per_tensor=True, encoding="bitmask")),
    "compeft-global": ("ComPEFT global k=0.2 α=3", dict(SHIPPED, per_tensor=False)),
    "ere-2-int4": ("ERE 2 bits/param, int4", {"codec": "ere", "budget_bits": 2, "quant_bits": 4}),
    "ere-1-int4": ("ERE 1 bit/param, int4", {"codec": "ere", "budget_bits": 1, "quant_bits": 4}),
    "ere-1-int8": ("ERE 1 bit/param, int8", {"codec": "ere", "budget_bits": 1, "quant_bits": 8}),
    "ere-0.5-int4": ("ERE 0.5 bits/param, int4",
                     {"codec": "ere", "budget_bits": 0.5, "quant_bits": 4}),
}
log = logging.getLogger("codec_tables")


def exact_match(model, tokenizer, examples: list[dict]) -> float:
    answers = generate_answers(model, tokenizer, [e["input"] for e in examples], 8, 64)
    return 100 * accuracy(answers, [e["target"] for e in examples], str.__eq__)


def module_products(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()
            for k in tensors if "lora_A" in k}


def relative_error(decoded: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> float:
    """Mean over modules of ‖B̂Â − BA‖_F / ‖BA‖_F (the scaling s cancels)."""
    want, got = module_products(original), module_products(decoded)
    return statistics.fmean(float((got[k] - w).norm() / w.norm()) for k, w in want.items())


# --- codecs ---------------------------------------------------------------------------------------
def codec_experts(names: list[str], setting: dict | None, workdir: Path) -> tuple[dict, dict]:
    """{name: what compose takes} and facts (bytes, error) for one setting."""
    dense = {n: ARTIFACTS / "dense" / n for n in names}
    if setting is None:
        sizes = [(dense[n] / WEIGHTS_NAME).stat().st_size for n in names]
        return dense, {"bytes": statistics.fmean(sizes), "rel_error": 0.0}
    experts, sizes, errors = {}, [], []
    for n in names:
        adapter = load_adapter(dense[n])
        path = compress(adapter, name=n, **setting).save(workdir / f"{n}.safetensors", force=True)
        expert = load_expert(path)
        sizes.append(path.stat().st_size)
        errors.append(relative_error(expert.state_dict(), adapter.tensors))
        experts[n] = expert
    return experts, {"bytes": statistics.fmean(sizes), "rel_error": statistics.fmean(errors)}


def composable(expert):
    """ERE experts go to the composer as their decoded LoRA factors (a dense stack)."""
    return expert.to_adapter() if getattr(expert, "codec", "compeft") == "ere" else expert


# Same selection, signs and scales as the golomb file: decoded bit for bit alike (a test checks
# it), so composition gives the same EM and only the bytes are measured.
SAME_TENSORS = {"compeft-pt-bitmask": "compeft-pt"}


def codecs_table(seeds: list[int], n_experts: int, budget: int, settings: list[str],
                 save=lambda rows: None) -> list[dict]:
    base, tokenizer = load_model(str(ARTIFACTS / "base"))
    names = sorted(p.name for p in (ARTIFACTS / "dense").iterdir())
    from lorahub_compeft.store.library import ExpertLibrary
    sampler = ExpertLibrary(ARTIFACTS / "experts", create=False)  # the demo's draw of experts
    rows = []
    for key in settings:
        label, setting = SETTINGS[key]
        with tempfile.TemporaryDirectory() as tmp:
            experts, facts = codec_experts(names, setting, Path(tmp))
            ems: dict[str, list[float]] = {}
            start = time.perf_counter()
            twin = next((r for r in rows if r["key"] == SAME_TENSORS.get(key)), None)
            if twin:
                ems = twin["per_task"]
            for task in task_names("heldout") if twin is None else ():
                for seed in seeds:
                    few, rest = task_data(task, seed, 5, 100)
                    chosen = [composable(experts[n]) for n in sampler.sample(n_experts, seed)]
                    result = compose(chosen, few, base, tokenizer=tokenizer, n_experts=len(chosen),
                                     seed=seed, budget=budget, progress=False)
                    answers = result.generate([e["input"] for e in rest], 8, 64)
                    ems.setdefault(task, []).append(
                        100 * accuracy(answers, [e["target"] for e in rest], str.__eq__))
        row = dict(setting=label, key=key, **facts, em=statistics.fmean(statistics.fmean(v) for v in ems.values()),
                   seed_std=statistics.fmean(statistics.stdev(v) if len(v) > 1 else 0.0
                                             for v in ems.values()),
                   per_task=ems, seconds=time.perf_counter() - start)
        log.info("%s: %.0f B, error %.3f, EM %.1f", label, row["bytes"], row["rel_error"], row["em"])
        rows.append(row)
        save(rows)
    return rows


def format_codecs(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["key"] == "dense")
    lines = ["| codec and setting | bytes/expert (file) | vs fp16 | mean rel. error of B·A | "
             "composition EM (7 tasks × seeds) | mean seed std |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        lines.append(f"| {r['setting']} | {r['bytes'] / 1e3:.1f} KB | {dense['bytes'] / r['bytes']:.1f}x | "
                     f"{r['rel_error']:.3f} | {r['em']:.1f} | {r['seed_std']:.1f} |")
    smaller = [r for r in rows if r["bytes"] < dense["bytes"]]
    close = [r for r in smaller if r["em"] >= dense["em"] - 3]
    if close:
        best = min(close, key=lambda r: r["bytes"])
        lines.append(f"\nSmallest within 3 EM of dense ({dense['em']:.1f}): **{best['setting']}**, "
                     f"{best['bytes'] / 1e3:.1f} KB, {best['em']:.1f} EM.")
    elif smaller:
        best = max(smaller, key=lambda r: r["em"])
        lines.append(f"\nNo smaller setting is within 3 EM of dense ({dense['em']:.1f}); the "
                     f"closest is **{best['setting']}**, {best['bytes'] / 1e3:.1f} KB, "
                     f"{best['em']:.1f} EM ({best['em'] - dense['em']:+.1f}).")
    return "\n".join(lines)


def quant_table(budgets=(0.5, 1, 2, 4, 8)) -> str:
    """ERE's factor quantization at equal bytes: mean relative error of B·A over the zoo's
    experts, and the share of the spectrum's energy the allocated ranks keep."""
    names = sorted(p.name for p in (ARTIFACTS / "dense").iterdir())
    adapters = {n: load_adapter(ARTIFACTS / "dense" / n) for n in names}
    lines = ["| budget (bits/param) | " + " | ".join(f"int{b} error (energy kept, mean rank)" if b < 16
                                                   else "fp16 error (energy kept, mean rank)"
                                                   for b in (4, 8, 16)) + " |", "|---|---|---|---|"]
    for budget in budgets:
        cells = []
        for bits in (4, 8, 16):
            experts = [compress(adapters[n], codec="ere", budget_bits=budget, quant_bits=bits)
                       for n in names]
            error = statistics.fmean(relative_error(e.state_dict(), adapters[n].tensors)
                                     for e, n in zip(experts, names))
            kept = statistics.fmean(e.meta["ere"]["energy_kept"] for e in experts)
            rank = statistics.fmean(statistics.fmean(e.meta["ere"]["ranks"]) for e in experts)
            cells.append(f"{error:.3f} ({100 * kept:.0f}%, {rank:.1f})")
        lines.append(f"| {budget:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_terms() -> str:
    """Why LoraHub's separate mixing of A and B cares how an expert is factorized: the mixed
    module (Σ w_i B_i)(Σ w_j A_j) holds the cross terms B_i·A_j. Their size relative to the
    experts' own products, mean over modules and pairs of the zoo's experts, for the trained
    factors, ComPEFT's and ERE's (full rank, fp16: the same products, refactorized)."""
    names = sorted(p.name for p in (ARTIFACTS / "dense").iterdir())
    kinds = {"trained LoRA factors (fp16 dense)": None,
             "ComPEFT per-tensor k=0.2 α=3": dict(SHIPPED, per_tensor=True),
             "ERE full rank, fp16 factors": {"codec": "ere", "budget_bits": 17, "quant_bits": 16},
             "ERE 1 bit/param, int4": {"codec": "ere", "budget_bits": 1, "quant_bits": 4}}
    lines = ["| factors | mean ‖B_i·A_j‖ / √(‖B_i·A_i‖·‖B_j·A_j‖), i ≠ j |", "|---|---|"]
    for label, setting in kinds.items():
        states = []
        for n in names:
            adapter = load_adapter(ARTIFACTS / "dense" / n)
            states.append(adapter.tensors if setting is None else
                          compress(adapter, **setting).state_dict())
        ratios = []
        for key in (k for k in states[0] if "lora_A" in k):
            b_key = key.replace("lora_A", "lora_B")
            a = [s[key].double() for s in states]
            b = [s[b_key].double() for s in states]
            own = [float((bi @ ai).norm()) for ai, bi in zip(a, b)]
            ratios += [float((b[i] @ a[j]).norm()) / (own[i] * own[j]) ** 0.5
                       for i in range(len(a)) for j in range(len(a)) if i != j and own[i] * own[j] > 0]
        lines.append(f"| {label} | {statistics.fmean(ratios):.3f} |")
    return "\n".join(lines)


# --- merging --------------------------------------------------------------------------------------
def apply_adapter(base, adapter) -> torch.nn.Module:
    """A copy of the base with s·B·A added to each LoRA module's weight (a merged model)."""
    import copy
    model = copy.deepcopy(base)
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    for key, delta in module_products(adapter.tensors).items():
        module = model.get_submodule(key.removeprefix("base_model.model.")
                                     .removesuffix(".lora_A.weight"))
        module.weight.data += (scale * delta).to(module.weight.dtype)
    return model.eval()


def family_tasks(family: str) -> list[str]:
    return [t for t in task_names("upstream") if t.startswith(family + "_")]


def merge_table(families: list[str], n_eval: int) -> list[dict]:
    base, tokenizer = load_model(str(ARTIFACTS / "base"))
    sources = {"fp16 dense": None, "ComPEFT per-tensor k=0.2 α=3": dict(SHIPPED, per_tensor=True),
               "ERE 1 b/p int4": {"codec": "ere", "budget_bits": 1, "quant_bits": 4}}
    lams = (0.25, 0.5, 1.0)
    grid = {"task_arithmetic": [{"lam": l} for l in lams],
            "ties": [{"lam": l, "density": d} for l in lams for d in (0.2, 0.5)]}
    rows = []
    for family in families:
        tasks = family_tasks(family)
        val = {t: generate(t, n_eval, seed=VAL_SEED) for t in tasks}
        test = {t: generate(t, n_eval, seed=TEST_SEED) for t in tasks}
        score = lambda model, data: {t: exact_match(model, tokenizer, data[t]) for t in tasks}
        rows.append(dict(family=family, source="base (no expert)", method="-", **{"test": score(base, test)}))
        rows.append(dict(family=family, source="each task's own expert (fp16)", method="-", test={
            t: exact_match(apply_adapter(base, load_adapter(ARTIFACTS / "dense" / t)), tokenizer,
                           test[t]) for t in tasks}))
        for label, setting in sources.items():
            with tempfile.TemporaryDirectory() as tmp:
                experts, _ = codec_experts(tasks, setting, Path(tmp))
                experts = [experts[t] for t in tasks]
                for method, options in grid.items():
                    tried = []
                    for opt in options:
                        weights = [opt["lam"] * (1 / len(tasks) if method == "task_arithmetic" else 1)] * len(tasks)
                        merged = merge(experts, method, weights, opt.get("density", 0.2))
                        val_em = statistics.fmean(score(apply_adapter(base, merged.adapter), val).values())
                        tried.append((val_em, opt, merged))
                    val_em, opt, merged = max(tried, key=lambda x: x[0])
                    rows.append(dict(family=family, source=label, method=method, choice=opt,
                                     val=val_em, energy_kept=merged.energy_kept,
                                     test=score(apply_adapter(base, merged.adapter), test)))
                    log.info("%s %s %s %s: %s", family, label, method, opt, rows[-1]["test"])
    return rows


def format_merge(rows: list[dict]) -> str:
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        tasks = list(fam[0]["test"])
        out += [f"| {family}: experts merged from | method (λ, density chosen on validation) | "
                + " | ".join(tasks) + " | mean |", "|---|---|" + "---|" * (len(tasks) + 1)]
        for r in fam:
            choice = r.get("choice")
            how = r["method"] if not choice else f"{r['method']} (λ={choice['lam']}" + (
                f", k={choice['density']}" if "density" in choice else "") + ")"
            if r.get("energy_kept", 1) < 0.999:
                how += f", rank 24 keeps {100 * r['energy_kept']:.0f}%"
            out.append(f"| {r['source']} | {how} | " + " | ".join(f"{r['test'][t]:.0f}" for t in tasks)
                       + f" | {statistics.fmean(r['test'].values()):.1f} |")
        out.append("")
    return "\n".join(out)


# --- full fine-tuning -----------------------------------------------------------------------------
FULLFT_SETTINGS = {
    "ComPEFT per-tensor k=0.1": {"density": 0.1, "per_tensor": True},
    "ComPEFT per-tensor k=0.2": {"density": 0.2, "per_tensor": True},
    "ERE 1 bit/param, int4": {"codec": "ere", "budget_bits": 1, "quant_bits": 4},
    "ERE 2 bits/param, int4": {"codec": "ere", "budget_bits": 2, "quant_bits": 4},
    "ERE 4 bits/param, int8": {"codec": "ere", "budget_bits": 4, "quant_bits": 8},
}
ALPHAS = (1, 2, 3, 5)  # ComPEFT's α for each k, chosen on validation examples


def fine_tune(task: str, out: Path, steps: int, lr: float, batch_size: int = 32) -> Path:
    """The zoo base fully fine-tuned on one upstream task (all parameters, AdamW)."""
    import random
    from zoo_build.build import _train, batches, encode
    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model, tokenizer = load_model(str(ARTIFACTS / "base"))
    pairs = encode(tokenizer, generate(task, steps * batch_size // 4, seed=TEST_SEED + 1))
    params = [p for p in model.parameters()]
    _train(model, params, batches(pairs, batch_size, random.Random(0)), steps, lr, 20, task)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def fullft_table(task: str, steps: int, lr: float, n_eval: int, workdir: Path) -> list[dict]:
    from lorahub_compeft.io.residuals import apply_residual, residual_adapter
    tuned_dir = fine_tune(task, workdir / f"fullft-{task}-{steps}-{lr:g}", steps, lr)
    base, tokenizer = load_model(str(ARTIFACTS / "base"))
    tuned, _ = load_model(str(tuned_dir))
    val, test = generate(task, n_eval, seed=VAL_SEED), generate(task, n_eval, seed=TEST_SEED)
    numel = sum(t.numel() for t in base.state_dict().values())
    fp16 = 2 * sum(t.numel() for t in load_state_dict_file(tuned_dir).values())
    rows = [{"setting": "base (not fine-tuned)", "bytes": None, "em": exact_match(base, tokenizer, test)},
            {"setting": "fully fine-tuned, fp16 residual", "bytes": fp16,
             "em": exact_match(tuned, tokenizer, test)}]
    adapter = residual_adapter(tuned_dir, ARTIFACTS / "base")

    def em_of(expert, data):
        import copy
        model = copy.deepcopy(base)
        apply_residual(model, expert.state_dict())
        return exact_match(model.eval(), tokenizer, data)

    for label, setting in FULLFT_SETTINGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            if setting.get("codec") == "ere":
                choice, expert = {}, compress(adapter, **setting)
            else:
                tried = [(em_of(e := compress(adapter, alpha=a, **setting), val), a, e) for a in ALPHAS]
                _, alpha, expert = max(tried, key=lambda x: x[0])
                choice = {"alpha": alpha}
            path = expert.save(Path(tmp) / "r.safetensors")
            rows.append({"setting": label + (f" α={choice['alpha']}" if choice else ""),
                         "bytes": path.stat().st_size, "em": em_of(load_expert(path), test)})
        log.info("%s", rows[-1])
    for r in rows:
        r.update(task=task, steps=steps, lr=lr, numel=numel)
    return rows


def load_state_dict_file(directory: Path) -> dict[str, torch.Tensor]:
    from lorahub_compeft.io.residuals import load_state
    return load_state(directory)


def format_fullft(rows: list[dict]) -> str:
    fp16 = next(r["bytes"] for r in rows if r["bytes"])
    lines = [f"| {rows[0]['task']}, {rows[0]['steps']} steps of full fine-tuning (lr {rows[0]['lr']:g}) "
             "| bytes | vs fp16 | "
             "EM on the task |", "|---|---|---|---|"]
    for r in rows:
        size = f"{r['bytes'] / 1e3:.1f} KB | {fp16 / r['bytes']:.1f}x" if r["bytes"] else "- | -"
        lines.append(f"| {r['setting']} | {size} | {r['em']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="table", required=True)
    p = sub.add_parser("codecs")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3, 4, 5])
    p.add_argument("-n", "--n-experts", type=int, default=20)
    p.add_argument("--budget", type=int, default=40)
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated subset of: " + ", ".join(SETTINGS))
    p.add_argument("--json")
    p = sub.add_parser("merge")
    p.add_argument("--families", default="dyck")
    p.add_argument("--eval", type=int, default=100, dest="n_eval")
    p.add_argument("--json")
    p = sub.add_parser("fullft")
    p.add_argument("--task", default="list_count")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval", type=int, default=100, dest="n_eval")
    p.add_argument("--workdir", default=tempfile.gettempdir(),
                   help="where the fine-tuned model is kept between runs")
    p.add_argument("--json")
    sub.add_parser("quant", help="ERE: 4- against 8-bit factors at equal bytes")
    sub.add_parser("cross", help="size of LoraHub's cross terms B_i·A_j per factorization")
    p = sub.add_parser("format", help="print the codec table from JSON files of `codecs` runs")
    p.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    if args.table in ("quant", "cross"):
        print(quant_table() if args.table == "quant" else cross_terms())
        return 0
    if args.table == "format":
        print(format_codecs([r for f in args.files for r in json.loads(Path(f).read_text())]))
        return 0
    if args.table == "fullft":
        rows = fullft_table(args.task, args.steps, args.lr, args.n_eval, Path(args.workdir))
        print(format_fullft(rows))
    elif args.table == "codecs":
        save = lambda rows: args.json and Path(args.json).write_text(
            json.dumps(rows, indent=1, default=str) + "\n")
        rows = codecs_table(args.seeds, args.n_experts, args.budget, args.settings.split(","), save)
        print(format_codecs(rows))
    else:
        rows = merge_table(args.families.split(","), args.n_eval)
        print(format_merge(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
