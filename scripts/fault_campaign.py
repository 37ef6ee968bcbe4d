"""Fault and fuzz campaign against expert files and the library; prints the figures README's
"Guarantees" section quotes.

Fuzz: mutated copies of two expert files (a v2 file compressed now, and a shipped v1 zoo file):
byte flips, truncations, and header edits (field values of other types, swapped or renamed
tensors, forged shapes, counts and a huge last tensor with numel and density adjusted, deep
JSON, many empty entries), each header edit with and without its digests recomputed as a
forger would. Each file goes through load_expert, summary() and state_dict() in a worker
subprocess with an address-space cap and a timeout. Outcomes:
  refused    ExpertFileError
  identical  decoded to the original's weights
  different  decoded to other (finite) weights without error: only possible for a forger
             who recomputed the digests (counted apart), never for plain damage
  nonfinite  decoded to NaN/inf            escaped:<Type>  another exception
  memory     hit the cap                   timeout         hit the timeout

Kill: `library add` of 4 adapters into a library killed with SIGKILL at a random moment; then
the index must parse, every listed expert must decode, and the same command rerun must finish
(every name listed, no temporary file left).

Run files: a `bbh` run folder edited by hand (rows with fields of other types or missing, a
malformed setting, lines that are not JSON, torn or deeply nested, a config.json that is not
bbh's, results.jsonl linked to /dev/zero, huge, a folder or not UTF-8, a report.md of the
user's), then the runner resumes it and `report` reads it, in a worker with the same cap.
Outcomes: read (skipped what it could not use, with warnings), refused (one ValueError),
lost-lines (a line other than a torn one, or a prediction whose result is unusable, was
dropped), escaped:<Type>, memory, timeout.

Cases and index (scripts/fault_cases.py): named forgeries a random mutation rarely hits
(format-1 dtype and codec edits, format-2 payload forgeries, ERE header forgeries, a forged
adapter_config.r, regex target_modules), each once, in the same worker; and library indexes
edited by hand, then listed, added to and rebuilt through the command line.

    python scripts/fault_campaign.py            # the full campaign (about 25 min on 2 cores)
    python scripts/fault_campaign.py --quick    # a few seconds' worth, for CI
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_cases  # noqa: E402
ZOO = ROOT / "lorahub_compeft" / "zoo" / "artifacts"

WORKER = r"""
import json, resource, sys, torch
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from lorahub_compeft import load_expert
from lorahub_compeft.store.format import ExpertFileError
refs = {}
for line in sys.stdin:
    path, ref = json.loads(line)
    if ref not in refs:
        refs[ref] = load_expert(ref).state_dict()
    try:
        expert = load_expert(path)
        expert.summary()
        state = expert.state_dict()
        if not all(torch.isfinite(t).all() for t in state.values()):
            out = "nonfinite"
        else:
            same = state.keys() == refs[ref].keys() and all(
                state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in refs[ref].items())
            out = "identical" if same else "different"
    except ExpertFileError:
        out = "refused"
    except MemoryError:
        out = "memory"
    except BaseException as err:
        out = "escaped:" + type(err).__name__
    print(out, flush=True)
"""


RUN_WORKER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from pathlib import Path
from lorahub_compeft.eval.report import report
from lorahub_compeft.eval.runner import PREDICTIONS, RESULTS, parse_line, read_lines, read_results, run
def lines(path):
    try:
        return read_lines(path)
    except ValueError:
        return None
for request in sys.stdin:
    out = Path(json.loads(request)[0])
    results, predictions = lines(out / RESULTS), lines(out / PREDICTIONS)
    try:
        run([], out, progress=False)  # what a resumed bbh does before its first cell
        report(out)
        outcome = "read"
    except ValueError:
        outcome = "refused"
    except MemoryError:
        outcome = "memory"
    except BaseException as err:
        outcome = "escaped:" + type(err).__name__
    if outcome == "read":  # only torn lines and orphan predictions may have gone
        done = {r["key"] for r in read_results(out / RESULTS) if "key" in r}
        def orphan(line):
            kind, row = parse_line(line)
            return kind == "torn" or kind == "row" and isinstance(row.get("key"), str) and row["key"] not in done
        if [l for l in results or [] if parse_line(l)[0] != "torn"] != (lines(out / RESULTS) or []) or \
                [l for l in predictions or [] if not orphan(l)] != (lines(out / PREDICTIONS) or []):
            outcome = "lost-lines"
    print(outcome, flush=True)
"""


