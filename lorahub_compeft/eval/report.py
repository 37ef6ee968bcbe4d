"""The paper's Table 7 from saved results, grouped by setting: one table per model and data
source, one column per method setting (a method with other parameters or experts is another
column), each column's setting printed under the table."""
from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from lorahub_compeft.eval.runner import (PLOT, PLOT_MARK, REPORT, REPORT_MARK, RESULTS,
                                         is_own_report, read_results)
from lorahub_compeft.io.files import OutputExistsError, atomic_write_bytes, atomic_write_text

# ComPEFT paper, Table 7 averages (flan-t5-large, BBH, 5 seeds, N=20).
PAPER_FLAN_T5_LARGE = {("zeroshot", "avg"): 27.0, ("icl", "avg"): 37.3, ("lorahub", "avg"): 30.5,
                       ("compeft", "avg"): 30.6, ("lorahub", "best"): 37.3, ("compeft", "best"): 36.4}
LABELS = {"zeroshot": "Zero-shot", "icl": "ICL", "lorahub": "LoraHub", "compeft": "ComPEFT"}
ORDER = list(LABELS)


def _setting(row: dict) -> dict:
    """The row's setting; rows written before settings were recorded get what they hold."""
    composed = row["method"] in ("lorahub", "compeft")
    return row.get("setting") or {"method": row["method"], "params": {}, "model": row.get("model", ""),
                                  "experts": {} if composed else None, "data": {}}


def _table_key(s: dict) -> str:
    data = {k: v for k, v in (s.get("data") or {}).items() if k != "sha256"}  # per task file
    return json.dumps({"model": s["model"], "data": data}, sort_keys=True)


def _column_key(s: dict) -> str:
    return json.dumps({k: s.get(k) for k in ("method", "params", "experts")}, sort_keys=True)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _describe(column: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in sorted(column["params"].items()))
    experts = column.get("experts")
    if experts:
        params += (", " if params else "") + (f"{experts['count']} experts "
                                              f"(pool sha256 {experts['pool_sha256'][:12]})")
    return params or "no parameters"


