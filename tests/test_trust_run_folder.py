"""A run folder is bbh's only if bbh made it: anything else given as --out is refused and left
as it was; hand-edited run files are skipped with a warning, never a traceback; `report` after
`bbh` regenerates the report bbh wrote, and still never replaces one it did not write."""
import importlib.util
import json
import logging
import os
import resource
import shutil
import subprocess
import sys

import pytest

from conftest import BBH
from lorahub_compeft.cli import main
from lorahub_compeft.eval import runner
from lorahub_compeft.eval.report import report

pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")


def bbh(model, out, *extra):
    return main(["bbh", "--model", str(model), "--methods", "zeroshot", "--tasks", "navigate",
                 "--seeds", "1", "--bbh-dir", str(BBH), "--max-eval", "2", "--out", str(out),
                 *extra])


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def small_run(tiny_t5, tmp_path_factory):
    """A real one-cell `bbh` run, made by bbh itself."""
    out = tmp_path_factory.mktemp("small-run") / "run"
    assert bbh(tiny_t5, out) == 0
    return out


def copy_of(small_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    return out


# --- 1. --out: only a folder bbh made ---------------------------------------------------------
def test_a_model_folder_is_refused_and_its_config_kept(tiny_t5, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_t5, model)
    before = snapshot(model)
    assert bbh(tiny_t5, model) == 2
    line = error_line(capsys)
    assert str(model) in line and "--out" in line
    assert snapshot(model) == before


def test_a_report_bbh_did_not_write_is_refused(tiny_t5, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my own report\n")
    assert bbh(tiny_t5, out) == 2
    assert "report.md" in error_line(capsys)
    assert snapshot(out) == {"report.md": b"my own report\n"}


def test_the_users_lines_of_a_results_file_are_never_dropped(tiny_t5, small_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    mine = "my notes, not JSON\n" + (small_run / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(mine)
    assert bbh(tiny_t5, out) == 2
    assert "results.jsonl:1" in error_line(capsys)
    assert snapshot(out) == {"results.jsonl": mine.encode()}


def test_the_current_directory_is_refused(tiny_t5, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    for out in ("", "."):
        assert bbh(tiny_t5, out) == 2
        assert "current directory" in error_line(capsys)
    assert snapshot(tmp_path) == {"keep.txt": b"x"}


def test_a_config_json_that_is_a_list_is_refused(tiny_t5, small_run, tmp_path, capsys):
    out = copy_of(small_run, tmp_path)
    (out / "config.json").write_text("[1, 2]\n")
    before = snapshot(out)
    assert bbh(tiny_t5, out) == 2
    assert "config.json" in error_line(capsys)
    assert snapshot(out) == before


def test_a_run_folder_bbh_made_is_marked_and_resumes(tiny_t5, small_run, tmp_path, monkeypatch):
    out = copy_of(small_run, tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == runner.RUN_FORMAT and len(config["runs"]) == 1
    ran = []
    monkeypatch.setattr(runner.Worker, "run", lambda self, cell: ran.append(cell))
    assert bbh(tiny_t5, out) == 0
    assert ran == []  # the cell was there: nothing recomputed
    assert len(json.loads((out / "config.json").read_text())["runs"]) == 2


# --- 3. hand-edited run files -----------------------------------------------------------------
BAD_ROWS = [
    {"key": ["a", "list"], "task": "navigate", "seed": 1, "method": "zeroshot", "em": 50.0},
    {"key": {"a": "dict"}, "task": "navigate", "seed": 1, "method": "zeroshot", "em": 50.0},
    {"key": "nokey-em", "task": "navigate", "seed": 1, "method": "zeroshot"},
    {"key": "nokey-task", "seed": 1, "method": "zeroshot", "em": 50.0},
    {"key": "nokey-method", "task": "navigate", "seed": 1, "em": 50.0},
    {"key": "nokey-seed", "task": "navigate", "method": "zeroshot", "em": 50.0},
    {"key": "string-em", "task": "navigate", "seed": 1, "method": "zeroshot", "em": "50"},
    {"key": "setting-list", "task": "navigate", "seed": 1, "method": "zeroshot", "em": 5.0,
     "setting": [1]},
]


def test_hand_edited_rows_are_skipped_with_a_warning(tiny_t5, small_run, tmp_path, caplog):
    out = copy_of(small_run, tmp_path)
    table = report(out)
    edited = (out / "results.jsonl").read_text() + "".join(json.dumps(r) + "\n" for r in BAD_ROWS)
    (out / "results.jsonl").write_text(edited)
    with caplog.at_level(logging.WARNING):
        assert report(out) == table  # the bad rows changed nothing
    skipped = [r for r in caplog.records if "results.jsonl:" in r.getMessage()]
    assert len(skipped) == len(BAD_ROWS)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert bbh(tiny_t5, out) == 0  # the runner too: resumes, keeps the edited lines
    assert (out / "results.jsonl").read_text() == edited
    assert any("results.jsonl:" in r.getMessage() for r in caplog.records)


def _capped_cli(*args):
    """The command line in a process that cannot take more than 3 GB (a read without a cap
    fails there with MemoryError instead of taking the machine)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    return subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, preexec_fn=cap,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("kind", ["dev-zero", "huge"])
def test_a_results_file_is_read_with_a_cap(small_run, tmp_path, kind):
    out = copy_of(small_run, tmp_path)
    for name in ("report.md", "report.png"):  # `report` must get as far as reading
        (out / name).unlink(missing_ok=True)
    results = out / "results.jsonl"
    results.unlink()
    if kind == "dev-zero":
        results.symlink_to("/dev/zero")
    else:
        with open(results, "wb") as handle:  # sparse: 8 GB that take no disk
            handle.truncate(8 << 30)
    proc = _capped_cli("report", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(line) == 1 and "results.jsonl" in line[0] and "MemoryError" not in line[0]
    with pytest.raises(ValueError, match="results.jsonl"):
        runner.read_results(results)


# --- 6. report after bbh ----------------------------------------------------------------------
def test_report_after_bbh_regenerates_its_own_report(small_run, tmp_path, capsys):
    out = copy_of(small_run, tmp_path)
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| navigate |" in printed and "Zero-shot" in printed
    assert (out / "report.md").read_text().splitlines()[0] == runner.REPORT_MARK
    assert main(["report", str(out)]) == 0  # and again


@pytest.mark.parametrize("name", ["report.md", "report.png"])
def test_report_never_replaces_a_file_it_did_not_write_without_force(small_run, tmp_path, capsys,
                                                                     name):
    out = copy_of(small_run, tmp_path)
    (out / name).write_text("mine\n")
    assert main(["report", str(out)]) == 2
    assert name in error_line(capsys)
    assert (out / name).read_text() == "mine\n"
    if name == "report.md" or _has_matplotlib():
        assert main(["report", str(out), "--force"]) == 0
        assert (out / name).read_bytes() != b"mine\n"


def _has_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None