# ------------------------------------------------------------------------------ mutations


def _read_meta(meta: dict) -> dict:
    if meta.get("format_version") == "2":
        return json.loads(zlib.decompress(base64.b85decode(meta["header"])))
    return {k: v if k in ("format", "encoding", "selection", "payload_sha256", "name")
            else json.loads(v) for k, v in meta.items()}


def _write_meta(meta: dict, body: dict, sign: bool, payload_sha: str | None) -> dict:
    if payload_sha is not None:
        body["payload_sha256"] = payload_sha
    if meta.get("format_version") == "2":
        raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        out = dict(meta, header=base64.b85encode(zlib.compress(raw)).decode())
        if sign:
            out["header_sha256"] = hashlib.sha256(raw).hexdigest()
        return out
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}


JUNK = [None, True, -1, 0, 1.5, 10 ** 15, "x", "", [], {}, [1], {"a": 1}, [[[]]], "1e309"]


def _edit_body(body: dict, rng: random.Random) -> str:
    """One header edit; returns its kind."""
    kind = rng.choice(["field", "swap", "rename", "shape", "dtype", "init", "order", "numel",
                       "huge_last", "deep", "empty_entries", "entry_field", "delete", "scale_meta"])
    tensors = body.get("tensors") if isinstance(body.get("tensors"), list) else []
    if kind == "field":
        body[rng.choice(sorted(body))] = copy.deepcopy(rng.choice(JUNK))
    elif kind == "swap" and len(tensors) > 1:
        i, j = rng.sample(range(len(tensors)), 2)
        tensors[i]["name"], tensors[j]["name"] = tensors[j]["name"], tensors[i]["name"]
    elif kind == "rename" and tensors:
        rng.choice(tensors)["name"] += ".x"
    elif kind == "shape" and tensors:
        entry = rng.choice(tensors)
        entry["shape"] = list(reversed(entry["shape"])) if rng.random() < 0.5 else [rng.choice([0, 1, 7, 10 ** 6])] + entry["shape"][1:]
    elif kind == "dtype" and tensors:
        rng.choice(tensors)["dtype"] = rng.choice(["float16", "bfloat16", "float64", "int8", None])
    elif kind == "init" and tensors:
        rng.choice(tensors)["init"] = rng.choice([0.5, 1.0, -3, None, "0"])
    elif kind == "order":
        rng.shuffle(tensors)
    elif kind == "numel":
        body["numel"] = rng.choice([0, 1, body.get("numel", 1) + 1, 2 ** 40])
    elif kind == "huge_last" and tensors:
        tensors[-1]["shape"] = [rng.choice([10 ** 5, 10 ** 6, 10 ** 7]), 10 ** 3]
        numel = sum(_prod(t["shape"]) for t in tensors)
        count = (body.get("coding") or {}).get("count", 1) if isinstance(body.get("coding"), dict) else 1
        body["numel"], body["density"] = numel, max(count, 1) / numel
    elif kind == "deep":
        body[rng.choice(["source", "adapter_config", "coding", "name"])] = _deep(rng.choice([100, 5000, 50000]))
    elif kind == "empty_entries":
        body["carried"] = [{"name": f"e{i}", "shape": [0], "dtype": "float32"} for i in range(rng.choice([1000, 100000]))]
    elif kind == "entry_field" and tensors:
        entry = rng.choice(tensors)
        entry[rng.choice(["name", "shape", "dtype", "init"])] = copy.deepcopy(rng.choice(JUNK))
    elif kind == "delete":
        body.pop(rng.choice(sorted(body)), None)
    elif kind == "scale_meta":
        body[rng.choice(["sigma", "alpha", "density"])] = rng.choice([0, -1, 1e308, 2.0, 1e-12])
    return kind


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def mutate(original: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["flip", "flip", "truncate", "header", "header", "header"])
    if kind == "flip":
        data = bytearray(original)
        for _ in range(rng.choice([1, 1, 2, 8])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data), "flip"
    if kind == "truncate":
        return original[:rng.randrange(len(original))], "truncate"
    header, rest = fault_cases.split_header(original)
    meta = header["__metadata__"]
    body = _read_meta(meta)
    edit = _edit_body(body, rng)
    forged = rng.random() < 0.5  # recompute the digests as a forger would
    version = meta.get("format_version")
    try:
        header["__metadata__"] = _write_meta(meta, body, forged, None)
    except (TypeError, ValueError, RecursionError):
        return original[:-1], "truncate"  # an edit JSON cannot express
    return fault_cases.join_header(header, rest), f"header:{edit}:{'forged' if forged else 'plain'}:v{version}"


