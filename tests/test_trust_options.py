"""Every numeric option is checked before anything runs or is stored (exit 2, one line naming
the option and its range), and the Python API refuses the same values; a command's own usage
errors, malformed examples and a full disk are one line with exit 2; `compose --force`
replaces its own earlier output and nothing else; the libraries' warnings stay off the
terminal and the other-base warning is said once."""
import errno
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lorahub_compeft.compose import composer
import lorahub_compeft.io.adapters as adapters
from lorahub_compeft.cli import main
from lorahub_compeft.cli import options
from lorahub_compeft.config import ComposeConfig
from lorahub_compeft.merge import merge

CLI = [sys.executable, "-m", "lorahub_compeft.cli"]


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text("".join(json.dumps({"input": f"say the word : {w} ?", "target": "red"}) + "\n"
                            for w in ("red", "blue", "green")))
    return path


def cli(argv, capsys):
    """(exit status, the non-empty lines on stderr) of one command run in this process."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def copy_expert(source, target, base=None):
    shutil.copytree(source, target)
    if base is not None:
        config = json.loads((target / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (target / "adapter_config.json").write_text(json.dumps(config))
    return target


# --- 1. numeric options: refused at once, one line naming the option and its range ------------
NUMERIC = [  # (command and flag, what the line must name)
    (["compose", "--restarts", "1000000000000"], ["--restarts", "at most 100"]),
    (["compose", "--restarts", "1e12"], ["--restarts", "at most 100"]),
    (["compose", "--candidates-per-step", "1000000000"], ["--candidates-per-step", "at most 256"]),
    (["compose", "--budget", "0"], ["--budget", "positive integer"]),
    (["compose", "--batch-size", "-1"], ["--batch-size", "positive integer"]),
    (["compose", "-n", "0"], ["--n-experts", "positive integer"]),
    (["compose", "--max-new-tokens", "-1"], ["--max-new-tokens", "positive integer"]),
    (["compose", "--rank", "100000000"], ["--rank", "at most 65,536"]),
    (["bbh", "--batch-size", "-1"], ["--batch-size", "positive integer"]),
    (["bbh", "-n", "-1"], ["--n-experts", "positive integer"]),
    (["bbh", "--budget", "-1"], ["--budget", "positive integer"]),
    (["bbh", "--restarts", "1000000000000"], ["--restarts", "at most 100"]),
    (["bbh", "--max-eval", "0"], ["--max-eval", "positive integer"]),
    (["bbh", "--shots", "0"], ["--shots", "positive integer"]),
    (["bbh", "--workers", "0"], ["--workers", "positive integer"]),
    (["bbh", "--lr", "nan"], ["--lr", "finite number"]),
    (["bbh", "--seeds", "1-1000000000"], ["--seeds", "at most 10,000"]),
    (["bbh", "--density", "nan"], ["--density", "(0, 1]"]),
    (["demo", "--seeds", "1-1000000000"], ["--seeds", "at most 10,000"]),
    (["demo", "-n", "0"], ["--n-experts", "positive integer"]),
    (["demo", "--eval", "-5"], ["--eval", "positive integer"]),
    (["merge", "--rank", "100000000"], ["--rank", "at most 65,536"]),
]
REQUIRED = {  # the rest of each command line: inputs that do not exist, so nothing could run
    "compose": ["--experts", "no-such-dir/x", "--examples", "no-such.jsonl", "--out", "{out}"],
    "bbh": ["--model", "./no-such-model", "--out", "{out}"],
    "demo": ["--zoo", "./no-such-zoo"],
    "merge": ["./no-such-a", "./no-such-b", "-o", "{out}"],
}


@pytest.mark.parametrize("argv, words", NUMERIC, ids=[" ".join(a) for a, _ in NUMERIC])
def test_a_numeric_option_out_of_range_is_one_line_naming_it_and_its_range(argv, words, tmp_path,
                                                                           capsys):
    out = tmp_path / "out"
    rest = [a.format(out=out) for a in REQUIRED[argv[0]]]
    start = time.perf_counter()
    code, err = cli([*argv, *rest], capsys)
    assert code == 2 and len(err) == 1, err
    assert all(w in err[0] for w in words), err
    assert time.perf_counter() - start < 10 and not out.exists()


def test_threads_are_at_most_the_cores(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(options.threads, "machine_cores", lambda: 2)
    assert options.thread_count("2") == 2
    code, err = cli(["compose", "--threads", "1000000000", "--experts", "x", "--examples", "x",
                     "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "--threads" in err[0] and "at most 2" in err[0], err


def test_seeds_are_counted_before_the_list_is_built():
    start = time.perf_counter()
    with pytest.raises(Exception, match="1,000,000,000 seeds"):
        options.parse_seeds("1-1000000000")
    assert time.perf_counter() - start < 1
    with pytest.raises(Exception, match=r"2\*\*32"):
        options.parse_seeds("1,4294967296")
    assert options.parse_seeds("1-3,9") == [1, 2, 3, 9]


@pytest.mark.parametrize("field, value", [("restarts", 10 ** 12), ("candidates_per_step", 10 ** 9),
                                          ("budget", 10 ** 9), ("n_experts", 10 ** 6),
                                          ("batch_size", 10 ** 9), ("max_length", 10 ** 12)])
def test_the_python_api_refuses_the_same_counts(field, value, lora_dir, examples):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        ComposeConfig(**{field: value})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        composer.compose([str(lora_dir)], [json.loads(line) for line in
                                           examples.read_text().splitlines()],
                         progress=False, **{field: value})
    assert time.perf_counter() - start < 5  # refused before any model is loaded


@pytest.mark.parametrize("weights", [[math.nan, math.nan], [math.inf, 1.0], [1e309, 1.0],
                                     ["x", 1.0]])
def test_merge_refuses_weights_that_are_not_finite_numbers(weights, lora_dir, tmp_path):
    other = copy_expert(lora_dir, tmp_path / "other")
    with pytest.raises(ValueError, match="weights must be"):
        merge([str(lora_dir), str(other)], weights=weights)


def test_merge_refuses_a_rank_no_module_can_have(lora_dir, tmp_path, capsys):
    other = copy_expert(lora_dir, tmp_path / "other")
    with pytest.raises(ValueError, match=r"rank 100,000,000 is more than any module's update can "
                                         r"have \(at most 32"):
        merge([str(lora_dir), str(other)], rank=10 ** 8)
    code, err = cli(["merge", str(lora_dir), str(other), "--weights", "nan,nan", "-o",
                     str(tmp_path / "m")], capsys)
    assert code == 2 and len(err) == 1 and "finite" in err[0], err
    code, err = cli(["merge", str(lora_dir), str(other), "--rank", "1000", "-o",
                     str(tmp_path / "m")], capsys)
    assert code == 2 and len(err) == 1 and "at most 32" in err[0], err
    assert not (tmp_path / "m").exists()
    assert merge([str(lora_dir), str(other)], rank=32).adapter.config["r"] == 32


def test_a_compact_rank_above_the_modules_is_refused(lora_dir):
    from lorahub_compeft.compose.export import compact_adapter
    from lorahub_compeft.io.adapters import load_adapter
    adapter = load_adapter(str(lora_dir))
    with pytest.raises(ValueError, match="at most 32"):
        compact_adapter(adapter.tensors, adapter.config, 10 ** 8)
    assert compact_adapter(adapter.tensors, adapter.config, 32).rank == 32


def test_an_ere_budget_too_small_to_keep_anything_stores_nothing(lora_dir, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    code, err = cli(["compress", str(lora_dir), "--codec", "ere", "--budget-bits", "1e-300",
                     "-o", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "--budget-bits" in err[0], err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_compress_in_python_refuses_options_that_keep_nothing(lora_dir):
    from lorahub_compeft.store.expert import compress
    with pytest.raises(ValueError, match="keep nothing.*raise budget_bits"):
        compress(str(lora_dir), codec="ere", budget_bits=1e-300)


# --- 2. a command's own errors: exit 2 and one line -----------------------------------------
def test_name_with_two_sources_is_exit_2(lora_dir, tmp_path, capsys):
    code, err = cli(["library", "add", str(tmp_path / "lib"), str(lora_dir), str(lora_dir),
                     "--name", "x"], capsys)
    assert code == 2 and err == ["error: --name works with one source only"], err
    code, err = cli(["compose", "--library", str(tmp_path), "--experts", str(lora_dir),
                     "--examples", "x", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "one of --library or --experts" in err[0], err


def test_examples_a_tokenizer_cannot_take_are_one_line(lora_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(composer, "compose", lambda *a, **k: pytest.fail("composed"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "\\ud800", "target": "red"}\n')  # valid JSON, not UTF-8 text
    code, err = cli(["compose", "--experts", str(lora_dir), "--examples", str(bad),
                     "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(bad) in err[0] and "'input'" in err[0] and "surrogate" in err[0], err


def test_a_bad_held_out_file_is_refused_before_composing(lora_dir, examples, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(composer, "compose", lambda *a, **k: pytest.fail("composed"))
    held_out = tmp_path / "held.jsonl"
    held_out.write_text('{"input": "say the word : red ?"}\n')
    code, err = cli(["compose", "--experts", str(lora_dir), "--examples", str(examples),
                     "--eval", str(held_out), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(held_out) in err[0] and "'target'" in err[0] and "missing" in err[0], err
    assert not (tmp_path / "o").exists()


def _disk_full(*args, **kwargs):
    from safetensors import SafetensorError
    raise SafetensorError("Error while serializing: I/O error: No space left on device "
                          "(os error 28)")


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))


@pytest.mark.parametrize("failure", [_disk_full, _no_space])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(failure, lora_dir, tmp_path, capsys,
                                                              monkeypatch):
    expert = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(expert)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(adapters, "save_file", failure)
    folder = tmp_path / "exports"
    folder.mkdir()
    code, err = cli(["export", str(expert), "-o", str(folder / "adapter")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "no space left on the device" in err[0] and "nothing half-written" in err[0], err
    assert os.listdir(folder) == []  # neither the folder nor its staging copy


def test_a_real_write_failure_of_export_is_one_line(lora_dir, tmp_path):
    """A real failed write (a file-size limit; a full disk fails the same way), no monkeypatch."""
    expert = tmp_path / "e.safetensors"
    assert main(["compress", str(lora_dir), "-o", str(expert)]) == 0
    folder = tmp_path / "exports"
    folder.mkdir()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))

    proc = subprocess.run([*CLI, "export", str(expert), "-o", str(folder / "adapter")],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and "safetensors" in err[0], proc.stderr[-2000:]
    assert os.listdir(folder) == []


# --- 3. compose --force replaces its own output, and only that -------------------------------
def compose_argv(lora_dir, examples, out, *extra):
    return ["compose", "--experts", str(lora_dir), "--examples", str(examples), "--out", str(out),
            "--budget", "2", "--quiet", "--dtype", "fp32", *extra]


def test_compose_force_replaces_its_own_earlier_output(lora_dir, examples, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(compose_argv(lora_dir, examples, out)) == 0
    composition = json.loads((out / "composition.json").read_text())
    (out / "composition.json").write_text(json.dumps(dict(composition, mark=1)))
    code, err = cli(compose_argv(lora_dir, examples, out), capsys)  # no --force: refused
    assert code == 2 and len(err) == 1 and "--force" in err[0], err
    assert main(compose_argv(lora_dir, examples, out, "--force", "--budget", "3")) == 0
    assert "mark" not in json.loads((out / "composition.json").read_text())  # replaced
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors",
                                       "composition.json"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging left


@pytest.mark.parametrize("foreign", ["notes.txt", "composition.json"])
def test_compose_force_never_replaces_what_is_not_its_own(foreign, lora_dir, examples, tmp_path,
                                                          capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(compose_argv(lora_dir, examples, out)) == 0
    if foreign == "composition.json":  # a file of that name compose did not write
        (out / foreign).write_text('{"my": "notes"}\n')
    else:
        (out / foreign).write_text("mine\n")
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    monkeypatch.setattr(composer, "compose", lambda *a, **k: pytest.fail("composed"))
    code, err = cli(compose_argv(lora_dir, examples, out, "--force"), capsys)
    assert code == 2 and len(err) == 1 and foreign in err[0], err
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before


# --- 4. the libraries' warnings off the terminal; the other-base warning once -------------------
LIBRARY_NOISE = ["was renamed", "is_gradient_checkpointing", "Loading weights", "FutureWarning",
                 "UserWarning", "DeprecationWarning", "warnings.warn"]


def test_compose_with_model_warns_once_and_keeps_library_warnings_out(tiny_t5, lora_dir, examples,
                                                                      tmp_path):
    base = "nobody-xyz/another-base"  # not the --model given: our own warning, said once
    experts = [copy_expert(lora_dir, tmp_path / name, base) for name in ("red-a", "red-b")]
    proc = subprocess.run([*CLI, "compose", "--experts", *map(str, experts), "--examples",
                           str(examples), "--model", str(tiny_t5), "--budget", "2",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("another base than") == 1, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if "another base than" in line)
    assert "red-a" in line and "red-b" in line and base in line
    noise = [w for w in LIBRARY_NOISE if w in proc.stderr]
    assert noise == [], proc.stderr[-3000:]
    assert "composing" in proc.stderr  # our own progress bar stays


def test_the_other_base_warning_is_said_once_for_many_compositions(lora_dir, tiny_t5, tmp_path,
                                                                   caplog):
    from lorahub_compeft.compose.experts import expert_handles, validate_experts
    base = f"nobody-xyz/base-{tmp_path.name}"  # a base no other test warns about
    experts = [copy_expert(lora_dir, tmp_path / name, base) for name in ("a", "b", "c")]
    with caplog.at_level(logging.WARNING):
        for chosen in (experts[:2], experts[1:], experts):  # e.g. demo's cells
            validate_experts(expert_handles([str(e) for e in chosen]), str(tiny_t5))
    said = [r.getMessage() for r in caplog.records if "another base than" in r.getMessage()]
    assert len(said) == 1 and "a, b" in said[0], said
