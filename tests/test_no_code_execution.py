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


def _remote_code_base(tiny_t5, tmp_path, marker, model_type="evil-t5"):
    """A model folder whose config names its own code (auto_map) for an architecture
    transformers does not ship: transformers would ask on stdin whether to run it."""
    base = tmp_path / "remote-code-base"
    shutil.copytree(tiny_t5, base)
    (base / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import T5Config, T5ForConditionalGeneration\n"
        f"class EvilConfig(T5Config):\n    model_type = {model_type!r}\n"
        "class EvilModel(T5ForConditionalGeneration):\n    config_class = EvilConfig\n")
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSeq2SeqLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    return base


def _cli_answering_yes(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", *args], input="y\n" * 10,
                          capture_output=True, text=True, env=env, timeout=300)


def test_remote_code_is_refused_even_when_stdin_answers_yes(tiny_t5, lora_dir, examples, tmp_path):
    marker = tmp_path / "ran"
    base = _remote_code_base(tiny_t5, tmp_path, marker)
    proc = _cli_answering_yes("compose", "--experts", str(lora_dir), "--examples", str(examples),
                              "--model", str(base), "--out", str(tmp_path / "out"), "--budget", "1")
    _check(proc, marker)
    assert "auto_map" in proc.stderr and str(base) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bbh_refuses_remote_code_even_when_stdin_answers_yes(tiny_t5, tmp_path):
    from conftest import BBH
    if not BBH.is_dir():
        pytest.skip("../shared/data/bbh not present")
    marker = tmp_path / "ran"
    base = _remote_code_base(tiny_t5, tmp_path, marker)
    proc = _cli_answering_yes("bbh", "--model", str(base), "--methods", "zeroshot", "--tasks",
                              "navigate", "--seeds", "1", "--bbh-dir", str(BBH), "--max-eval", "2",
                              "--out", str(tmp_path / "out"))
    _check(proc, marker)
    assert "auto_map" in proc.stderr


def test_a_tokenizer_config_naming_code_is_refused_too(tiny_t5, tmp_path):
    from lorahub_compeft.io.models import load_model
    base = tmp_path / "base"
    shutil.copytree(tiny_t5, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        load_model(str(base))


def test_every_load_passes_trust_remote_code_false(tiny_t5, monkeypatch):
    import transformers
    from lorahub_compeft.io.models import load_model
    calls = []
    for name in ("AutoConfig", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM", "AutoTokenizer"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", "not passed")))
            return _real(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_t5))
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForSeq2SeqLM", "AutoTokenizer"}
    assert all(value is False for _, value in calls), calls


def test_a_model_object_whose_tokenizer_names_code_is_refused(tiny_t5, lora_dir, tmp_path):
    """compose() given a model object loads its tokenizer by the model's name: the same rule as
    load_model (a tokenizer_config with auto_map is refused, nothing imported from it)."""
    from transformers import T5ForConditionalGeneration

    from lorahub_compeft import compose
    base = tmp_path / "base"
    shutil.copytree(tiny_t5, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    model = T5ForConditionalGeneration.from_pretrained(base)
    with pytest.raises(ValueError, match="auto_map"):
        compose([str(lora_dir)], [{"input": "say the word : red ?", "target": "red"}], model,
                budget=1, progress=False)