# ------------------------------------------------------------------------------ fuzz runner
class Worker:
    def __init__(self, mem_bytes: int, script: str = WORKER):
        self.mem, self.script = mem_bytes, script
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self.script, str(self.mem)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def run(self, path: Path, ref: Path | None, timeout: float) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps([str(path), str(ref)]) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.stop()
            return "timeout"
        line = self.proc.stdout.readline().strip()
        if not line:  # died: killed for memory by the cap, or crashed
            code = self.proc.wait()
            self.proc = None
            return "memory" if code in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT) else f"died:{code}"
        return line

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def fuzz(n: int, seed: int, work: Path, mem_gb: float, timeout: float) -> dict:
    from lorahub_compeft import load_expert
    v1 = ZOO / "experts" / "bool_value.safetensors"
    v2 = work / "v2.safetensors"
    load_expert(v1).save(v2, force=True)
    refs = [v1, v2]
    rng = random.Random(seed)
    worker = Worker(int(mem_gb * 2 ** 30))
    outcomes, by_kind = Counter(), Counter()
    start = time.time()
    worker.start()
    # the first request also decodes the reference: give it time
    try:
        for i in range(n):
            ref = refs[i % 2]
            data, kind = mutate(ref.read_bytes(), rng)
            path = work / f"m{i % 4}.safetensors"
            path.write_bytes(data)
            out = worker.run(path, ref, timeout if i >= 2 else 120)
            outcomes[out] += 1
            origin = f"v{1 if ref == v1 else 2} {'forged' if 'forged' in kind else 'damage'}"
            by_kind[(out, origin)] += 1
    finally:
        worker.stop()
    return {"files": n, "outcomes": dict(outcomes), "seconds": round(time.time() - start),
            "by_origin": {f"{o} ({k})": c for (o, k), c in sorted(by_kind.items())}}


def cases(work: Path, mem_gb: float, timeout: float, every: int = 1) -> dict:
    """Every targeted case (fault_cases.expert_cases), or every `every`-th of them."""
    from lorahub_compeft import compress, load_expert
    from lorahub_compeft.config import EreOptions
    refs = {"v1": ZOO / "experts" / "bool_value.safetensors", "v2": work / "v2.safetensors",
            "ere": work / "ere.safetensors"}
    load_expert(refs["v1"]).save(refs["v2"], force=True)
    compress(ZOO / "dense" / "bool_value", EreOptions()).save(refs["ere"], force=True)
    chosen = fault_cases.expert_cases(refs)[::every]
    worker = Worker(int(mem_gb * 2 ** 30))
    outcomes, by_family, silent = Counter(), Counter(), []
    start = time.time()
    try:
        for i, (label, signed, data, ref) in enumerate(chosen):
            path = work / f"case{i % 4}.safetensors"
            path.write_bytes(data)
            out = worker.run(path, ref, timeout if i >= 3 else 120)
            outcomes[out] += 1
            by_family[(out, label.split(":")[0])] += 1
            if out == "different" and not signed:
                silent.append(label)
    finally:
        worker.stop()
    return {"cases": len(chosen), "outcomes": dict(outcomes), "seconds": round(time.time() - start),
            "by_family": {f"{o} ({k})": c for (o, k), c in sorted(by_family.items())},
            "silent": silent}


