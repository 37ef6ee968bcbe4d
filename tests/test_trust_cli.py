"""Errors that are one clear message, printed whole; a closed stdout ends a command quietly;
offline, a Hub model name that is not cached is an error at once, saying how to point at a
local copy."""
import json
import os
import subprocess
import sys
import time

import pytest

import lorahub_compeft.cli.experts as expert_commands
from conftest import BBH
from lorahub_compeft.cli import main

CLI = [sys.executable, "-m", "lorahub_compeft.cli"]
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"input": "say the word : red ?", "target": "red"}) + "\n")
    return path


# --- 4. the whole message ---------------------------------------------------------------------
def test_a_multi_line_message_is_printed_whole(lora_dir, ia3_dir, examples, tmp_path, capsys):
    assert main(["compose", "--experts", str(lora_dir), str(ia3_dir), "--examples", str(examples),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: these experts do not fit together:" in err
    assert f"{ia3_dir.name}: peft_type is 'IA3'" in err  # the list after the first line
    assert err.count("error:") == 1 and "Traceback" not in err


def test_the_hub_hint_survives_a_multi_line_hub_error(monkeypatch, capsys):
    from lorahub_compeft.io.adapters import AdapterError

    def hub_failure(args):
        raise AdapterError("owner/name: cannot download from the Hugging Face Hub (404 Client "
                           "Error.\n\nRepository Not Found for url: https://huggingface.co/x); "
                           "check the id and your network, or pass a local directory")
    monkeypatch.setattr(expert_commands, "cmd_inspect", hub_failure)
    assert main(["inspect", "x"]) == 2
    err = capsys.readouterr().err
    assert "check the id and your network, or pass a local directory" in err
    assert err.count("error:") == 1


def test_an_expert_that_cannot_be_downloaded_keeps_its_hint(examples, tmp_path, tiny_t5):
    # no HF_HUB_OFFLINE: whatever the network, the download fails and the hint must be there
    proc = subprocess.run([*CLI, "compose", "--experts", "nobody-xyz/no-such-expert-xyz",
                           "--examples", str(examples), "--model", str(tiny_t5),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "nobody-xyz/no-such-expert-xyz" in proc.stderr and "local directory" in proc.stderr


def test_a_closed_stdout_ends_the_command_quietly(lora_dir, tmp_path):
    lib = tmp_path / "lib"
    assert main(["library", "add", str(lib), str(lora_dir)]) == 0
    for args in (["library", "list", str(lib)], ["--help"]):
        # `... | head -1`: the reader is gone before the command writes
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) in (0, 141), err
        assert "error:" not in err and "Traceback" not in err and "Broken pipe" not in err, err


@pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")
@pytest.mark.parametrize("methods", ["", "zeroshot,loraHub", "zeroshot,,icl"])
def test_bbh_methods_that_do_not_exist_are_one_line_listing_them(tiny_t5, tmp_path, capsys,
                                                                 methods):
    out = tmp_path / "out"
    assert main(["bbh", "--model", str(tiny_t5), "--methods", methods, "--tasks", "navigate",
                 "--bbh-dir", str(BBH), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "zeroshot, icl, lorahub, compeft" in err[0]
    assert not out.exists()


# --- 5. offline -------------------------------------------------------------------------------
TIMED_LOAD = """
import sys, time
from lorahub_compeft.io.models import load_model
start = time.perf_counter()
try:
    load_model(sys.argv[1])
except Exception as err:
    print(type(err).__name__, err)
print(f"seconds {time.perf_counter() - start:.2f}")
"""


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_an_uncached_hub_model_offline_fails_at_once_saying_how_to_point_at_a_copy(how):
    env = dict(os.environ)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    if how == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # a Hub nothing answers at: as with no network (refused at once, not after retries)
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    proc = subprocess.run([sys.executable, "-c", TIMED_LOAD, "nobody-xyz/no-such-model-xyz"],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout
    seconds = float(out.rsplit("seconds ", 1)[1])
    assert "nobody-xyz/no-such-model-xyz" in out and "--model" in out and "cache" in out, out
    assert seconds < 5, out


def test_offline_the_command_says_it_in_one_line(lora_dir, examples, tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "compose", "--experts", str(lora_dir), "--examples",
                           str(examples), "--model", "nobody-xyz/no-such-model-xyz",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env=OFFLINE, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "nobody-xyz/no-such-model-xyz" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "--model" in lines[0], lines
    print(f"offline compose error after {time.perf_counter() - start:.1f} s (imports included)")
