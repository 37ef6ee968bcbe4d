"""`lorahub-compeft compose` as a LoraHub user runs it: --experts-file, --eval."""
import json
import re

import pytest

from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import support
from lorahub_compeft.eval.bbh import exact_match
from lorahub_compeft.cli import main
from lorahub_compeft.io.models import generate


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_compose_with_experts_file_prints_exact_match_on_held_out(tiny_t5, lora_dir, tmp_path, capsys):
    other = support.train_expert(tiny_t5, tmp_path / "green", support.constant_task("green"), steps=15)
    listing = tmp_path / "experts.txt"
    listing.write_text(f"# two experts\n{lora_dir}\n\n{other}\n")
    task = support.constant_task("red", n=12)
    examples, held_out = _jsonl(tmp_path / "ex.jsonl", task[:5]), _jsonl(tmp_path / "ho.jsonl", task[5:])
    out = tmp_path / "adapter"
    assert main(["compose", "--experts-file", str(listing), "--examples", str(examples), "--eval",
                 str(held_out), "--max-new-tokens", "4", "-n", "2", "--budget", "6", "--quiet",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    printed = float(re.search(r"exact match on 7 held-out examples .*: ([\d.]+)%", text).group(1))
    assert lora_dir.name in text and other.name in text
    # the same number from the adapter it wrote, loaded the standard way
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    answers = generate(model, AutoTokenizer.from_pretrained(tiny_t5), [e["input"] for e in task[5:]], 4)
    expected = 100 * sum(exact_match(a, e["target"]) for a, e in zip(answers, task[5:])) / 7
    assert abs(printed - expected) < 0.05


def test_compose_needs_one_kind_of_expert_list(tiny_t5, lora_dir, tmp_path):
    examples = _jsonl(tmp_path / "ex.jsonl", support.constant_task("red", n=3))
    for given in ([], ["--library", str(tmp_path), "--experts", str(lora_dir)]):
        with pytest.raises(SystemExit, match="one of --library or --experts"):
            main(["compose", *given, "--examples", str(examples), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_cli_with_no_flags_composes_what_python_composes_with_no_options(tiny_t5, lora_dir,
                                                                         tmp_path):
    """`compose` takes its defaults from config.ComposeConfig, as compose() does: the same
    experts and examples give the same weights and a byte-identical adapter."""
    from lorahub_compeft.compose.composer import compose
    experts = [str(lora_dir)] + [
        str(support.train_expert(tiny_t5, tmp_path / w, support.constant_task(w), steps=15, seed=i))
        for i, w in enumerate(("green", "blue", "pink"))]
    task = support.constant_task("blue", n=5)
    examples = _jsonl(tmp_path / "ex.jsonl", task)
    assert main(["compose", "--experts", *experts, "--examples", str(examples), "--quiet",
                 "--out", str(tmp_path / "cli")]) == 0
    result = compose(experts, task, progress=False)
    python = result.save_adapter(tmp_path / "python")
    cli = json.loads((tmp_path / "cli" / "composition.json").read_text())
    assert len(result.experts) == 3 and result.selection.method == "loss"  # 3 of 4 chosen
    assert cli["weights"] == result.weights
    assert cli["selection"]["scores"] == result.selection.scores
    weights = "adapter_model.safetensors"
    assert (tmp_path / "cli" / weights).read_bytes() == (python / weights).read_bytes()


def test_a_bad_examples_line_is_named_by_file_and_line(lora_dir, tmp_path, capsys):
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"input": "say the word : red ?", "target": "red"}\n{"input": "x",\n')
    assert main(["compose", "--experts", str(lora_dir), "--examples", str(examples),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{examples}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