def index(n: int, seed: int, work: Path, mem_gb: float, timeout: float) -> dict:
    """Hand-edited library indexes (fault_cases.edit_index), listed, added to and rebuilt."""
    dense = sorted(p for p in (ZOO / "dense").iterdir() if p.is_dir())
    template = work / "index-template"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", "library", "add", str(template)]
                   + [str(p) for p in dense[:3]], cwd=ROOT, env=env, check=True, capture_output=True)
    rng = random.Random(seed)
    worker = Worker(int(mem_gb * 2 ** 30), fault_cases.INDEX_WORKER)
    outcomes, by_kind = Counter(), Counter()
    start = time.time()
    try:
        for i in range(n):
            root, kinds = fault_cases.index_trial(template, work, i, rng)
            out = worker.run(root, dense[3], max(timeout, 60) if i else 180)
            outcomes[out] += 1
            for kind in kinds:
                by_kind[(out, kind)] += 1
            shutil.rmtree(root.parent, ignore_errors=True)
    finally:
        worker.stop()
    return {"trials": n, "outcomes": dict(outcomes), "seconds": round(time.time() - start),
            "by_edit": {f"{o} ({k})": c for (o, k), c in sorted(by_kind.items())}}


# ------------------------------------------------------------------------------ kill -9
def _library_state(root: Path) -> tuple[int, int, int, bool]:
    """(listed, stray files, temp files, every listed expert decodes), read-only."""
    from lorahub_compeft import ExpertLibrary
    lib = ExpertLibrary(root, read_only=True)
    try:
        for name in lib.names():
            lib.get(name).state_dict()
        intact = True
    except Exception:
        intact = False
    return len(lib), len(lib.stray_files()), len(lib.temp_files()), intact


def kills(n: int, seed: int, work: Path) -> dict:
    sources = [str(p) for p in sorted(p for p in (ZOO / "dense").iterdir() if p.is_dir())[:4]]
    rng = random.Random(seed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "lorahub_compeft.cli", "library", "add"]
    start = time.time()  # one uninterrupted run sets the window the kills fall in
    subprocess.run(command + [str(work / "calibrate")] + sources, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    window = time.time() - start
    stats = Counter(trials=0, killed=0, index_invalid=0, listed_damaged=0, temp_left=0,
                    stray_left=0, rerun_finished=0)
    for trial in range(n):
        root = work / f"lib{trial}"
        proc = subprocess.Popen(command + [str(root)] + sources, cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, window))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            stats["killed"] += 1
        proc.wait()
        stats["trials"] += 1
        if (root / "index.json").exists():
            try:
                json.loads((root / "index.json").read_text())["experts"].items()
            except (ValueError, KeyError, AttributeError):
                stats["index_invalid"] += 1
        if root.is_dir():
            listed, stray, temp, intact = _library_state(root)
            stats["listed_damaged"] += not intact
            stats["stray_left"] += stray > 0
            stats["temp_left"] += temp > 0
        rerun = subprocess.run(command + [str(root)] + sources, cwd=ROOT, env=env, capture_output=True)
        listed, stray, temp, intact = _library_state(root)
        stats["rerun_finished"] += (rerun.returncode == 0 and listed == len(sources) and intact
                                    and not stray and not temp)
        shutil.rmtree(root, ignore_errors=True)
    return dict(stats, window_s=round(window, 1))


