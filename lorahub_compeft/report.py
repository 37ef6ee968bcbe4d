"""The paper's Table 7 from saved BBH results: EM per task and method, averages, bytes moved."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from .runner import RESULTS, read_jsonl

# ComPEFT paper, Table 7 averages (flan-t5-large, BBH, 5 seeds, N=20).
PAPER_FLAN_T5_LARGE = {"zeroshot": 27.0, "icl": 37.3, "lorahub": 30.5, "compeft": 30.6,
                       "lorahub_best": 37.3, "compeft_best": 36.4}
# avg: the seed average; picked: the seed with the lowest few-shot loss (no evaluation data);
# best: the oracle best seed, picked on the evaluation data, as the papers' "best" columns are.
COLUMNS = [("zeroshot", "avg", "Zero-shot"), ("icl", "avg", "ICL"),
           ("lorahub", "avg", "LoraHub (avg)"), ("compeft", "avg", "ComPEFT (avg)"),
           ("select", "avg", "Select (avg)"), ("select-compeft", "avg", "Select ComPEFT (avg)"),
           ("lorahub", "picked", "LoraHub (loss-picked)"),
           ("compeft", "picked", "ComPEFT (loss-picked)"),
           ("select", "picked", "Select (loss-picked)"),
           ("select-compeft", "picked", "Select ComPEFT (loss-picked)"),
           ("lorahub", "best", "LoraHub (oracle best)"), ("compeft", "best", "ComPEFT (oracle best)"),
           ("select", "best", "Select (oracle best)"),
           ("select-compeft", "best", "Select ComPEFT (oracle best)")]


def summarize(rows: list[dict]) -> dict[str, dict[tuple[str, str], float]]:
    """task -> (method, avg|picked|best) -> EM over seeds."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["task"]][r["method"]].append(r)
    out = {}
    for task, methods in by.items():
        out[task] = {}
        for m, rs in methods.items():
            ems = [r["em"] for r in rs]
            out[task][(m, "avg")] = mean(ems)
            out[task][(m, "best")] = max(ems)
            lossy = [r for r in rs if r.get("best_loss") is not None]
            if lossy:
                out[task][(m, "picked")] = min(lossy, key=lambda r: r["best_loss"])["em"]
    return out


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(rows: list[dict]) -> str:
    table = summarize(rows)
    tasks = sorted(table)
    methods = {r["method"] for r in rows}
    columns = [c for c in COLUMNS if c[0] in methods and any(c[:2] in table[t] for t in table)]
    lines = ["| Task | " + " | ".join(c[2] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_fmt(table[task].get(c[:2])) for c in columns) + " |")
    averages = []
    for c in columns:
        values = [table[t][c[:2]] for t in tasks if c[:2] in table[t]]
        averages.append(mean(values) if values else None)
    lines.append("| **Average** | " + " | ".join(f"**{_fmt(a)}**" for a in averages) + " |")
    models = {r.get("model", "") for r in rows}
    if any(m.endswith("flan-t5-large") for m in models):
        paper = [PAPER_FLAN_T5_LARGE.get(c[0] if c[1] == "avg" else f"{c[0]}_best") for c in columns]
        lines.append("| *Paper (Table 7)* | " + " | ".join(_fmt(p) for p in paper) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"\nExact match (%), {len(tasks)} tasks, seeds {seeds}.")

    moved = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "bytes_read" in r:
            moved[r["task"]][r["method"]].append(r["bytes_read"])
    if moved:
        lines += ["", "| Task | LoraHub bytes/cell | ComPEFT bytes/cell | Ratio |", "|---|---|---|---|"]
        for task in sorted(moved):
            dense = mean(moved[task]["lorahub"]) if moved[task]["lorahub"] else None
            small = mean(moved[task]["compeft"]) if moved[task]["compeft"] else None
            ratio = f"{dense / small:.1f}x" if dense and small else "–"
            cells = [f"{b:.0f}" if b else "–" for b in (dense, small)]
            lines.append(f"| {task} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """A bar chart of the average EM per method; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = summarize(rows)
    columns = [c for c in COLUMNS if any(c[:2] in v for v in table.values())]
    values = [mean(v[c[:2]] for v in table.values() if c[:2] in v) for c in columns]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([c[2] for c in columns], values, color="#4878a8")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)  # a zero row must still show an axis from 0
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("BBH exact match (%)")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    rows = read_jsonl(out_dir / RESULTS)
    if not rows:
        raise ValueError(f"{out_dir}: no results yet ({RESULTS} missing or empty); run "
                         "`lorahub-compeft bbh --out` first")
    text = markdown(rows)
    (out_dir / "report.md").write_text(text + "\n")
    if plot(rows, out_dir / "report.png") is None:
        text += "\n\n(install lorahub-compeft[plot] for report.png)"
    return text
