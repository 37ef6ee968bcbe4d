"""The baselines (eval/baselines.py) on the tiny T5 and its experts: uniform and single choose
as select does, arrow is PEFT's own, lora-tune and fft learn on a copy; all through `bbh`."""
import copy
import json

import pytest
import torch

import support
from conftest import BBH, bbh_argv
from lorahub_compeft.cli import main
from lorahub_compeft.config import CompeftOptions
from lorahub_compeft.eval import runner
from lorahub_compeft.eval.baselines import ArrowParams, arrow_model
from lorahub_compeft.eval.methods import Base, make_method
from lorahub_compeft.eval.pool import ExpertPool
from lorahub_compeft.eval.benchmarks import TaskData
from lorahub_compeft.io.files import read_jsonl
from lorahub_compeft.io.models import generate
from lorahub_compeft.store.expert import load_expert


def word_task(word: str) -> TaskData:
    """Say `word`, whatever the question: 5 shots, 6 evaluation rows."""
    examples = support.constant_task(word, n=11)
    return TaskData(f"say-{word}", "Answer.", examples[:5], examples[5:], None, 4)


@pytest.fixture(scope="module")
def base(tiny_t5):
    return Base.load(str(tiny_t5), batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def pool(experts, tmp_path_factory):
    return ExpertPool.from_sources(experts, tmp_path_factory.mktemp("compressed"))


def weights_of(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, before: dict) -> bool:
    after = model.state_dict()
    return set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def alone_loss(base, expert_dir, task: TaskData) -> float:
    """An expert's few-shot loss loaded alone with PEFT: mean cross-entropy over the target
    tokens (the model's own loss, one batch)."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), expert_dir).eval()
    shots = task.few_shot_examples()
    tok = base.tokenizer
    batch = tok([s["input"] for s in shots], return_tensors="pt", padding=True)
    labels = tok([s["target"] for s in shots], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        return float(model(**batch, labels=labels.masked_fill(labels == tok.pad_token_id, -100)).loss)


def peft_answers(base, expert_dir, task: TaskData) -> list[str]:
    from peft import PeftModel
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), expert_dir).eval()
    return generate(model, base.tokenizer, [task.prompt(r["input"]) for r in task.rows],
                    task.max_new_tokens)


def test_uniform_averages_the_experts_select_chooses(base, pool):
    task = word_task("green")
    options = {"n_experts": 2, "budget": 8}
    chosen = make_method("select", **options).run(task, base, pool, seed=1)
    uniform = make_method("uniform", **options).run(task, base, pool, seed=1)
    assert uniform.info["experts"] == chosen.info["experts"] and len(uniform.info["experts"]) == 2
    assert uniform.info["weights"] == [0.5, 0.5]
    assert uniform.info["compose_timings"]["steps"] == 1  # scored once, no search
    compeft = make_method("uniform-compeft", **options).run(task, base, pool, seed=1)
    assert compeft.info["weights"] == [0.5, 0.5] and compeft.info["bytes_read"] < uniform.info["bytes_read"]


def test_uniform_weights_are_kept_even_when_no_composition_is_lower(base, experts):
    from lorahub_compeft.compose.composer import compose
    heavy = lambda w: 100.0 * float(abs(w).sum())  # any w != 0 costs more than w = 0 gains
    result = compose(experts, word_task("red").few_shot_examples(), base.model,
                     tokenizer=base.tokenizer, weights="uniform", n_experts=3, regularizer=heavy,
                     progress=False)
    assert list(result.weights.values()) == [1 / 3] * 3 and result.best_loss > result.zero_loss
    assert result.losses == [result.best_loss]  # scored once
    searched = compose(experts, word_task("red").few_shot_examples(), base.model,
                       tokenizer=base.tokenizer, n_experts=3, regularizer=heavy, budget=5,
                       progress=False)
    assert searched.best_loss <= searched.zero_loss  # the search never returns worse than w = 0


def test_single_is_the_lowest_expert_alone_as_peft_loads_it(base, pool, experts):
    task = word_task("blue")
    losses = {e: alone_loss(base, e, task) for e in experts}
    best = min(losses, key=losses.get)
    assert best.endswith("blue") and len(set(losses.values())) == 3
    before = weights_of(base.model)
    single = make_method("single").run(task, base, pool, seed=1)
    assert [e["name"] for e in single.info["experts"]] == [best] and single.info["weights"] == [1.0]
    l1 = make_method("select").params.compose_config().l1  # the objective's regularizer at w = 1
    assert single.info["best_loss"] == pytest.approx(losses[best] + l1, abs=1e-5)
    assert single.predictions == peft_answers(base, best, task)
    assert same_weights(base.model, before)


def test_arrow_runs_through_peft_on_t5_experts(base, pool, experts, tmp_path):
    task = word_task("red")
    before = weights_of(base.model)
    arrow = make_method("arrow").run(task, base, pool, seed=1)
    assert len(arrow.predictions) == len(task.rows) and arrow.info["files_read"] == 3
    assert same_weights(base.model, before)
    # Routed over all three, the model is not the base ...
    routed = arrow_model(base.model, experts, ArrowParams(top_k=2), seed=1)
    inputs = base.tokenizer([task.prompt(r["input"]) for r in task.rows], return_tensors="pt",
                            padding=True)
    start = torch.zeros((len(task.rows), 1), dtype=torch.long)
    with torch.no_grad():
        routed_logits = routed(**inputs, decoder_input_ids=start).logits
        base_logits = base.model(**inputs, decoder_input_ids=start).logits
    assert (routed_logits - base_logits).abs().max() > 1e-3
    # ... and over one expert (each token's one choice, weight 1), it is that expert alone.
    one = ExpertPool.from_sources(experts[:1], tmp_path / "compressed")
    alone = make_method("arrow", top_k=1).run(task, base, one, seed=1)
    assert alone.predictions == peft_answers(base, experts[0], task)
    # ComPEFT experts go to PEFT as exported dirs
    compressed = make_method("arrow-compeft", top_k=1).run(task, base, one, seed=1)
    exported = load_expert(one.compressed(experts[0], CompeftOptions())).export(tmp_path / "x")
    assert compressed.predictions == peft_answers(base, exported, task)


def test_arrow_names_what_peft_refuses_in_one_line(base, tiny_t5, experts, tmp_path):
    other_rank = support.train_expert(tiny_t5, tmp_path / "rank2", support.constant_task("pink"),
                                      steps=2, r=2)
    with pytest.raises(ValueError) as err:
        arrow_model(base.model, [experts[0], str(other_rank)], ArrowParams(top_k=1), seed=1)
    message = str(err.value)
    assert "\n" not in message and message.startswith("arrow: PEFT's create_arrow_model cannot")
    assert "rank mismatch" in message


@pytest.mark.parametrize("method, params", [("lora-tune", {"steps": 20, "lr": 1e-2}),
                                            ("fft", {"steps": 10, "lr": 1e-3})])
def test_training_lowers_the_few_shot_loss_on_a_copy(base, pool, method, params):
    task = word_task("cyan")  # no expert and not the base says cyan
    assert "cyan" not in generate(base.model, base.tokenizer, [task.prompt(r["input"])
                                                               for r in task.rows], 4)
    before = weights_of(base.model)
    answers = make_method(method, **params).run(task, base, pool, seed=1)
    assert same_weights(base.model, before)  # the worker's model is never trained
    info = answers.info
    assert info["passes"] == params["steps"]
    assert info["best_loss"] < 0.5 * info["zero_loss"]
    n_base = sum(p.numel() for p in base.model.parameters())
    if method == "lora-tune":
        assert info["lora"]["r"] == 4 and info["lora"]["target_modules"] == ["q", "v"]
        assert 0 < info["trained_parameters"] < n_base
    else:
        assert info["trained_parameters"] == n_base
    again = make_method(method, **params).run(task, base, pool, seed=1)
    assert again.predictions == answers.predictions and again.info["best_loss"] == info["best_loss"]


def test_training_parameters_are_checked():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        make_method("lora-tune", steps=0)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        make_method("fft", lr=-1.0)


BASELINES = ["uniform", "single", "arrow", "lora-tune", "fft"]


@pytest.mark.skipif(not BBH.is_dir(), reason="../shared/data/bbh not present")
def test_baselines_run_through_bbh_and_resume_by_setting(tiny_t5, experts, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ran = []
    real = runner.Worker.run
    monkeypatch.setattr(runner.Worker, "run", lambda self, cell: ran.append(cell) or real(self, cell))
    fast = ("--steps", "3", "--lr", "1e-3")
    assert main(bbh_argv(tiny_t5, experts, out, "--methods", ",".join(BASELINES), *fast)) == 0
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == len(ran) == 2 * 2 * len(BASELINES)  # 2 tasks x 2 seeds
    by_method = {m: [r for r in rows if r["method"] == m] for m in BASELINES}
    assert all(len(rs) == 4 for rs in by_method.values())
    assert all(r["weights"] == [0.5, 0.5] for r in by_method["uniform"])  # -n 2
    assert all(r["weights"] == [1.0] and len(r["experts"]) == 1 for r in by_method["single"])
    assert all(r["passes"] == 3 for m in ("lora-tune", "fft") for r in by_method[m])
    assert by_method["fft"][0]["setting"]["experts"] is None
    assert by_method["lora-tune"][0]["setting"]["params"] == {"steps": 3, "lr": 1e-3, "train_seed": 0}
    ran.clear()
    assert main(bbh_argv(tiny_t5, experts, out, "--methods", ",".join(BASELINES), *fast)) == 0
    assert ran == [] and len(read_jsonl(out / "results.jsonl")) == len(rows)  # nothing new
    assert main(bbh_argv(tiny_t5, experts, out, "--methods", "lora-tune,fft", "--steps", "4",
                         "--lr", "1e-3")) == 0
    assert sorted({(c.method.name, c.method.params.steps) for c in ran}) == \
        [("fft", 4), ("lora-tune", 4)] and len(ran) == 8  # another setting: new cells only
    assert len(json.loads((out / "config.json").read_text())["runs"]) == 3