# ------------------------------------------------------------------------------ run files
def _run_folder(root: Path) -> None:
    """A bbh run folder as bbh writes it: 3 cells (config.json, results, predictions)."""
    from lorahub_compeft.eval.cells import setting_key
    from lorahub_compeft.eval.runner import CONFIG, PREDICTIONS, RESULTS, RUN_FORMAT
    root.mkdir(parents=True)
    results, predictions = [], []
    for seed, method in ((1, "zeroshot"), (1, "lorahub"), (2, "lorahub")):
        composed = method == "lorahub"
        setting = {"task": "navigate", "seed": seed, "method": method,
                   "params": {"n_experts": 2, "budget": 3} if composed else {}, "model": "/m",
                   "experts": {"pool_sha256": "ab" * 32, "count": 3} if composed else None,
                   "data": {"source": "bbh", "max_eval": 4, "sha256": "cd" * 32}}
        key = setting_key(setting)
        row = {"key": key, "task": "navigate", "seed": seed, "method": method, "em": 25.0 * seed,
               "n_eval": 4, "seconds": 0.5, "started": 0.0, "worker": "host:1", "setting": setting}
        if composed:
            row.update(bytes_read=1000, best_loss=0.5 + seed, experts=[{"name": "a", "sha256": "ef" * 32}])
        results.append(json.dumps(row) + "\n")
        predictions.append(json.dumps({"key": key, "task": "navigate", "seed": seed, "method": method,
                                       "predictions": ["yes"] * 4, "targets": ["no"] * 4}) + "\n")
    (root / RESULTS).write_text("".join(results))
    (root / PREDICTIONS).write_text("".join(predictions))
    (root / CONFIG).write_text(json.dumps({"format": RUN_FORMAT, "runs": []}) + "\n")


ROW_FIELDS = ["key", "task", "seed", "method", "em", "setting", "bytes_read", "best_loss", "model"]
SETTING_FIELDS = ["method", "params", "model", "experts", "data"]


def _edit_run(root: Path, rng: random.Random) -> str:
    """One hand edit of a run folder; returns its kind."""
    results, predictions, config = root / "results.jsonl", root / "predictions.jsonl", root / "config.json"
    kind = rng.choice(["row_field", "row_delete", "setting_field", "line", "torn_end", "config",
                       "no_config", "results_file", "prediction_key", "report"])
    target = predictions if kind == "prediction_key" else results
    if target.is_symlink() or not target.is_file() or target.stat().st_size > 1 << 20:
        return "none"  # an earlier edit replaced the file itself
    try:
        lines = target.read_text().splitlines(keepends=True)
    except UnicodeDecodeError:
        return "none"
    rows = [(i, json.loads(line)) for i, line in enumerate(lines) if line.startswith('{"key": "')
            and line.endswith("}\n")]
    if not rows:
        return "none"
    i, row = rng.choice(rows)
    if kind in ("row_field", "prediction_key"):
        row[rng.choice(ROW_FIELDS) if kind == "row_field" else "key"] = copy.deepcopy(rng.choice(JUNK))
    elif kind == "row_delete":
        row.pop(rng.choice(ROW_FIELDS), None)
    elif kind == "setting_field":
        row["setting"][rng.choice(SETTING_FIELDS)] = copy.deepcopy(rng.choice(JUNK))
    if kind in ("row_field", "row_delete", "setting_field", "prediction_key"):
        lines[i] = json.dumps(row) + "\n"
    elif kind == "line":
        lines.insert(i, rng.choice(["my notes\n", lines[i][:rng.randrange(1, len(lines[i]))] + "\n",
                                    "[" * 100000 + "\n", "5\n", "[1, 2]\n", "\n", "null\n",
                                    lines[i], '{"key": "x"\n']))
    elif kind == "torn_end":
        lines.append(lines[i][:rng.randrange(1, len(lines[i]))])
    elif kind == "config":
        config.write_text(rng.choice(["not json", "[1, 2]", "5", json.dumps({"runs": 5}),
                                      json.dumps({"format": "other", "runs": []}),
                                      json.dumps({"runs": [], "x": 1}), "{" * 100000]))
    elif kind == "no_config":
        config.unlink(missing_ok=True)
    elif kind == "results_file":
        how = rng.choice(["dev_zero", "huge", "folder", "not_utf8"])
        results.unlink()
        if how == "dev_zero":
            results.symlink_to("/dev/zero")
        elif how == "huge":
            with open(results, "wb") as handle:
                handle.truncate(rng.choice([600 << 20, 8 << 30]))  # sparse
        elif how == "folder":
            results.mkdir()
        else:
            results.write_bytes(b"\xff\xfe" + "".join(lines).encode())
        return f"results_file:{how}"
    elif kind == "report":
        (root / "report.md").write_text("my own report\n")
    target.write_text("".join(lines))
    return kind


