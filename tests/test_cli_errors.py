"""Every command is behind one error handler: known failures are one line naming the problem
and the fix (rc 2), an unexpected one says how to get the traceback (--debug)."""
import json
import os
import subprocess
import sys

import pytest

import lorahub_compeft.cli.experts as expert_commands
from lorahub_compeft import compress
from lorahub_compeft.cli import main
from lorahub_compeft.cli.options import parse_seeds

OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(*args, env=OFFLINE):
    return subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    # (a progress bar may share the line)
    lines = [line[line.index("error:"):] for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"input": "say the word : red ?", "target": "red"}) + "\n")
    return path


def test_model_name_that_cannot_load_offline(lora_dir, examples, tmp_path):
    line = _one_line_error(_run("compose", "--experts", str(lora_dir), "--examples", str(examples),
                                "--model", "google/no-such-model-xyz", "--out", str(tmp_path / "o")))
    assert "google/no-such-model-xyz" in line and "local folder" in line


def test_missing_local_model_path(lora_dir, examples, tmp_path):
    line = _one_line_error(_run("compose", "--experts", str(lora_dir), "--examples", str(examples),
                                "--model", str(tmp_path / "no" / "model"), "--out", str(tmp_path / "o")))
    assert "does not exist" in line


def test_bbh_without_bbh_dir_offline_says_how_to_point_at_local_files(tiny_t5, tmp_path):
    env = dict(OFFLINE)
    env.pop("LORAHUB_COMPEFT_BBH_DIR", None)
    line = _one_line_error(_run("bbh", "--model", str(tiny_t5), "--methods", "zeroshot",
                                "--tasks", "boolean_expressions", "--seeds", "1",
                                "--out", str(tmp_path / "r"), env=env))
    assert "--bbh-dir" in line


def test_ctrl_c_is_one_line(monkeypatch, capsys, lora_dir, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(expert_commands, "cmd_inspect", interrupted)
    assert main(["inspect", "x.safetensors"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: interrupted; nothing half-written was kept (every output is written atomically)")


def test_unexpected_errors_point_at_debug_which_keeps_the_trace(monkeypatch, capsys):
    def bug(args):
        raise ZeroDivisionError("oops")
    monkeypatch.setattr(expert_commands, "cmd_inspect", bug)
    assert main(["inspect", "x"]) == 1
    assert "--debug" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "inspect", "x"])
    monkeypatch.setenv("LORAHUB_COMPEFT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["inspect", "x"])


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("lorahub-compeft ")
    for argv, words in ((["library", "remove", "-h"], ["library folder", "expert names"]),
                        (["export", "-h"], ["expert file", "never other files"]),
                        (["compose", "-h"], ["(default 1)", "never other files"]),
                        (["bbh", "-h"], ["(default: 20 for lorahub/compeft, 3 for select*)",
                                          "(default: 0.1 for compeft, 0.5 for select-compeft)",
                                          "(default: 1 for compeft, auto for",
                                          "(default: 40 for lorahub/compeft, auto for select*)"])):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())
        assert all(w in text for w in words), (argv, words)


def test_reversed_seed_range_is_refused(capsys):
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(Exception, match="holds no seed"):
        parse_seeds("5-1")
    with pytest.raises(SystemExit):
        main(["demo", "--seeds", "5-1"])
    assert "holds no seed" in capsys.readouterr().err


def test_demo_json_and_report_refuse_to_overwrite(tmp_path, capsys):
    existing = tmp_path / "rows.json"
    existing.write_text("mine")
    assert main(["demo", "--json", str(existing), "--tasks", "x"]) == 2
    assert "--force" in capsys.readouterr().err and existing.read_text() == "mine"
    (tmp_path / "report.md").write_text("mine")
    assert main(["report", str(tmp_path)]) == 2
    assert (tmp_path / "report.md").read_text() == "mine"


def test_compress_prints_the_whole_file_ratio(lora_dir, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    sizes = compress(lora_dir).sizes
    assert f"{sizes['fp16_bytes'] / out.stat().st_size:.1f}x smaller than fp16" in text
    assert "coded payload" in text