def _table(rows: list[dict]) -> list[str]:
    columns: dict[str, dict] = {}
    cells = defaultdict(lambda: defaultdict(list))  # column -> task -> EMs over seeds
    moved = defaultdict(lambda: defaultdict(list))  # column -> task -> bytes read
    losses = defaultdict(lambda: defaultdict(list))  # column -> task -> (few-shot loss, seed, EM)
    for r in rows:
        s = _setting(r)
        key = _column_key(s)
        columns[key] = {"method": s["method"], "params": s.get("params") or {},
                        "experts": s.get("experts")}
        cells[key][r["task"]].append(r["em"])
        if "bytes_read" in r:
            moved[key][r["task"]].append(r["bytes_read"])
        if "best_loss" in r:
            losses[key][r["task"]].append((r["best_loss"], r["seed"], r["em"]))
    order = sorted(columns, key=lambda k: (ORDER.index(columns[k]["method"])
                                           if columns[k]["method"] in ORDER else len(ORDER), k))
    count = defaultdict(int)
    for k in order:  # a method with several settings gets numbered columns
        count[columns[k]["method"]] += 1
        m = columns[k]["method"]
        columns[k]["label"] = LABELS.get(m, m) + (f" [{count[m]}]" if count[m] > 1 else "")
    # Composed methods: the seed average, the seed a user could pick (lowest few-shot loss, no
    # evaluation data; rows that record the loss) and the oracle best seed (picked on the evaluation data, as the papers'
    # "best" columns are).
    composed = [k for k in order if columns[k]["experts"] is not None]
    shown = [(k, "avg") for k in order] + [(k, "loss-picked") for k in composed if losses[k]] + \
        [(k, "best") for k in composed]
    tasks = sorted({r["task"] for r in rows})

    def value(k, kind, task):
        v = cells[k].get(task)
        if kind == "loss-picked":
            return min(losses[k][task])[2] if losses[k].get(task) else None
        return None if not v else (mean(v) if kind == "avg" else max(v))

    names = {"avg": "avg", "loss-picked": "loss-picked", "best": "oracle best"}
    heads = [columns[k]["label"] + (f" ({names[kind]})" if columns[k]["experts"] is not None else "")
             for k, kind in shown]
    lines = ["| Task | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(shown)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_fmt(value(k, kind, task)) for k, kind in shown) + " |")
    averages = []
    for k, kind in shown:
        values = [v for t in tasks if (v := value(k, kind, t)) is not None]
        averages.append(mean(values) if values else None)
    lines.append("| **Average** | " + " | ".join(f"**{_fmt(a)}**" for a in averages) + " |")
    methods = [columns[k]["method"] for k in order]
    if _setting(rows[0])["model"].endswith("flan-t5-large") and len(set(methods)) == len(methods):
        lines.append("| *Paper (Table 7)* | " + " | ".join(
            _fmt(PAPER_FLAN_T5_LARGE.get((columns[k]["method"], kind))) for k, kind in shown) + " |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append(f"\nExact match (%), {len(tasks)} tasks, seeds {seeds}. Settings:")
    lines += [f"- {columns[k]['label']}: {_describe(columns[k])}" for k in order]
    with_bytes = [k for k in order if moved[k]]
    if with_bytes:
        lines += ["", "| Task | " + " | ".join(f"{columns[k]['label']} bytes/cell" for k in with_bytes)
                  + " |", "|---|" + "---|" * len(with_bytes)]
        for task in tasks:
            lines.append(f"| {task} | " + " | ".join(
                f"{mean(moved[k][task]):.0f}" if moved[k][task] else "–" for k in with_bytes) + " |")
    return lines


def markdown(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[_table_key(_setting(r))].append(r)
    parts = []
    for key, group in groups.items():
        head = json.loads(key)
        data = ", ".join(f"{k}={v}" for k, v in head["data"].items()) or "unrecorded"
        parts.append("\n".join([f"### {head['model']} (data: {data})", ""] + _table(group)))
    return "\n\n".join(parts)


def plot(rows: list[dict], path: Path) -> Path | None:
    """A bar chart of the average EM per method setting (marked as the report's by a text
    chunk); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s = _setting(r)
        by[(s["method"], _describe({"params": s.get("params") or {}, "experts": None}))][r["task"]].append(r["em"])
    labels = [f"{LABELS.get(m, m)}\n{d}" if len(by) > len({m for m, _ in by}) else LABELS.get(m, m)
              for m, d in by]
    values = [mean(mean(v) for v in tasks.values()) for tasks in by.values()]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(values)), 3.8))
    ax.bar(labels, values, color="#4878a8")
    ax.set_ylim(0, max(values + [1.0]) * 1.15)  # a zero row must still show an axis from 0
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("exact match (%)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120, metadata={"Description": PLOT_MARK})
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path


def _check_report_target(path: Path, force: bool) -> None:
    """The report replaces its own files; a file it did not write only with `force`, and never
    a folder or a link."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputExistsError(f"{path}: is a folder or a link, not a report this wrote; move "
                                "it away")
    if path.exists() and not force and not is_own_report(path):
        raise OutputExistsError(f"{path}: already exists and was not written by the report; "
                                "move it away or pass --force to replace it")


def report(out_dir: str | Path, force: bool = False) -> str:
    """The report of OUT's results: written to OUT/report.md (and report.png), returned as text.
    A report.md / report.png the report did not write is replaced only with `force`."""
    out_dir = Path(out_dir)
    for name in (REPORT, PLOT):
        _check_report_target(out_dir / name, force)
    rows = read_results(out_dir / RESULTS)
    if not rows:
        raise ValueError(f"{out_dir}: no results yet ({RESULTS} missing or empty); run "
                         "`lorahub-compeft bbh --out` first")
    text = markdown(rows)
    atomic_write_text(out_dir / REPORT, REPORT_MARK + "\n" + text + "\n")
    if plot(rows, out_dir / PLOT) is None:
        text += '\n\n(pip install -e ".[plot]" for report.png)'
    return text