def run_files(n: int, seed: int, work: Path, mem_gb: float, timeout: float) -> dict:
    rng = random.Random(seed)
    worker = Worker(int(mem_gb * 2 ** 30), RUN_WORKER)
    outcomes, by_kind = Counter(), Counter()
    start = time.time()
    try:
        for i in range(n):
            root = work / f"run{i}"
            _run_folder(root)
            kinds = [_edit_run(root, rng) for _ in range(rng.choice([1, 1, 2, 3]))]
            out = worker.run(root, None, timeout if i else 120)  # the first also imports
            outcomes[out] += 1
            for kind in kinds:
                by_kind[(out, kind)] += 1
            shutil.rmtree(root, ignore_errors=True)
    finally:
        worker.stop()
    return {"folders": n, "outcomes": dict(outcomes), "seconds": round(time.time() - start),
            "by_edit": {f"{o} ({k})": c for (o, k), c in sorted(by_kind.items())}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small campaign, for CI")
    parser.add_argument("--files", type=int, help="mutated files (default 2000; quick 40)")
    parser.add_argument("--kills", type=int, help="kill -9 trials (default 30; quick 1)")
    parser.add_argument("--runs", type=int, help="hand-edited run folders (default 300; quick 20)")
    parser.add_argument("--indexes", type=int, help="hand-edited library indexes (default 60; quick 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mem-gb", type=float, default=4.0, help="address-space cap per worker")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per file")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    files = args.files if args.files is not None else (40 if args.quick else 2000)
    n_kills = args.kills if args.kills is not None else (1 if args.quick else 30)
    n_runs = args.runs if args.runs is not None else (20 if args.quick else 300)
    n_indexes = args.indexes if args.indexes is not None else (4 if args.quick else 60)
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        work = Path(tmp)
        figures = {"fuzz": fuzz(files, args.seed, work, args.mem_gb, args.timeout),
                   "kill": kills(n_kills, args.seed, work),
                   "run_files": run_files(n_runs, args.seed, work, args.mem_gb, args.timeout),
                   "cases": cases(work, args.mem_gb, args.timeout, every=8 if args.quick else 1),
                   "index": index(n_indexes, args.seed, work, args.mem_gb, args.timeout)}
    print(json.dumps(figures, indent=1, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    fz, kl = figures["fuzz"]["outcomes"], figures["kill"]
    bad = {k: v for k, v in fz.items() if k.startswith(("escaped", "died", "timeout", "memory", "nonfinite"))}
    # v1 files carry no header digest: undetected header damage there is reported, not failed
    bad.update({k: v for k, v in figures["fuzz"]["by_origin"].items() if k == "different (v2 damage)"})
    bad.update({k: kl.get(k, 0) for k in ("index_invalid", "listed_damaged") if kl.get(k)})
    bad.update({f"run files {k}": v for k, v in figures["run_files"]["outcomes"].items()
                if k not in ("read", "refused")})
    failed = ("escaped", "died", "timeout", "memory", "nonfinite", "lost", "outside")
    bad.update({f"cases {k}": v for k, v in figures["cases"]["outcomes"].items() if k.startswith(failed)})
    if figures["cases"]["silent"]:
        bad["cases silent decodes"] = figures["cases"]["silent"]
    bad.update({f"index {k}": v for k, v in figures["index"]["outcomes"].items() if k.startswith(failed)})
    if kl.get("rerun_finished", 0) != kl.get("trials", 0):
        bad["rerun_not_finished"] = kl.get("trials", 0) - kl.get("rerun_finished", 0)
    print("FAILURES: " + json.dumps(bad) if bad else "no failure", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
