"""The one experiment runner: cells of (task, seed, method) over a task source, run in one
process, a pool of processes, or Ray actors, each worker keeping its model between cells.

Each cell's *setting* is everything its result depends on: task, seed, the method and all its
parameters, the model, the pool of experts (names and file hashes or Hub revisions) and the
data source. Its hash is the cell's key: with `out`, every finished cell is one line of
results.jsonl (its predictions one line of predictions.jsonl, written first), and a rerun
skips the keys already there, so a rerun with any other setting computes new cells and keeps
the old ones.

`out` is a run folder: one the runner made (its config.json says so), or a new or empty one;
anything else is refused, so a user's files are never written over. A line a crash cut (a torn
line) is dropped from the file with a warning; any other line the runner cannot use (a
hand-edited row) is skipped with a warning and kept as it is.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from lorahub_compeft.config import count_problem
from lorahub_compeft.eval.cells import Cell, setting_key
from lorahub_compeft.eval.worker import Worker, pool_init, pool_run
from lorahub_compeft.io.adapters import is_finite_number
from lorahub_compeft.io.files import (MAX_JSONL_BYTES, OutputExistsError, atomic_write_text,
                                      read_json, read_text)
from lorahub_compeft.io.threads import choose_threads

RESULTS, PREDICTIONS, CONFIG = "results.jsonl", "predictions.jsonl", "config.json"
REPORT, PLOT = "report.md", "report.png"
RUN_FORMAT = "lorahub-compeft bbh run"  # OUT/config.json's "format": the runner made OUT
REPORT_MARK = "<!-- written by lorahub-compeft (bbh / report); `lorahub-compeft report` rewrites it -->"
PLOT_MARK = "lorahub-compeft report"  # report.png's Description text chunk
RUN_NAMES = (RESULTS, PREDICTIONS, CONFIG, REPORT, PLOT, "compressed")  # all a run folder holds
ROW_START = '{"key": "'  # how every line the runner writes begins
log = logging.getLogger(__name__)


# --- results files ------------------------------------------------------------------------------
def read_lines(path: Path) -> list[str]:
    """The file's lines, each with its newline (the last may lack one); none when it is
    missing. Read with io.files.read_text's cap: a device, a pipe or a file larger than
    MAX_JSONL_BYTES is refused, not read."""
    if not path.exists() and not path.is_symlink():
        return []
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (a link to a device, a pipe, a folder or a "
                         "dangling link); a run writes a plain file there: move it away")
    parts = read_text(path, MAX_JSONL_BYTES).split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def parse_line(line: str) -> tuple[str, dict | None]:
    """("row", the object) for a whole JSON object; ("torn", None) for a line of the runner's
    that a crash cut (it begins as the runner's lines do, but is not whole); ("blank", None);
    ("foreign", None) for anything else."""
    if not line.strip():
        return "blank", None
    try:
        row = json.loads(line) if line.endswith("\n") else None
    except (ValueError, RecursionError):
        row = None
    if isinstance(row, dict):
        return "row", row
    text = line.rstrip("\n")
    return ("torn" if text.startswith(ROW_START) or ROW_START.startswith(text) else "foreign"), None


def _setting_problem(s) -> str | None:
    if not isinstance(s, dict):
        return "'setting' is not an object"
    if not isinstance(s.get("method"), str) or not isinstance(s.get("model"), str):
        return "'setting' lacks its method or model name"
    if not isinstance(s.get("params") or {}, dict) or not isinstance(s.get("data") or {}, dict):
        return "'setting' has params or data that are not objects"
    experts = s.get("experts")
    if experts and not (isinstance(experts, dict) and isinstance(experts.get("count"), int)
                        and isinstance(experts.get("pool_sha256"), str)):
        return "'setting' has experts without their count and pool_sha256"
    return None


def row_problem(row: dict) -> str | None:
    """What makes a results row unusable (hand-edited, or not the runner's), or None: the
    fields the runner and the report read, with their types."""
    if "key" in row and not isinstance(row["key"], str):
        return "its 'key' is not a string"
    for name in ("task", "method"):
        if not isinstance(row.get(name), str):
            return f"its '{name}' is missing or not a string"
    if not isinstance(row.get("seed"), int) or isinstance(row["seed"], bool):
        return "its 'seed' is missing or not a whole number"
    for name in ("em", "bytes_read", "best_loss"):
        if (name == "em" or name in row) and not is_finite_number(row.get(name)):
            return f"its '{name}' is missing or not a number"
    if row.get("setting") and (problem := _setting_problem(row["setting"])):
        return problem
    if "model" in row and not isinstance(row["model"], str):
        return "its 'model' is not a string"
    return None


def _results(path: Path, lines: list[str]) -> list[dict]:
    """The usable rows of a results file's lines; a warning for each other line."""
    rows = []
    for number, line in enumerate(lines, 1):
        kind, row = parse_line(line)
        problem = {"torn": "a torn line (a run was killed while writing it)",
                   "foreign": "not a JSON object"}.get(kind)
        if kind == "row":
            problem = row_problem(row)
            if problem is None:
                rows.append(row)
                continue
            problem = f"a row that cannot be used: {problem}"
        if problem:
            log.warning("%s:%d: skipped %s", path, number, problem)
    return rows


def read_results(path: Path) -> list[dict]:
    """The usable rows of a results file; every other line skipped with a warning."""
    return _results(path, read_lines(path))


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as handle:  # one write of one line: O_APPEND keeps lines whole
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _drop_lines(path: Path, lines: list[str], drop) -> None:
    """Rewrite the file without the lines `drop` picks, every other line exactly as it was."""
    kept = [line for line in lines if not drop(line)]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


def _open_results(out: Path) -> list[dict]:
    """The finished rows. Torn lines are dropped from both files, and so are predictions whose
    result line never got written (a kill between the two appends), so a rerun does not repeat
    them; every other line stays."""
    lines = read_lines(out / RESULTS)
    results = _results(out / RESULTS, lines)
    _drop_lines(out / RESULTS, lines, lambda line: parse_line(line)[0] == "torn")
    done = {r["key"] for r in results if "key" in r}

    def orphan(line: str) -> bool:
        kind, row = parse_line(line)
        return kind == "torn" or kind == "row" and isinstance(row.get("key"), str) \
            and row["key"] not in done
    _drop_lines(out / PREDICTIONS, read_lines(out / PREDICTIONS), orphan)
    return results


# --- the run folder -----------------------------------------------------------------------------
def is_own_report(path: Path) -> bool:
    """report.md / report.png as the report writes them (its marker line / text chunk)."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if path.name == PLOT:
        return PLOT_MARK.encode() in head
    return head.startswith(REPORT_MARK.encode())


def _history(out: Path) -> list:
    """The commands recorded in OUT/config.json; refused when the file is not the runner's."""
    path = out / CONFIG
    if not path.exists() and not path.is_symlink():
        return []
    try:
        config = read_json(path)
    except (OSError, ValueError) as err:
        raise OutputExistsError(f"{err}; this is not a run folder bbh made: choose a new or "
                                "empty folder for --out") from None
    # config.json as bbh wrote it before it marked its folders: {"runs": [...]} alone
    legacy = isinstance(config, dict) and set(config) == {"runs"}
    if not (isinstance(config, dict) and (config.get("format") == RUN_FORMAT or legacy)
            and isinstance(config.get("runs"), list)):
        what = f"a JSON {type(config).__name__}" if not isinstance(config, dict) else \
            "no \"format\": \"" + RUN_FORMAT + "\""
        raise OutputExistsError(f"{path}: not a run record bbh wrote ({what}); this is not a "
                                "run folder bbh made: choose a new or empty folder for --out")
    return config["runs"]


def check_run_folder(out: str | Path) -> None:
    """Refuse an `out` the runner did not make, before anything is written: the current
    directory, a file, a folder whose config.json is not the runner's; without a config.json,
    a folder holding anything but the runner's files and lines; report files the report did not
    write. A new or empty folder, or one the runner made, is fine (it resumes)."""
    if str(out).strip() == "":
        raise OutputExistsError("--out is empty (the current directory); pass a folder of the "
                                "run's own, e.g. --out runs/bbh")
    out = Path(out)
    cwd = Path.cwd().resolve()
    if out.exists() and out.resolve() in (cwd, *cwd.parents):
        raise OutputExistsError(f"{out}: is the current directory (or holds it); pass a folder "
                                "of the run's own, e.g. --out runs/bbh")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: is a file, not a run folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    marked = (out / CONFIG).exists() or (out / CONFIG).is_symlink()
    if marked:
        _history(out)
    else:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_NAMES)
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise OutputExistsError(f"{out}: not a run folder bbh made (it holds {shown}, and no "
                                    "config.json of bbh's); choose a new or empty folder for --out")
    for name in (RESULTS, PREDICTIONS):
        for number, line in enumerate(read_lines(out / name), 1):  # a device is refused here
            kind, row = parse_line(line)
            ours = kind in ("blank", "torn") or kind == "row" and isinstance(row.get("key"), str)
            if not marked and not ours:
                raise OutputExistsError(
                    f"{out / name}:{number}: a line bbh did not write, in a folder without "
                    "bbh's config.json; this is not a run folder bbh made: choose a new or "
                    "empty folder for --out")
    for name in (REPORT, PLOT):
        path = out / name
        if (path.exists() or path.is_symlink()) and not is_own_report(path):
            raise OutputExistsError(f"{path}: a file the report did not write, where a run writes "
                                    "its report; move it away (delete it if an older bbh wrote "
                                    "it) or choose another --out")


def _record_command(out: Path, command: list[str] | None) -> None:
    """OUT/config.json: the run folder's mark, and every command that wrote into it, in order."""
    history = _history(out)
    history.append({"argv": command or sys.argv, "cwd": os.getcwd(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    atomic_write_text(out / CONFIG, json.dumps({"format": RUN_FORMAT, "runs": history},
                                               indent=1) + "\n")


# --- running ------------------------------------------------------------------------------------
def run(cells: list[Cell], out: str | Path | None = None, *, workers: int = 1,
        backend: str = "local", address: str | None = None, gpus_per_cell: float | None = None,
        batch_size: int = 16, worker: Worker | None = None, command: list[str] | None = None,
        progress: bool = True, on_cell=None) -> list[dict]:
    """Run every cell not yet in OUT/results.jsonl; returns the rows of `cells` (finished
    earlier or now), in the order of `cells`. Without `out` nothing is written or resumed.
    on_cell(row, done, total, todo) is called after each cell this run computes (todo: the
    cells this run had to compute); a progress bar is shown instead when it is None."""
    from tqdm.auto import tqdm
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use local or ray")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"--workers must be an integer of at least 1, got {workers!r}")
    problem = count_problem("batch_size", batch_size)
    if problem:
        raise ValueError(problem)
    keys = [setting_key(c.setting()) for c in cells]
    done: dict[str, dict] = {}
    if out is not None:
        check_run_folder(out)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        done = {r["key"]: r for r in _open_results(out) if "key" in r}
        _record_command(out, command)
    todo = [c for c, k in zip(cells, keys) if k not in done]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell",
               disable=not progress or on_cell is not None)
    for count, (row, preds) in enumerate(_execute(todo, workers, backend, address, gpus_per_cell,
                                                  batch_size, worker), 1):
        if out is not None:
            _append(out / PREDICTIONS, preds)
            _append(out / RESULTS, row)  # last: a cell counts as done once both lines are whole
        done[row["key"]] = row
        bar.set_postfix_str(f"{row['task']} s{row['seed']} {row['method']}: EM {row['em']:.1f}")
        bar.update()
        if on_cell is not None:
            on_cell(row, len(cells) - len(todo) + count, len(cells), len(todo))
    bar.close()
    return [done[k] for k in keys]


def _execute(cells, workers, backend, address, gpus_per_cell, batch_size, worker):
    if not cells:
        return
    if backend == "ray":
        from lorahub_compeft.eval.ray_backend import run_on_ray
        yield from run_on_ray(cells, workers, address, gpus_per_cell, batch_size)
    elif workers > 1:
        import multiprocessing as mp
        # Threads a worker reads from OMP_NUM_THREADS where it is set (the command line's
        # --threads, or the caller's); else the workers share this machine's idle cores.
        threads = None if "OMP_NUM_THREADS" in os.environ else choose_threads(None, workers)
        with mp.get_context("spawn").Pool(workers, pool_init, (batch_size, threads)) as pool:
            yield from pool.imap_unordered(pool_run, cells)
    else:
        worker = worker or Worker(batch_size)
        for cell in cells:
            yield worker.run(cell)
