"""Tests for lorahub_compeft.eval.bbh: specs, loader, prompts, normalization, few-shot draws."""

import json
import random
import unicodedata
from pathlib import Path

import pytest

from lorahub_compeft.eval import bbh
from lorahub_compeft.eval.bbh import (BBH_TASKS, BBHDataError, draw_few_shot, exact_match,
                                      format_icl_prompt, format_prompt, load_examples,
                                      load_task_spec, normalize_answer)

# The repo is checked out beside `shared/`, which holds the official BBH release.
SHARED_BBH = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbh"
needs_data = pytest.mark.skipif(
    not (SHARED_BBH / "tasks").is_dir(), reason=f"BBH data not found at {SHARED_BBH}"
)

SMALL_TASKS = {"causal_judgement": 187, "penguins_in_a_table": 146, "snarks": 178}
KINDS = {"choice", "boolean", "yes_no", "valid_invalid", "number", "sequence", "free"}


@pytest.fixture(autouse=True)
def _no_env_dir(monkeypatch):
    # A developer's LORAHUB_COMPEFT_BBH_DIR must not change what the tests read.
    monkeypatch.delenv(bbh.BBH_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def all_examples():
    if not (SHARED_BBH / "tasks").is_dir():
        pytest.skip(f"BBH data not found at {SHARED_BBH}")
    return {task: load_examples(task, SHARED_BBH / "tasks") for task in BBH_TASKS}


def spec_answer(task):
    return load_task_spec(task)["answer"]


# ---------------------------------------------------------------------- specs


def test_27_tasks_with_well_formed_specs():
    assert len(BBH_TASKS) == 27 and len(set(BBH_TASKS)) == 27
    for task in BBH_TASKS:
        spec = load_task_spec(task)
        assert set(spec) == {"name", "instruction", "answer", "max_new_tokens"}
        assert spec["name"] == task
        assert spec["instruction"].strip() and "\n" not in spec["instruction"]
        assert spec["answer"]["kind"] in KINDS
        assert isinstance(spec["max_new_tokens"], int) and 1 <= spec["max_new_tokens"] <= 256


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="date_understanding") as err:
        load_task_spec("no_such_task")
    assert "no_such_task" in str(err.value)
    with pytest.raises(ValueError, match="word_sorting"):
        load_examples("no_such_task", SHARED_BBH)


def test_spec_is_a_fresh_copy():
    load_task_spec("snarks")["answer"]["kind"] = "free"
    assert load_task_spec("snarks")["answer"]["kind"] == "choice"


@needs_data
@pytest.mark.parametrize("task", BBH_TASKS)
def test_instruction_matches_cot_prompt(task):
    lines = (SHARED_BBH / "cot-prompts" / f"{task}.txt").read_text(encoding="utf-8").splitlines()
    assert load_task_spec(task)["instruction"] == lines[lines.index("-----") + 1].strip()


# ---------------------------------------------------------------------- loader


def test_loader_counts_and_fields(all_examples):
    for task, examples in all_examples.items():
        assert len(examples) == SMALL_TASKS.get(task, 250), task
        for ex in examples:
            assert set(ex) == {"input", "target"}
            assert isinstance(ex["input"], str) and isinstance(ex["target"], str)
    assert sum(map(len, all_examples.values())) == 6511


@needs_data
def test_loader_accepts_release_root_and_env_var(monkeypatch):
    direct = load_examples("snarks", SHARED_BBH / "tasks")
    assert load_examples("snarks", SHARED_BBH) == direct  # <dir>/tasks/<task>.json
    monkeypatch.setenv(bbh.BBH_DIR_ENV, str(SHARED_BBH))
    assert load_examples("snarks") == direct


