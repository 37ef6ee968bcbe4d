import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

from lorahub_compeft import load_expert
from lorahub_compeft.cli import main


def test_compress_inspect_export(lora_dir, tiny_t5, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--density", "0.2", "--alpha", "2"]) == 0
    assert "smaller than fp16" in capsys.readouterr().out
    assert load_expert(out).alpha == 2.0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "density 0.2" in text and "bits/param" in text and "LORA r=4" in text
    assert main(["export", str(out), "-o", str(tmp_path / "adapter")]) == 0
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), tmp_path / "adapter")
    state = load_expert(out).state_dict()
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(state)
    for key, value in state.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)


def test_bad_input_is_a_clear_error_not_a_traceback(lora_dir, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(out), "--density", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "density must be in (0, 1]" in err and "Traceback" not in err
    assert main(["compress", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
    main(["compress", str(lora_dir), "-o", str(out)])
    proc = subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", "compress", str(lora_dir),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def test_library_commands(lora_dir, ia3_dir, tmp_path, capsys):
    root = tmp_path / "lib"
    assert main(["library", "add", str(root), str(lora_dir), str(ia3_dir), "--density", "0.3"]) == 0
    assert main(["library", "list", str(root)]) == 0
    text = capsys.readouterr().out
    assert lora_dir.name in text and ia3_dir.name in text and "2 experts" in text
    assert main(["library", "remove", str(root), ia3_dir.name]) == 0
    capsys.readouterr()
    main(["library", "list", str(root)])
    assert "1 experts" in capsys.readouterr().out
    assert main(["library", "list", str(tmp_path / "nope")]) == 2


def test_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    for word in ("compress", "inspect", "export", "library", "compose", "examples:"):
        assert word in proc.stdout
