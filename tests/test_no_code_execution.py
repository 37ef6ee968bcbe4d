"""No code from a file runs: pickled base-model weights and `auto_map` remote code are refused
with a one-line error, and the planted code never runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text(json.dumps({"input": "say the word : red ?", "target": "red"}) + "\n")
    return path


def _check(proc, marker):
    assert not marker.exists(), "planted code ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "error:" in line]) == 1


def test_a_pickled_base_model_is_an_error_and_runs_nothing(tiny_t5, lora_dir, examples, tmp_path):
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_t5, base)
    (base / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"shared.weight": Payload(marker)}, base / "pytorch_model.bin")
    _check(_cli("compose", "--experts", str(lora_dir), "--examples", str(examples), "--model",
                str(base), "--out", str(tmp_path / "out")), marker)


def test_auto_map_remote_code_is_not_run(tiny_t5, lora_dir, examples, tmp_path):
    base = tmp_path / "remote-code-base"
    shutil.copytree(tiny_t5, base)
    marker = tmp_path / "ran"
    (base / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                  "from transformers import T5Config as EvilConfig\n")
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForSeq2SeqLM": "evil.EvilConfig"}
    (base / "config.json").write_text(json.dumps(config))
    proc = _cli("compose", "--experts", str(lora_dir), "--examples", str(examples), "--model",
                str(base), "--out", str(tmp_path / "out"), "--budget", "1")
    assert not marker.exists(), "planted code ran"
    assert "Traceback" not in proc.stderr