def test_spec_kind_fits_targets(all_examples):
    # The declared kind must describe the data: labels cover every target, numbers parse,
    # and choice tasks are (nearly) all option letters -- BBH has a couple of stray text
    # targets such as "Monsters, Inc" in movie_recommendation.
    for task, examples in all_examples.items():
        answer = spec_answer(task)
        normed = [normalize_answer(ex["target"], answer) for ex in examples]
        if "labels" in answer:
            assert set(normed) <= {normalize_answer(label, answer) for label in answer["labels"]}
            assert {ex["target"] for ex in examples} == set(answer["labels"]), task
        elif answer["kind"] == "number":
            assert all(n.lstrip("-").isdigit() for n in normed), task
        elif answer["kind"] == "choice":
            letters = sum(len(n) == 3 and n[0] + n[2] == "()" for n in normed)
            assert letters >= 0.99 * len(examples), task
        # A target is always its own exact match.
        assert all(exact_match(ex["target"], ex["target"], answer) for ex in examples)


def test_max_new_tokens_covers_targets(all_examples):
    # Provable bound without a tokenizer: SentencePiece pieces cover >= 1 character of the
    # NFKC text with spaces as "▁" plus one leading "▁"; add one token for EOS.
    for task, examples in all_examples.items():
        need = max(len(unicodedata.normalize("NFKC", ex["target"])) + 2 for ex in examples)
        assert load_task_spec(task)["max_new_tokens"] >= need, task


def _write(tmp_path, task, payload):
    path = tmp_path / f"{task}.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"examples": [', "not valid JSON"),
        ({"canary": "x"}, "no 'examples' list"),
        ([{"input": "q", "target": "a"}], "no 'examples' list"),
        ({"examples": []}, "no examples"),
        ({"examples": [{"input": "q", "target": "a"}, "oops"]}, "example 1 is a str"),
        ({"examples": [{"input": "q"}]}, "example 0: 'target' is missing"),
        ({"examples": [{"input": "q", "target": "a"}, {"input": 3, "target": "a"}]},
         "example 1: 'input' is not a string"),
    ],
)
def test_malformed_file_names_task_and_file(tmp_path, payload, message):
    path = _write(tmp_path, "navigate", payload)
    with pytest.raises(BBHDataError, match=message) as err:
        load_examples("navigate", tmp_path)
    assert "navigate" in str(err.value) and str(path) in str(err.value)


def test_missing_file_names_task_and_paths(tmp_path):
    with pytest.raises(BBHDataError) as err:
        load_examples("navigate", tmp_path)
    assert "navigate" in str(err.value) and str(tmp_path / "navigate.json") in str(err.value)
    assert isinstance(err.value, ValueError)


def test_loader_keeps_only_input_and_target(tmp_path):
    _write(tmp_path, "navigate", {"examples": [{"input": "q", "target": "Yes", "extra": 1}]})
    assert load_examples("navigate", tmp_path) == [{"input": "q", "target": "Yes"}]


# --------------------------------------------------------------------- prompts


def test_prompts():
    assert format_prompt("Sort a list of words.", "b a") == "Sort a list of words.\n\nQ: b a\nA:"
    shots = [{"input": "q1", "target": "a1"}, {"input": "q2", "target": "a2"}]
    assert format_icl_prompt("Do it.", shots, "q3") == (
        "Do it.\n\nQ: q1\nA: a1\n\nQ: q2\nA: a2\n\nQ: q3\nA:"
    )
    assert format_icl_prompt("Do it.", [], "q3") == format_prompt("Do it.", "q3")


# -------------------------------------------------------------- normalization

CHOICE = {"kind": "choice"}
NUMBER = {"kind": "number"}
BOOLEAN = {"kind": "boolean", "labels": ["True", "False"]}
DYCK = {"kind": "sequence", "unit": "char"}
WORDS = {"kind": "sequence", "unit": "word"}


@pytest.mark.parametrize("pred", ["(A)", "A", "(a)", "a", " (A). ", "A)", "(A"])
def test_choice_letters(pred):
    assert normalize_answer(pred, CHOICE) == "(a)"
    assert exact_match(pred, "(A)", CHOICE)


def test_choice_non_matches():
    assert not exact_match("(B)", "(A)", CHOICE)
    assert not exact_match("(A) Monsters", "(A)", CHOICE)  # no extraction from longer text
    assert not exact_match("AB", "(A)", CHOICE)
    assert exact_match("monsters, inc.", "Monsters, Inc", CHOICE)  # stray text targets still work
    assert normalize_answer("A") == "a"  # without a spec, letters are not rewritten


