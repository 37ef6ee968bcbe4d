"""`reproduce`: the paper's protocol by default, --methods to add the package's own; progress
over the whole run (cells done, each cell's time, ETA); resumable; ends by printing the report
(a rerun too, with no --force). scripts/reproduce_bbh.sh is a thin wrapper of it."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BBH
from lorahub_compeft.cli import main
from lorahub_compeft.io.adapters import hub_unreachable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] navigate seed (\d) (\S+): EM [\d.]+ in \d+ s; ETA \d+ ")


@pytest.fixture
def offline(monkeypatch):
    """reproduce sets HF_HUB_OFFLINE (and with --cache HF_HOME): restored, and the offline
    check forgotten, after."""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:  # recorded as unset (delenv alone records nothing), so unset again after
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub_unreachable.cache_clear()
    yield
    hub_unreachable.cache_clear()


def argv(tiny_t5, experts, out, seeds, *extra):
    return ["reproduce", "--model", str(tiny_t5), "--experts", *experts, "--bbh-dir", str(BBH),
            "--tasks", "navigate", "--seeds", seeds, "-n", "2", "--budget", "2",
            "--max-eval", "2", "--threads", "1", "--out", str(out), *extra]


def progress(err: str) -> list[tuple]:
    return [m.groups() for m in map(PROGRESS.match, err.splitlines()) if m]


def test_runs_the_paper_protocol_resumes_and_prints_the_report(tiny_t5, experts, tmp_path,
                                                               capsys, offline):
    out = tmp_path / "run"
    assert main(argv(tiny_t5, experts, out, "1")) == 0
    captured = capsys.readouterr()
    assert [p[3] for p in progress(captured.err)] == ["zeroshot", "icl", "lorahub", "compeft"]
    assert [p[:2] for p in progress(captured.err)] == [("1", "4"), ("2", "4"), ("3", "4"),
                                                       ("4", "4")]
    assert "| navigate |" in captured.out and (out / "report.md").is_file()

    # a second seed and the package's protocol: only the new cells run, counted over the whole
    assert main(argv(tiny_t5, experts, out, "1-2", "--methods", "select")) == 0
    captured = capsys.readouterr()
    lines = progress(captured.err)
    assert [(p[2], p[3]) for p in lines] == [("1", "select"), ("2", "zeroshot"), ("2", "icl"),
                                             ("2", "lorahub"), ("2", "compeft"), ("2", "select")]
    assert [p[:2] for p in lines] == [(str(k), "10") for k in range(5, 11)]
    rows = (out / "results.jsonl").read_text().splitlines()
    assert len(rows) == 10 and "select" in captured.out

    # nothing left: nothing recomputed, the report printed again (no --force needed)
    assert main(argv(tiny_t5, experts, out, "1-2", "--methods", "select")) == 0
    captured = capsys.readouterr()
    assert progress(captured.err) == [] and "| navigate |" in captured.out
    assert (out / "results.jsonl").read_text().splitlines() == rows
    assert all(json.loads(r)["peak_rss_bytes"] > 0 for r in rows)


def test_an_unknown_extra_method_is_refused_before_anything_is_written(tiny_t5, experts,
                                                                       tmp_path, capsys, offline):
    out = tmp_path / "run"
    assert main(argv(tiny_t5, experts, out, "1", "--methods", "no-such")) == 2
    assert "no-such" in capsys.readouterr().err and not out.exists()


def test_an_experts_item_that_is_no_file_and_no_hub_id_is_named(tiny_t5, tmp_path, capsys,
                                                                offline):
    """Before the cache is searched for the rest: no --bbh-dir, so BBH is looked for too."""
    out = tmp_path / "run"
    assert main(["reproduce", "--model", str(tiny_t5), "--experts", str(tmp_path / "nofile.txt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nofile.txt" in err[0] and "no such file" in err[0]
    assert not out.exists()


def test_reproduce_bbh_sh_calls_reproduce(tiny_t5, experts, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_bbh.sh"), str(out),
                           *argv(tiny_t5, experts, out, "1")[1:-2]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| navigate |" in done.stdout and len(progress(done.stderr)) == 4


def test_download_without_the_hub_says_so_in_one_line(tmp_path, capsys, offline):
    home = os.environ.get("HF_HOME")
    assert main(["download", "--cache", str(tmp_path / "hf"), "--experts", "org/a"]) == 2
    assert os.environ["HF_HOME"] == str(tmp_path / "hf") != home  # the fixture restores it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "download needs the Hugging Face Hub" in err[0]
    assert "HF_HUB_OFFLINE=1" in err[0] and not (tmp_path / "hf").exists()
