"""The zoo: task specs and generators, tokenizer round trips, and a quick end-to-end build."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorahub_compeft.zoo import format_prompt, generate, get_task, load_tasks, task_names
from lorahub_compeft.zoo.generators import QUESTIONS
from lorahub_compeft.zoo.tasks import spec_dir
from zoo_build.tokenizer import build_tokenizer, build_zoo_tokenizer, split_words

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM, HELDOUT = task_names("upstream"), task_names("heldout")


def test_enough_tasks_and_valid_specs():
    assert len(UPSTREAM) >= 20 and len(HELDOUT) >= 5
    for task in load_tasks().values():
        assert task.split in ("upstream", "heldout")
        assert task.name in QUESTIONS, f"no generator for {task.name}"
        assert task.instruction
        if task.split == "heldout":
            assert task.skills and all(s in UPSTREAM for s in task.skills)
    # a generator nobody declared would be dead code
    assert set(QUESTIONS) == set(load_tasks())
    names = {json.loads(p.read_text())["name"] for p in spec_dir().glob("*.json")}
    assert names == set(load_tasks())


@pytest.mark.parametrize("name", UPSTREAM + HELDOUT)
def test_generator_deterministic_and_well_formed(name):
    task = get_task(name)
    a, b = generate(name, 50, seed=3), generate(name, 50, seed=3)
    assert a == b
    assert a != generate(name, 50, seed=4)
    for ex in a:
        assert ex["input"].startswith(f"{task.instruction}\n\nQ: ")
        assert ex["input"].endswith("\nA:")
        assert ex["target"] and ex["target"] == ex["target"].strip()
        if task.labels:
            assert ex["target"] in task.labels
        assert len(split_words(ex["input"])) <= 100


def test_generators_do_not_touch_global_random_state():
    import random
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate("bool_value", 20, seed=0)
    assert random.random() == expected


def test_heldout_inputs_never_produced_upstream():
    upstream_inputs = {ex["input"] for name in UPSTREAM for seed in range(3)
                       for ex in generate(name, 3000, seed=seed)}
    for name in HELDOUT:
        for ex in generate(name, 3000, seed=0):
            assert ex["input"] not in upstream_inputs, name


def test_heldout_instructions_are_new():
    upstream_instructions = {get_task(n).instruction for n in UPSTREAM}
    for name in HELDOUT:
        assert get_task(name).instruction not in upstream_instructions


def test_labels_balanced_enough():
    for name in UPSTREAM + HELDOUT:
        task = get_task(name)
        if task.labels:
            targets = [ex["target"] for ex in generate(name, 600, seed=0)]
            for label in task.labels:  # no label under 60% of its fair share
                assert targets.count(label) > 0.6 * len(targets) / len(task.labels), (name, label)


def test_bbh_shapes():
    ex = generate("bbh_boolean_expressions", 20, seed=0)
    for e in ex:
        q = e["input"].split("\n\nQ: ")[1][:-len("\nA:")]
        assert q.endswith(" is") and len(q.split()) == 9
        assert eval(q[:-3]) == (e["target"] == "True")  # our own generated string
    nav = generate("bbh_navigate", 5, seed=0)[0]["input"]
    assert "do you return to the starting point?" in nav and nav.endswith("- Yes\n- No\nA:")


def test_format_prompt():
    assert format_prompt("Do it.", "x") == "Do it.\n\nQ: x\nA:"
    assert format_prompt("", "x") == "Q: x\nA:"


@pytest.fixture(scope="module")
def tokenizer():
    bbh = ROOT.parent / "shared" / "data" / "bbh"
    return build_zoo_tokenizer(bbh_dir=bbh if bbh.exists() else None)


def test_tokenizer_round_trips_targets_and_inputs(tokenizer):
    for name in UPSTREAM + HELDOUT:
        for ex in generate(name, 100, seed=7):
            for text in (ex["input"], ex["target"]):
                ids = tokenizer(text)["input_ids"]
                assert ids[-1] == tokenizer.eos_token_id
                assert tokenizer.unk_token_id not in ids
                assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_splits_punctuation():
    assert split_words("(B)") == ["▁(", "B", ")"]
    assert split_words("is it?\nA:") == ["▁is", "▁it", "?", "\n", "A", ":"]
    tok = build_tokenizer(["(A) (B) True ] } ] yes."])
    for text in ["(B)", "True", "] } ]", "yes."]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_save_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = generate("bbh_dyck_languages", 1, seed=0)[0]["input"]
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (again.pad_token_id, again.eos_token_id, again.unk_token_id) == (0, 1, 2)


def _load_script():
    spec = importlib.util.spec_from_file_location("build_zoo", ROOT / "scripts" / "build_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    return _load_script().main(["--out", str(out), "--quick", "--threads", "1"])


def test_quick_build_end_to_end(quick_build):
    from peft import PeftModel
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    paths = quick_build
    base = T5ForConditionalGeneration.from_pretrained(paths["base"])
    tok = AutoTokenizer.from_pretrained(paths["base"])
    assert set(paths["experts"]) == {"bool_value", "list_name_food", "pair_sum"}
    expert_dir = paths["experts"]["bool_value"]
    config = json.loads((expert_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == Path(paths["base"])
    model = PeftModel.from_pretrained(base, expert_dir)
    enc = tok(["Q: True and False\nA:"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3)
    assert out.shape[0] == 1
    report = json.loads(Path(paths["report"]).read_text())
    assert set(report["em"]) >= set(HELDOUT)


def test_quick_ship_calibrates_and_manifests(quick_build):
    from lorahub_compeft.store.library import ExpertLibrary
    from lorahub_compeft.zoo.artifacts import verify
    root = quick_build["artifacts"]
    manifest = verify(root)
    assert (manifest["density"], manifest["alpha"]) in {(k, a) for k in (0.1, 0.3) for a in (1, 2)}
    library = ExpertLibrary(root / "experts", create=False)
    assert library.names() == ["bool_value", "list_name_food", "pair_sum"]
    assert all(library.get(n).density == manifest["density"] for n in library.names())
    calibration = json.loads((root / "calibration.json").read_text())
    methods = {r["method"] for r in calibration["rows"]}
    assert methods == {"dense", "compeft", "compeft_per_tensor", "stc", "prune"}
    # 3 experts x (dense + 2 densities x (2 alphas x 2 selections + stc + prune))
    assert len(calibration["rows"]) == 3 * (1 + 2 * 6)
    # a changed byte is caught, naming the file
    victim = root / "dense" / "pair_sum" / "adapter_model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="pair_sum/adapter_model.safetensors"):
        verify(root)
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    verify(root)


def test_demo_runs_on_quick_zoo(quick_build, tmp_path, capsys):
    from lorahub_compeft.cli import main
    out = tmp_path / "demo.json"
    rc = main(["demo", "--zoo", str(quick_build["artifacts"]), "--tasks", "heldout_pair_total",
               "--seeds", "1", "-n", "2", "--budget", "3", "--eval", "10", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["task"] == "heldout_pair_total" and rows[0]["n_eval"] == 10
    assert set(rows[0]["dense_weights"]) == set(rows[0]["compeft_weights"])
    assert len(rows[0]["dense_weights"]) == 2
    for method in ("zeroshot", "dense", "compeft"):
        assert 0 <= rows[0][method] <= 100
    table = capsys.readouterr().out
    assert "| heldout_pair_total |" in table and "mean of 1 zoo held-out tasks" in table


def test_demo_rejects_upstream_tasks_and_too_many_experts(quick_build):
    from lorahub_compeft.cli import main
    zoo = str(quick_build["artifacts"])
    assert main(["demo", "--zoo", zoo, "--tasks", "pair_sum", "--seeds", "1"]) == 2
    assert main(["demo", "--zoo", zoo, "--tasks", "heldout_pair_total", "-n", "9"]) == 2
    assert main(["demo", "--zoo", zoo, "--tasks", "heldout_nonesuch"]) == 2


# ---------------------------------------------------------------------------- shipped zoo
def test_shipped_artifacts_match_manifest_and_load():
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, T5ForConditionalGeneration
    from lorahub_compeft.store.library import ExpertLibrary
    from lorahub_compeft.zoo.artifacts import ARTIFACTS, verify

    manifest = verify(ARTIFACTS)
    assert manifest["total_bytes"] < 16e6
    base = T5ForConditionalGeneration.from_pretrained(ARTIFACTS / "base").eval()
    tok = AutoTokenizer.from_pretrained(ARTIFACTS / "base")
    library = ExpertLibrary(ARTIFACTS / "experts", create=False)
    assert sorted(library.names()) == sorted(UPSTREAM)
    example = generate("pair_sum", 1, seed=0)[0]
    enc = tok([example["input"]], return_tensors="pt")
    for name in ("pair_sum", "bool_value"):
        model = PeftModel.from_pretrained(base, ARTIFACTS / "dense" / name).eval()
        with torch.no_grad():
            assert model.generate(**enc, max_new_tokens=4).shape[0] == 1
        expert = library.get(name)
        assert expert.density == manifest["density"] and expert.alpha == manifest["alpha"]
        dense = load_file(ARTIFACTS / "dense" / name / "adapter_model.safetensors")
        assert set(expert.state_dict()) == set(dense)
        base = model.unload()


def test_demo_on_shipped_zoo_imports_no_training_code():
    code = ("import sys; from lorahub_compeft.cli import main; "
            "rc = main(['demo', '--tasks', 'heldout_pair_total', '--seeds', '2', '-n', '4', "
            "'--budget', '5', '--eval', '20']); "
            "print(sorted(m for m in sys.modules if m.startswith(('lorahub_compeft.zoo', 'zoo_build')))); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| heldout_pair_total |" in proc.stdout
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "lorahub_compeft.zoo.artifacts" in loaded
    assert "zoo_build" not in loaded  # the training code is not part of the package


def test_shipped_experts_compose_without_model_from_any_directory(tmp_path):
    from lorahub_compeft.zoo.artifacts import ARTIFACTS
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in generate("heldout_pair_total", 3, seed=7)))
    proc = subprocess.run([sys.executable, "-m", "lorahub_compeft.cli", "compose", "--library",
                           str(ARTIFACTS / "experts"), "--examples", str(examples), "-n", "2",
                           "--budget", "2", "--quiet", "--out", str(tmp_path / "adapter")],
                          cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