@pytest.mark.parametrize(
    "pred, target",
    [("12.0", "12"), ("12", "12"), ("+12", "12"), ("-50", "-50"), ("-50.00", "-50"),
     ("1,000", "1000"), ("-11,520", "-11520"), ("0.50", "0.5"), ("-0", "0"), ("12.", "12")],
)
def test_numbers_compare_by_value(pred, target):
    assert exact_match(pred, target, NUMBER)


def test_number_non_matches():
    assert not exact_match("12.5", "12", NUMBER)
    assert not exact_match("-12", "12", NUMBER)
    assert not exact_match("twelve", "12", NUMBER)
    assert normalize_answer("12 apples", NUMBER) == "12 apples"
    assert normalize_answer("1,00", NUMBER) == "1,00"  # not a thousands grouping


@pytest.mark.parametrize("pred", ["True", "true", "TRUE", "True.", " true "])
def test_boolean(pred):
    assert exact_match(pred, "True", BOOLEAN)
    assert not exact_match(pred, "False", BOOLEAN)


def test_label_kinds():
    assert exact_match("yes", "Yes", {"kind": "yes_no", "labels": ["Yes", "No"]})
    assert not exact_match("Yes, it is.", "Yes", {"kind": "yes_no", "labels": ["Yes", "No"]})
    assert exact_match("Invalid.", "invalid", {"kind": "valid_invalid"})
    assert not exact_match("valid", "invalid", {"kind": "valid_invalid"})


def test_word_sequences():
    target = "artillery bainite doris fda harm"
    assert exact_match("Artillery  bainite\ndoris fda harm.", target, WORDS)
    assert not exact_match("bainite artillery doris fda harm", target, WORDS)  # order matters
    assert not exact_match("artillery bainite doris fda", target, WORDS)


def test_dyck_sequences():
    assert exact_match("] ] >", "] ] >", DYCK)
    assert exact_match("]]>", "] ] >", DYCK)
    assert exact_match(" ] ]  > ", "] ] >", DYCK)
    assert not exact_match("] >", "] ] >", DYCK)
    assert not exact_match("> ] ]", "] ] >", DYCK)


def test_common_rules():
    assert normalize_answer("  Hello   World.  ") == "hello world"
    assert normalize_answer("Ünïcode", {"kind": "free"}) == "ünïcode"
    assert normalize_answer("ﬁne") == "fine"  # NFKC
    assert normalize_answer("a..") == "a."  # only one trailing period is dropped
    with pytest.raises(ValueError, match="unknown answer kind"):
        normalize_answer("x", {"kind": "bogus"})


# ------------------------------------------------------------------ few-shot


def test_draw_few_shot_is_seeded_and_disjoint():
    examples = [{"input": f"q{i}", "target": str(i)} for i in range(40)]
    random.seed(123)
    before = random.random()
    random.seed(123)
    shots, rest = draw_few_shot(examples, k=5, seed=7)
    assert random.random() == before  # global RNG untouched
    assert (shots, rest) == draw_few_shot(examples, k=5, seed=7)
    assert len(shots) == 5 and len(rest) == 35
    ids = {ex["input"] for ex in shots}
    assert ids.isdisjoint(ex["input"] for ex in rest)
    assert ids | {ex["input"] for ex in rest} == {ex["input"] for ex in examples}
    assert rest == [ex for ex in examples if ex["input"] not in ids]  # original order kept
    draws = {tuple(ex["input"] for ex in draw_few_shot(examples, k=5, seed=s)[0]) for s in range(5)}
    assert len(draws) > 1  # the seed matters


def test_draw_few_shot_bounds():
    examples = [{"input": str(i), "target": str(i)} for i in range(5)]
    with pytest.raises(ValueError, match="k=5"):
        draw_few_shot(examples, k=5, seed=0)
    with pytest.raises(ValueError):
        draw_few_shot(examples, k=-1, seed=0)
    assert draw_few_shot(examples, k=0, seed=0) == ([], examples)
    assert len(draw_few_shot(examples, k=4, seed=0)[1]) == 1
